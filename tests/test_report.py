"""The report's statistics and verdicts follow the measured numbers, whichever way they point.

Stage outputs (train config/summary/metrics/spectrum, eval results.json) are written to tmp_path as
the stages write them; the expected intervals come from scipy's paired t test, independently of
pipeline.report.stats."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from pipeline.report import build as reporting
from pipeline.report import stats
from stages import report

SEEDS = (0, 1, 2)


def _scipy_ci(a, b):
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    return float(ci.low), float(ci.high)


def _expected_verdict(a, b, expect):
    lo, hi = _scipy_ci(a, b)
    if lo <= 0 <= hi:
        return "inconclusive"
    side = "greater" if lo > 0 else "less"
    if expect is None:
        return "higher" if side == "greater" else "lower"
    return "agrees" if side == expect else "contradicts"


def test_paired_interval_is_the_paired_t_interval():
    a = {0: 0.71, 1: 0.69, 2: 0.74, 3: 0.70}
    b = {0: 0.65, 1: 0.66, 2: 0.69, 5: 0.1}  # seed 5 has no partner and is left out
    p = stats.paired(a, b)
    assert p.seeds == (0, 1, 2)
    assert p.diffs == pytest.approx((0.06, 0.03, 0.05))
    lo, hi = _scipy_ci([0.71, 0.69, 0.74], [0.65, 0.66, 0.69])
    assert (p.ci_low, p.ci_high) == pytest.approx((lo, hi), rel=1e-9)
    assert p.mean_a == pytest.approx(np.mean([0.71, 0.69, 0.74]))
    assert p.std_b == pytest.approx(np.std([0.65, 0.66, 0.69], ddof=1))


@pytest.mark.parametrize("a,b,expect,runs,verdict", [
    ([0.8, 0.81, 0.79], [0.6, 0.62, 0.61], "greater", 3, "agrees"),
    ([0.6, 0.62, 0.61], [0.8, 0.81, 0.79], "greater", 3, "contradicts"),
    ([0.7, 0.6, 0.8], [0.71, 0.62, 0.76], "greater", 3, "inconclusive"),  # the interval covers 0
    ([0.8, 0.81, 0.79], [0.6, 0.62, 0.61], None, 3, "higher"),
    ([0.8, 0.81, 0.79], [0.6, 0.62, 0.61], "greater", 1, "inconclusive"),  # one pre-training run
    ([0.8], [0.6], "greater", None, "inconclusive"),  # one seed pair
])
def test_verdicts(a, b, expect, runs, verdict):
    p = stats.paired(dict(enumerate(a)), dict(enumerate(b)))
    assert stats.verdict(p, expect, runs)[0] == verdict
    if len(a) > 1 and runs != 1:
        assert verdict == _expected_verdict(a, b, expect)


# ----------------------------------------------------------------------------- a fake pipeline run
def _train(root: Path, name: str, seed: int, cfg: dict, zv_rank: float, terms: tuple[float, float, float, float],
           n: int = 40, dim: int = 64) -> tuple[str, str]:
    """One train output folder; ``terms`` = (align, orth, grad_align_trunk, grad_orth_trunk) logged at
    every step of the last quarter."""
    d = root / "train" / name / f"seed-{seed}"
    d.mkdir(parents=True)
    full = {"align_weight": 1.0, "orth_weight": 1.0, "orth_on": "zv", "text_mode": "cache", "unfreeze_last": 0,
            "seed": seed, "lr": 1e-3, "out": str(d), **cfg}
    (d / "config.json").write_text(json.dumps({"config": full}))
    probe = {"n_images": n, "zv_dim": dim, "za_dim": 16, "zv_effective_rank_centred": zv_rank,
             "zv_effective_rank_uncentred": 1.1, "za_effective_rank_centred": 5.0,
             "za_effective_rank_uncentred": 2.0, "retrieval_R@1": 0.1}
    (d / "summary.json").write_text(json.dumps({"steps": 8, "final_probe": probe, "trainable_params": 1000,
                                                "text_encoder_params": 500, "text_model": "tiny"}))
    align, orth, ga, go = terms
    rows = [{"step": s, "train/loss": 1.0, "train/align": align * (3 if s < 5 else 1), "train/orth": orth,
             "train/grad_align_trunk": ga, "train/grad_orth_trunk": go} for s in range(1, 9)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(seed)
    sv = sorted(rng.random(n).tolist(), reverse=True)
    (d / "spectrum.json").write_text(json.dumps({"n_images": n, "zv": {"centred": sv, "uncentred": sv, "n": n,
                                                                        "dim": dim},
                                                 "za": {"centred": sv[:16], "uncentred": sv[:16], "n": n, "dim": 16}}))
    return f"{name}:s{seed}", str(d)


def _eval(root: Path, label: str, init: str, values: dict[int, float], metric: str = "auroc",
          replicate: int | None = None) -> tuple[str, str]:
    d = root / "eval" / label / init / (f"seed-{replicate}" if replicate is not None else "all")
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "primary_metric": metric, "fraction": 0.1,
        "per_seed": [{"seed": s, "test": {metric: v}} for s, v in values.items()]}))
    return f"eval:{label}:{init}" + (f":s{replicate}" if replicate is not None else ""), str(d)


DOWN = {  # per pre-training seed: the CheXpert AUROC of each variant
    "mflag": [0.70, 0.72, 0.71],
    "align-only": [0.75, 0.78, 0.76],   # higher than mflag: the paper's claim is contradicted
    "mflag-za": [0.71, 0.70, 0.73],     # open question, no resolvable difference
    "orth-only": [0.60, 0.62, 0.59],    # the combination beats orthogonality alone: agrees
    "sweep-1e-2": [0.73, 0.74, 0.72],
    "unfrozen": [0.69, 0.75, 0.66],
}
RANKS = {"mflag": [30.0, 32.0, 31.0], "align-only": [20.0, 35.0, 50.0], "mflag-za": [30.0, 31.0, 33.0],
         "orth-only": [40.0, 41.0, 42.0], "sweep-1e-2": [25.0, 26.0, 24.0], "unfrozen": [10.0, 13.0, 11.0]}
CONFIGS = {"mflag": {}, "align-only": {"orth_weight": 0.0}, "mflag-za": {"orth_on": "za"},
           "orth-only": {"align_weight": 0.0}, "sweep-1e-2": {"orth_weight": 0.01},
           "unfrozen": {"text_mode": "online", "unfreeze_last": 1}}
RANDOM = [0.52, 0.50, 0.55]


def _world(tmp_path):
    trains, evals = [], []
    for v, cfg in CONFIGS.items():
        w = cfg.get("orth_weight", 1.0)
        for s in SEEDS:
            # gradients: align 2.0, orth 400 per unit weight -> equal at weight 0.005
            trains.append(_train(tmp_path, v, s, cfg, RANKS[v][s], (1.5, 100.0 + s, 2.0, 400.0)))
            evals.append(_eval(tmp_path, "cls-chexpert", v, {s: DOWN[v][s]}, replicate=s))
        assert w >= 0
    evals.append(_eval(tmp_path, "cls-chexpert", "random", dict(enumerate(RANDOM))))
    return report.ReportConfig(out=str(tmp_path / "report"), trains=tuple(trains), evals=tuple(evals))


def _claim(data, a, b, measure_start):
    rows = [c for c in data["claims"] if c["a"] == a and c["b"] == b and c["measure"].startswith(measure_start)]
    assert len(rows) == 1, [(c["a"], c["b"], c["measure"]) for c in data["claims"]]
    return rows[0]


def test_report_claims_numbers_and_verdicts(tmp_path):
    res = report.run(_world(tmp_path))
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data == reporting.jsonable(res.data)

    # pre-training vs random: every variant, paired by seed, expected greater
    for v in CONFIGS:
        c = _claim(data, v, "random", "cls-chexpert")
        lo, hi = _scipy_ci(DOWN[v], RANDOM)
        assert (c["ci_low"], c["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
        assert c["diffs"] == pytest.approx([x - y for x, y in zip(DOWN[v], RANDOM)])
        assert c["verdict"] == _expected_verdict(DOWN[v], RANDOM, "greater")
    # the reference against each ablation, downstream: direction from the variant's role
    expects = {"align-only": "greater", "orth-only": "greater", "unfrozen": "greater", "mflag-za": None}
    for v, expect in expects.items():
        c = _claim(data, "mflag", v, "cls-chexpert")
        assert c["expect"] == expect
        assert c["mean_diff"] == pytest.approx(np.mean(DOWN["mflag"]) - np.mean(DOWN[v]))
        assert c["verdict"] == _expected_verdict(DOWN["mflag"], DOWN[v], expect)
    assert _claim(data, "mflag", "align-only", "cls")["verdict"] == "contradicts"
    assert _claim(data, "mflag", "orth-only", "cls")["verdict"] == "agrees"
    assert _claim(data, "mflag", "mflag-za", "cls")["verdict"] == "inconclusive"
    # collapse claims on the centred rank of zv, with N and D in the measure
    for v, expect in (("align-only", "greater"), ("unfrozen", "greater"), ("mflag-za", None)):
        c = _claim(data, "mflag", v, "zv centred effective rank")
        assert "N=40" in c["measure"] and "D=64" in c["measure"]
        assert c["verdict"] == _expected_verdict(RANKS["mflag"], RANKS[v], expect)
    assert _claim(data, "mflag", "unfrozen", "zv centred")["verdict"] == "agrees"
    assert _claim(data, "mflag", "align-only", "zv centred")["verdict"] == "inconclusive"
    # sweep points are not claims; orth-only has no collapse claim
    assert not [c for c in data["claims"] if c["b"] == "sweep-1e-2"]
    assert not [c for c in data["claims"] if c["b"] == "orth-only" and c["measure"].startswith("zv")]


def test_sweep_ratios_and_the_equal_gradient_weight(tmp_path):
    data = report.run(_world(tmp_path)).data
    sw = data["sweep"]
    assert [r["variant"] for r in sw["rows"]] == ["align-only", "sweep-1e-2", "mflag"]
    by = {r["variant"]: r for r in sw["rows"]}
    # gradients 2.0 (align) and 400 (orth, unweighted): ratio = w x 200, equal at w = 0.005
    assert by["mflag"]["grad_ratio"] == pytest.approx(200.0)
    assert by["sweep-1e-2"]["grad_ratio"] == pytest.approx(2.0)
    assert by["align-only"]["grad_ratio"] == pytest.approx(0.0)
    # the weighted ratio is 2 at 0.01 and 200 at 1: it never crosses 1 within the sweep, so the estimate
    # is each run's own g_align / g_orth and the sweep does not bracket it
    assert sw["equal_grad_weight"] == pytest.approx(0.005)
    assert sw["weights"] == [0.01, 1.0]
    assert sw["brackets"] is False
    # the loss ratio over the last quarter of logged steps (steps 7-8): w x mean(orth) / align
    assert by["mflag"]["loss_ratio"] == pytest.approx(np.mean([100.0, 101.0, 102.0]) / 1.5)
    assert by["mflag"]["zv_rank"][0] == pytest.approx(np.mean(RANKS["mflag"]))
    assert by["sweep-1e-2"]["downstream"]["cls-chexpert"][0] == pytest.approx(np.mean(DOWN["sweep-1e-2"]))
    for png in ("spectra.png", "sweep.png", "metrics.png", "loss_curves.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_one_pretraining_run_never_gets_a_verdict(tmp_path):
    # the demo's layout: one pre-training run per variant, two downstream seeds each
    d = tmp_path
    trains = [(v, _train(d, v, 0, cfg, r, (1.0, 10.0, 1.0, 1.0))[1])
              for v, cfg, r in (("mflag", {}, 30.0), ("align-only", {"orth_weight": 0.0}, 10.0))]
    evals = [_eval(d, "cls-chexpert", "mflag", {0: 0.80, 1: 0.81}),
             _eval(d, "cls-chexpert", "align-only", {0: 0.60, 1: 0.61}),
             _eval(d, "cls-chexpert", "random", {0: 0.50, 1: 0.52})]
    data = report.run(report.ReportConfig(out=str(d / "report"), trains=tuple(trains), evals=tuple(evals),
                                          see_also=("[ablations](../ablation/results.md)",))).data
    assert {c["verdict"] for c in data["claims"]} == {"inconclusive"}
    c = _claim(data, "mflag", "random", "cls")
    assert c["n"] == 2 and c["diffs"] == pytest.approx([0.30, 0.29])
    assert "one pre-training run" in c["reason"]
    assert data["sweep"] is None
    assert "(../ablation/results.md)" in (d / "report" / "results.md").read_text()


def test_a_task_nothing_learnt_is_not_judged(tmp_path):
    evals = [_eval(tmp_path, "det-rsna", "mflag", {0: 0.001, 1: 0.002, 2: 0.0}, metric="map", replicate=None),
             _eval(tmp_path, "det-rsna", "random", {0: 0.0, 1: 0.0, 2: 0.0}, metric="map")]
    data = report.run(report.ReportConfig(out=str(tmp_path / "r"), evals=tuple(evals))).data
    (c,) = data["claims"]
    assert c["verdict"] == "inconclusive" and c["n"] == 3 and not math.isnan(c["ci_low"])


def test_the_sweep_brackets_the_weight_where_the_gradient_ratio_crosses_one(tmp_path):
    # gradients that depend on the state each weight trains into, as in real runs: weighted ratio 0.01 at
    # 1e-4, 4 at 1e-2 and 50 at 1, so the ratio crosses 1 between 1e-4 and 1e-2
    grads = {"a": (0.0, (1.0, 1.0)), "b": (1e-4, (1.0, 100.0)), "c": (1e-2, (1.0, 400.0)), "mflag": (1.0, (1.0, 50.0))}
    trains = []
    for v, (w, (ga, go)) in grads.items():
        for s in SEEDS:
            trains.append(_train(tmp_path, v, s, {"orth_weight": w}, 10.0, (1.0, 10.0, ga, go)))
    sw = report.run(report.ReportConfig(out=str(tmp_path / "r"), trains=tuple(trains))).data["sweep"]
    assert [r["grad_ratio"] for r in sw["rows"]] == pytest.approx([0.0, 0.01, 4.0, 50.0])
    assert sw["brackets"] is True and sw["from_crossing"] is True
    # log-log between (1e-4, 0.01) and (1e-2, 4): log ratio 0 at t = ln 100 / ln 400
    t = math.log(100) / math.log(400)
    assert sw["equal_grad_weight"] == pytest.approx(math.exp(math.log(1e-4) + t * math.log(100)))
