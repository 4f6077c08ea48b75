"""The pipeline report's building blocks: read the stage outputs, derive the claims, render markdown.

``collect`` reads train (``config.json``, ``summary.json``, ``metrics.jsonl``, ``spectrum.json``) and
eval (``results.json``) outputs into one dict; ``claims`` turns it into paired comparisons with verdicts
(``pipeline.report.stats``), ``sweep`` into the orthogonality-weight sweep; ``render`` writes the markdown and
the plots (``pipeline.report.plots``). Which comparisons are claims follows from each variant's configuration
against the reference variant (``_role``); the stage module's docstring lists the rules.
"""
from __future__ import annotations

import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

from pipeline.common import read_json, read_text_utf8
from pipeline.report import plots, stats
from pipeline.vision.models import MFlagVision, count_parameters

log = logging.getLogger(__name__)

# The configuration fields an ablation varies besides the loss terms' weights (``ablation_fields``); a
# variant's role comes from which of them differ from the reference. Fields that name paths or only
# change logging, probing or resources are ignored.
_ABLATION_OTHER = ("orth_on", "text_mode", "unfreeze_last")
_IGNORED_FIELDS = {"shards", "out", "text_cache", "text_model", "reports", "text_pooling", "text_max_length",
                   "seed", "resume", "log_every", "ckpt_every", "probe_every", "probe_size", "final_probe_size",
                   "probe_shards", "keep_checkpoints", "compile", "threads", "num_workers", "device"}
_DEFAULTS_OTHER = {"orth_on": "zv", "text_mode": "cache", "unfreeze_last": 0}
# Below this on both sides a downstream metric means the task was not learnt (e.g. detection mAP in a
# CPU budget): no verdict either way.
NOT_LEARNT = 0.02
# The evaluations that score images against texts through the projector and text head (no training)
LANGUAGE_TASKS = ("zeroshot", "retrieval")
# What "the language shows" means in the report (issue: language supervision, measured): zero-shot binary
# AUROC >= this on at least LANGUAGE_MIN_FINDINGS findings, the true-pair alignment loss below both the
# constant and the shuffled baseline (the paired difference's interval below 0), and the own-vs-other
# AUROC's 95% interval above 0.5.
LANGUAGE_AUROC = 0.70
LANGUAGE_MIN_FINDINGS = 3


# --------------------------------------------------------------------------- the loss terms
def loss_terms() -> dict:
    """``pipeline.pretrain.losses.LOSS_TERMS``: the tables, curves and descriptions below iterate over it."""
    # Imported here, not at the top: losses imports torch (about 2 s), which the report stage and
    # ``mflag report --help`` otherwise do without.
    from pipeline.pretrain.losses import LOSS_TERMS

    return LOSS_TERMS


def ablation_fields() -> tuple[str, ...]:
    """The configuration fields an ablation varies: every loss term's weight option, then the others."""
    return (*(t.weight_option for t in loss_terms().values()), *_ABLATION_OTHER)


def _defaults() -> dict:
    """The value a train config.json written before an option existed stands for."""
    return {**{t.weight_option: t.default_weight for t in loss_terms().values()}, **_DEFAULTS_OTHER}


def _weight(cfg: dict, name: str) -> float:
    term = loss_terms()[name]
    return float(cfg.get(term.weight_option, term.default_weight))



# --------------------------------------------------------------------------- reading
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in read_text_utf8(path).splitlines():
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def split_replicate(name: str) -> tuple[str, int | None]:
    """``mflag:s2`` -> (``mflag``, 2); ``mflag`` -> (``mflag``, None)."""
    m = re.fullmatch(r"(.+):s(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _last_quarter(rows: list[dict]) -> list[dict]:
    return rows[len(rows) - max(1, len(rows) // 4):] if rows else []


def _loss_terms(rows: list[dict], cfg: dict) -> dict:
    """Size of each loss term (``<term>``) and of its gradient on the trunk's last block
    (``grad_<term>_trunk``), averaged over the last quarter of the logged steps (None where not logged);
    for the orthogonality-weight sweep also the ratio orth/align of each (> 1: orthogonality drives the
    trunk), and the orthogonality weight at which the two gradients would be equal."""
    wa, wo = _weight(cfg, "align"), _weight(cfg, "orth")
    tail = _last_quarter([r for r in rows if "train/loss" in r])

    def mean(key):
        vals = [_num(r.get(key)) for r in tail]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    names = list(loss_terms())
    out = {**{n: mean(f"train/{n}") for n in names},
           **{f"grad_{n}_trunk": mean(f"train/grad_{n}_trunk") for n in names},
           "loss_ratio": None, "grad_ratio": None, "equal_grad_weight": None}
    align, orth, ga, go = out["align"], out["orth"], out["grad_align_trunk"], out["grad_orth_trunk"]
    if align and orth is not None and wa > 0:
        out["loss_ratio"] = wo * orth / (wa * align)
    if ga and go is not None and wa > 0:
        out["grad_ratio"] = wo * go / (wa * ga)
        out["equal_grad_weight"] = wa * ga / go if go else None
    return out


def _collect_trains(train_dirs) -> dict[str, dict]:
    """variant -> {"config": ..., "seeded": bool, "runs": {seed: run}}."""
    trains: dict[str, dict] = {}
    for name, folder in train_dirs:
        variant, seed = split_replicate(name)
        d = Path(folder)
        summary = read_json(d / "summary.json") if (d / "summary.json").is_file() else {}
        spectrum = read_json(d / "spectrum.json") if (d / "spectrum.json").is_file() else {}
        train_cfg = read_json(d / "config.json").get("config", {}) if (d / "config.json").is_file() else {}
        rows = _read_jsonl(d / "metrics.jsonl")
        curves: dict[str, list] = {}
        for r in rows:
            for key in ("train/loss", *(f"train/{n}" for n in loss_terms())):
                if _num(r.get(key)) is not None:
                    curves.setdefault(key.split("/", 1)[1], []).append((r["step"], r[key]))
        run_seed = seed if seed is not None else int(train_cfg.get("seed", 0))
        entry = trains.setdefault(variant, {"config": train_cfg, "seeded": seed is not None, "runs": {}})
        entry["runs"][run_seed] = {
            "summary": summary, "probe": summary.get("final_probe", {}) or {},
            "spectrum": {z: spectrum[z] for z in ("zv", "za") if isinstance(spectrum.get(z), dict)},
            "curves": curves, "terms": _loss_terms(rows, train_cfg), "steps": summary.get("steps"),
        }
    return trains


def _collect_evals(eval_dirs, trains: dict) -> dict[str, dict]:
    """label -> init -> {"primary", "values": {replicate seed: metric}, "pretrain_runs": n | None}.

    A seeded variant's replicate s is its pre-training seed s (the mean over that replicate's
    downstream seeds, normally the one seed s); any other init's replicates are its downstream seeds."""
    evals: dict[str, dict] = {}
    for stage, folder in eval_dirs:
        _, label, init_name = stage.split(":", 2)
        init, seed = split_replicate(init_name)
        res_path = Path(folder) / "results.json"
        if not res_path.is_file():
            continue
        res = read_json(res_path)
        primary = res["primary_metric"]
        by_seed = {int(r["seed"]): _num((r.get("test") or {}).get(primary)) for r in res.get("per_seed", [])}
        entry = evals.setdefault(label, {}).setdefault(init, {"primary": primary, "values": {},
                                                               "fraction": res.get("fraction"),
                                                               "pretrain_runs": None, "task": res.get("task"),
                                                               "tests": {}})
        if seed is not None:
            vals = [v for v in by_seed.values() if v is not None]
            entry["values"][seed] = sum(vals) / len(vals) if vals else None
            entry["tests"][seed] = next((r.get("test") or {} for r in res.get("per_seed", [])), {})
        else:
            entry["values"].update(by_seed)
            entry["tests"].update({int(r["seed"]): r.get("test") or {} for r in res.get("per_seed", [])})
    for by_init in evals.values():
        for init, e in by_init.items():
            if init in trains:
                e["pretrain_runs"] = len(trains[init]["runs"])
            vals = [v for v in e["values"].values() if v is not None]
            e["mean"], e["std"] = (statistics.fmean(vals) if vals else None,
                                   statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None))
            e["n"] = len(vals)
    return evals


# --------------------------------------------------------------------------- claims
def _role(cfg: dict, ref: dict) -> tuple[str, dict]:
    """What a variant tests against the reference, from the ablation fields in which it differs."""
    defaults = _defaults()
    keys = (set(cfg) | set(ref)) - _IGNORED_FIELDS
    diff = {k for k in keys if cfg.get(k, defaults.get(k)) != ref.get(k, defaults.get(k))}
    get = lambda k: cfg.get(k, defaults.get(k))  # noqa: E731
    if diff == {"orth_weight"}:
        return ("without-orth" if get("orth_weight") == 0 else "sweep"), {"orth_weight": get("orth_weight")}
    if diff == {"align_weight"} and get("align_weight") == 0:
        return "without-align", {}
    if diff == {"orth_on"}:
        return "orth-on", {"orth_on": get("orth_on")}
    if diff and diff <= {"text_mode", "unfreeze_last"}:
        k = get("unfreeze_last")
        return ("unfrozen" if k not in (0, None) else "online-frozen"), {"unfreeze_last": k}
    return "other", {"differs_in": sorted(diff)}


def _rank_values(trains: dict, variant: str, key: str) -> dict[int, float | None]:
    return {s: _num(r["probe"].get(key)) for s, r in trains[variant]["runs"].items()}


def _rank_label(trains: dict, variants: tuple[str, str], z: str) -> str:
    probe = next(iter(trains[variants[0]]["runs"].values()))["probe"]
    return f"{z} centred effective rank (N={probe.get('n_images', '?')}, D={probe.get(f'{z}_dim', '?')})"


def claims(data: dict, baseline: str, reference: str) -> list[dict]:
    """Every comparison with its paired statistics and verdict (see ``pipeline.report.stats``)."""
    trains, evals = data["trains"], data["evals"]
    out: list[dict] = []

    def add(claim: str, measure: str, a: str, b: str, va: dict, vb: dict, expect: str | None,
            pretrain: list[int | None], downstream: bool = True) -> None:
        p = stats.paired(va, vb)
        runs = [r for r in pretrain if r is not None]
        verdict, reason = stats.verdict(p, expect, min(runs) if runs else None)
        if p is not None and downstream and max(abs(p.mean_a), abs(p.mean_b)) < NOT_LEARNT:
            verdict, reason = "inconclusive", f"neither side learnt the task (metric below {NOT_LEARNT})"
        out.append({"claim": claim, "measure": measure, "a": a, "b": b, "expect": expect,
                    "verdict": verdict, "reason": reason, **(p.as_dict() if p else {"n": 0})})

    for label, by_init in evals.items():
        base = by_init.get(baseline)
        if base is None:
            continue
        for init, e in by_init.items():
            if init == baseline:
                continue
            claim = f"pre-training beats {baseline} init"
            if label.startswith("seg-") and e.get("fraction") is not None and float(e["fraction"]) <= 0.01:
                claim = f"the paper's headline: pre-training beats {baseline} init on segmentation at 1% of the labels"
            add(claim, f"{label} {e['primary']}", init, baseline,
                e["values"], base["values"], "greater", [e["pretrain_runs"], base["pretrain_runs"]])
    if reference not in trains:
        return out
    ref_cfg = trains[reference]["config"]
    ref_runs = len(trains[reference]["runs"])
    wording = {
        "without-orth": ("the orthogonality loss improves downstream",
                         "the orthogonality loss keeps the image latent space (zv) from collapsing", "greater"),
        "without-align": ("alignment + orthogonality beats orthogonality alone downstream", None, "greater"),
        "unfrozen": ("a frozen text encoder beats one with trained layers downstream",
                     "unfreezing the text encoder collapses the image latent space (zv)", "greater"),
        "orth-on": ("open: orthogonality on zv (original) vs on za, downstream",
                    "open: orthogonality on zv (original) vs on za, collapse of zv", None),
        "online-frozen": ("control: cached vs online frozen text encoder, downstream", None, None),
        "other": ("open: reference vs variant, downstream", None, None),
    }
    for variant, t in trains.items():
        if variant == reference:
            continue
        role, _ = _role(t["config"], ref_cfg)
        if role not in wording:
            continue  # sweep points: their own table
        down, collapse, expect = wording[role]
        runs = [ref_runs, len(t["runs"])]
        for label, by_init in evals.items():
            if reference in by_init and variant in by_init:
                if role == "without-align" and label.startswith(LANGUAGE_TASKS):
                    down = "language supervision matters: alignment + orthogonality beats orthogonality alone"
                else:
                    down = wording[role][0]
                add(down, f"{label} {by_init[reference]['primary']}", reference, variant,
                    by_init[reference]["values"], by_init[variant]["values"], expect, runs)
        if collapse:
            add(collapse, _rank_label(trains, (reference, variant), "zv"), reference, variant,
                _rank_values(trains, reference, "zv_effective_rank_centred"),
                _rank_values(trains, variant, "zv_effective_rank_centred"), expect, runs, downstream=False)
    return out


def sweep(data: dict, reference: str) -> dict | None:
    """The orthogonality-weight sweep: the reference and every variant that differs from it only in
    ``orth_weight`` (0 included), by weight, with the weight at which the two terms' gradients on the
    trunk are equal (the median of each run's estimate) and whether the nonzero weights bracket it."""
    trains, evals = data["trains"], data["evals"]
    if reference not in trains:
        return None
    ref_cfg = trains[reference]["config"]
    members = [reference] + [v for v, t in trains.items() if v != reference
                             and _role(t["config"], ref_cfg)[0] in ("sweep", "without-orth")]
    if len(members) < 3:
        return None
    rows = []
    for v in sorted(members, key=lambda v: float(trains[v]["config"].get("orth_weight", 1.0))):
        runs = trains[v]["runs"].values()
        row = {"variant": v, "orth_weight": float(trains[v]["config"].get("orth_weight", 1.0)),
               "seeds": len(trains[v]["runs"])}
        for key in ("loss_ratio", "grad_ratio", "equal_grad_weight"):
            vals = [r["terms"][key] for r in runs if r["terms"][key] is not None]
            row[key] = statistics.fmean(vals) if vals else None
        ranks = [_num(r["probe"].get("zv_effective_rank_centred")) for r in runs]
        ranks = [x for x in ranks if x is not None]
        row["zv_rank"] = (statistics.fmean(ranks), statistics.stdev(ranks) if len(ranks) > 1 else 0.0) if ranks \
            else None
        row["downstream"] = {label: (by[v]["mean"], by[v]["std"], by[v]["n"]) for label, by in evals.items() if v in by}
        rows.append(row)
    weights = [r["orth_weight"] for r in rows if r["orth_weight"] > 0]
    # Where the orthogonality term's gradient on the trunk equals the alignment term's: the weight at
    # which the measured (weighted) gradient ratio crosses 1 between two adjacent sweep points,
    # interpolated in log-log. A single run's own estimate (g_align / g_orth) depends on the state the
    # weight trained it into (orthogonality-dominated runs end with a small g_orth), so the crossing
    # along the sweep is the estimate; without one, the median of the runs' own estimates is given.
    pts = [(r["orth_weight"], r["grad_ratio"]) for r in rows if r["orth_weight"] > 0 and r["grad_ratio"]]
    equal, brackets = None, False
    for (w0, r0), (w1, r1) in zip(pts, pts[1:]):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            equal, brackets = math.exp(math.log(w0) + t * (math.log(w1) - math.log(w0))), True
            break
    if equal is None:
        estimates = [r["terms"]["equal_grad_weight"] for v in members if trains[v]["config"].get("orth_weight", 1.0) > 0
                     for r in trains[v]["runs"].values() if r["terms"]["equal_grad_weight"]]
        equal = statistics.median(estimates) if estimates else None
    return {"rows": rows, "equal_grad_weight": equal, "brackets": brackets, "weights": weights,
            "from_crossing": brackets}


def collect(train_dirs, eval_dirs, baseline: str, reference: str) -> dict[str, Any]:
    """Everything the report says, read from the stage outputs: ``train_dirs`` are (variant or
    ``variant:s<seed>``, train output folder), ``eval_dirs`` (``eval:<task>-<ds>:<init>[:s<seed>]``,
    eval output folder). Returns {"trains", "evals", "claims", "sweep"}."""
    trains = _collect_trains(train_dirs)
    data = {"trains": trains, "evals": _collect_evals(eval_dirs, trains)}
    data["claims"] = claims(data, baseline, reference)
    data["sweep"] = sweep(data, reference)
    return data


def language_checks(zeroshot: dict | None, retrieval: dict | None) -> dict:
    """Whether one run's zero-shot (binary protocol) and retrieval results show that the language taught the
    image encoder something (the thresholds above). ``zeroshot``/``retrieval``: the ``test`` dicts of
    their results.json; a missing one leaves its checks None. ``shows``: every available check passed."""
    out: dict[str, Any] = {"findings_above": None, "zeroshot": None, "loss": None, "own_vs_other": None}
    if zeroshot and isinstance(zeroshot.get("auroc_per_class"), dict):
        above = sorted(c for c, v in zeroshot["auroc_per_class"].items()
                       if _num(v) is not None and v >= LANGUAGE_AUROC)
        out["findings_above"] = above
        out["zeroshot"] = len(above) >= LANGUAGE_MIN_FINDINGS
    if retrieval and _num(retrieval.get("align_true_pair")) is not None:
        t, c, sh = (_num(retrieval.get(k)) for k in ("align_true_pair", "align_constant", "align_shuffled"))
        ci = retrieval.get("align_true_minus_shuffled_ci") or [None, None]
        out["loss"] = bool(c is not None and sh is not None and t < c and t < sh
                           and ci[1] is not None and ci[1] < 0)
        own_ci = retrieval.get("own_vs_other_auroc_ci") or [None, None]
        out["own_vs_other"] = bool(own_ci[0] is not None and own_ci[0] > 0.5)
    checks = [v for k, v in out.items() if k != "findings_above" and v is not None]
    out["shows"] = bool(checks) and all(checks)
    return out


def _language_rows(evals: dict) -> list[dict]:
    """Per init (and replicate): the binary zero-shot, 5x200 and retrieval results side by side."""
    zs = {lb: b for lb, b in evals.items() if lb.startswith("zeroshot-binary")}
    fx = {lb: b for lb, b in evals.items() if lb.startswith("zeroshot-chexpert5x200")}
    rt = {lb: b for lb, b in evals.items() if lb.startswith("retrieval")}
    if not (zs or rt):
        return []
    first = lambda group: next(iter(group.values()), {})  # noqa: E731
    z, f, r = first(zs), first(fx), first(rt)
    rows = []
    for init in dict.fromkeys([*z, *f, *r]):
        entries = [g[init] for g in (z, f, r) if init in g]
        seeds = sorted(set(z.get(init, {}).get("tests", {})) | set(r.get(init, {}).get("tests", {})))
        # one pre-training run (no replicates): its results do not depend on the downstream seed, one row
        single = any(e.get("pretrain_runs") == 1 for e in entries)
        for seed in seeds[:1] if single else seeds:

            def test(group: dict, init=init, seed=seed, single=single) -> dict | None:
                tests = group.get(init, {}).get("tests", {})
                # a single run's result serves every seed; a random model or a replicate is its seed's own
                return tests.get(seed) or (next(iter(tests.values()), None) if single else None)

            zt, ft, rtt = test(z), test(f), test(r)
            rows.append({"init": init, "seed": seed, "zeroshot": zt, "fivex": ft, "retrieval": rtt,
                         "checks": language_checks(zt, rtt)})
    return rows


def _ci(v, ci) -> str:
    if _num(v) is None:
        return "n/a"
    if ci and _num(ci[0]) is not None and _num(ci[1]) is not None:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{v:.3f}"


def _language_section(evals: dict) -> list[str]:
    rows = _language_rows(evals)
    if not rows:
        return []
    lines = ["## Language supervision: zero-shot classification and retrieval through the text space", "",
             "No training: images go trunk -> projector, texts through the frozen text encoder -> the trained text "
             "head, scored by cosine (docs/PROTOCOLS.md). The language shows when zero-shot binary AUROC >= "
             f"{LANGUAGE_AUROC:.2f} on at least {LANGUAGE_MIN_FINDINGS} findings, the true-pair alignment loss is "
             "below both the constant predictor's (every image predicts the mean projected report) and the "
             "shuffled pairs' (interval of true - shuffled below 0), and the own-vs-other AUROC's 95% interval "
             "lies above 0.5. Random init and an orthogonality-only run are the null.", "",
             "| init | seed | zero-shot mean AUROC [95% CI] | per finding | 5x200 accuracy | own-vs-other AUROC "
             "[95% CI] | true-pair loss | constant | shuffled | true − shuffled [95% CI] | R@1 / chance | "
             "P@10 by class / chance | language shows |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        z, f, r, c = row["zeroshot"] or {}, row["fivex"] or {}, row["retrieval"] or {}, row["checks"]
        per = ", ".join(f"{k} {v:.2f}" for k, v in (z.get("auroc_per_class") or {}).items() if _num(v) is not None)
        chance = r.get("chance_R@1")
        r1 = (f"{r['image_to_text_R@1']:.3f} / {chance:.3f}" if _num(r.get("image_to_text_R@1")) is not None
              and _num(chance) is not None else "n/a")
        p10 = (f"{r['image_to_text_P@10']:.3f} / {r['chance_P']:.3f}" if _num(r.get("image_to_text_P@10")) is not None
               and _num(r.get("chance_P")) is not None else "n/a")
        failed = [k for k in ("zeroshot", "loss", "own_vs_other") if c.get(k) is False]
        verdict = "**yes**" if c["shows"] else ("no (" + ", ".join(failed) + ")" if failed else "n/a")
        own = _ci(r.get("own_vs_other_auroc"), r.get("own_vs_other_auroc_ci"))
        lines.append(f"| {row['init']} | {row['seed']} | {_ci(z.get('auroc'), z.get('auroc_ci'))} | {per or 'n/a'} | "
                     f"{_fmt(_num(f.get('accuracy')))} | {own} "
                     f"| {_fmt(_num(r.get('align_true_pair')))} | {_fmt(_num(r.get('align_constant')))} | "
                     f"{_fmt(_num(r.get('align_shuffled')))} | "
                     f"{_ci(r.get('align_true_minus_shuffled'), r.get('align_true_minus_shuffled_ci'))} | {r1} | "
                     f"{p10} | {verdict} |")
    n_pairs = next((row["retrieval"].get("n_pairs") for row in rows if row["retrieval"]), None)
    texts = next((row["retrieval"].get("n_distinct_texts") for row in rows if row["retrieval"]), None)
    n_zs = next((row["zeroshot"].get("n_images") for row in rows if row["zeroshot"]), None)
    lines += ["", f"Zero-shot binary on {n_zs or 'n/a'} test images; retrieval over {n_pairs or 'n/a'} held-out "
              f"image-report pairs with {texts or 'n/a'} distinct report texts. R@1 is shown against chance but is "
              "not the yardstick: the alignment loss has no negatives and both ends are batch-normalised, so a "
              "low-rank shared code satisfies it.", ""]
    return lines


# --------------------------------------------------------------------------- rendering
def _short_path(name: str) -> str:
    """A local model folder relative to the working directory when it lies below it (a report should
    not carry one machine's absolute paths); hub ids and other paths unchanged."""
    p = Path(str(name))
    if p.is_absolute():
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(name)
    return str(name)


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _g(v: float | None) -> str:
    """A ratio or weight over orders of magnitude."""
    return "n/a" if v is None else f"{v:.3g}"


def _params(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f}M"


def _mean_std(vals: list) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _cxr_bert_reference() -> tuple[int, int] | None:
    """(trainable parameters of ResNet50 + projectors for 768-d text, CXR-BERT-general's parameters),
    counted on the meta device: no weights are loaded or allocated."""
    try:
        # here, not at the top: torch and transformers only for this reference line (start-up time)
        import torch
        from transformers import BertConfig, BertModel


        with torch.device("meta"):
            bert = BertModel(BertConfig(vocab_size=30522))  # CXR-BERT-general: BERT-base, 30,522 tokens
            vision = MFlagVision(768, 1024, "mlp", "random")
        return count_parameters(vision), sum(p.numel() for p in bert.parameters())
    except Exception as e:  # a reference line only; never fail the report over it
        log.debug("CXR-BERT reference count unavailable: %s", e)
        return None


def _describe(cfg: dict) -> str:
    """The variant's loss terms with their weights (a term computed only when weighted: when its weight is
    not 0) and its text encoder."""
    parts, defaults = [], _defaults()
    for name, term in loss_terms().items():
        w = _weight(cfg, name)
        if term.always or w:
            on = f" on {cfg.get(term.on_option, defaults.get(term.on_option))}" if term.on_option else ""
            parts.append(f"{name} {w:g}{on}")
    if cfg.get("text_mode") == "online":
        parts.append(f"online text, {cfg.get('unfreeze_last', 0)} layers trained")
    return ", ".join(parts)


def _claims_table(rows: list[dict]) -> list[str]:
    lines = ["| claim | measure | a | b | a: mean ± std | b: mean ± std | a − b per seed | mean a − b [95% CI] "
             "| n | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        if c["n"] == 0:
            lines.append(f"| {c['claim']} | {c['measure']} | `{c['a']}` | `{c['b']}` | n/a | n/a | — | — | 0 | "
                         f"{c['verdict']} ({c['reason']}) |")
            continue
        per_seed = ", ".join(f"s{s}: {d:+.3f}" for s, d in zip(c["seeds"], c["diffs"]))
        ci = "" if math.isnan(c["ci_low"]) else f" [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        lines.append(f"| {c['claim']} | {c['measure']} | `{c['a']}` | `{c['b']}` | {_fmt(c['mean_a'], c['std_a'])} | "
                     f"{_fmt(c['mean_b'], c['std_b'])} | {per_seed} | {c['mean_diff']:+.3f}{ci} | {c['n']} | "
                     f"**{c['verdict']}** ({c['reason']}) |")
    return lines


def render(data: dict, out: Path, title: str, see_also=()) -> str:
    """results.md for :func:`collect`'s ``data`` (plots are written into ``out``); ``see_also``: markdown
    lines put under the title."""
    trains, evals = data["trains"], data["evals"]
    lines = [f"# {title}", ""]
    if see_also:
        lines += [*(f"- {s}" for s in see_also), ""]
    n_runs = {v: len(t["runs"]) for v, t in trains.items()}
    if trains:
        lines += [f"Pre-training runs per variant: {', '.join(f'`{v}` {n}' for v, n in n_runs.items())}. "
                  "The orthogonality loss is computed and logged for every variant, also at weight 0.", ""]
    if data["claims"]:
        lines += ["## Claims: paired comparisons over seeds", "",
                  f"Each row compares `a` with `b` on the seeds both have; a seed's pair shares the pre-training "
                  f"data order and the downstream label fraction. Interval: {stats.METHOD}. Verdict: agrees / "
                  "contradicts (the interval excludes 0 on the paper's side / the other side), inconclusive "
                  "(it covers 0, or one seed pair, or one pre-training run); rows without a claimed direction "
                  "(open questions, controls) say higher / lower / inconclusive.", "",
                  *_claims_table(data["claims"]), ""]
    if evals:
        inits: list[str] = []
        for by_init in evals.values():
            inits += [i for i in by_init if i not in inits]
        lines += ["## Downstream (test split; mean ± std over replicates, metric from the best validation epoch)",
                  "", "| task | metric | " + " | ".join(inits) + " |", "|---|---|" + "---|" * len(inits)]
        for label, by_init in evals.items():
            primary = next(iter(by_init.values()))["primary"]
            cells = [(_fmt(by_init[i]["mean"], by_init[i]["std"]) + f" (n={by_init[i]['n']})")
                     if i in by_init else "—" for i in inits]
            lines.append(f"| {label} | {primary} | " + " | ".join(cells) + " |")
        lines += ["", "n counts pre-training seeds for a variant trained with seeds, downstream seeds otherwise.", ""]
    lines += _language_section(evals)
    if trains:
        probe = next((r["probe"] for t in trains.values() for r in t["runs"].values() if r["probe"]), {})
        n, dv, da = probe.get("n_images", "?"), probe.get("zv_dim", "?"), probe.get("za_dim", "?")
        lines += ["## Collapse diagnostic (held-out probe set, end of training; mean ± std over seeds)", "",
                  "Effective rank = exp(entropy of the normalised singular values) of the (N images x D "
                  "dimensions) embedding matrix. **Centred** (the covariance spectrum, Jing et al. 2022) is "
                  "the primary measure; uncentred (dominated by the mean of the non-negative ResNet features) is "
                  "secondary.", "",
                  f"| variant | setting | zv centred (N={n}, D={dv}) | zv uncentred | za centred (N={n}, D={da}) | "
                  "za uncentred | zv mean pairwise cosine | R@1 |", "|---|---|---|---|---|---|---|---|"]
        for v, t in trains.items():
            runs = t["runs"].values()
            cell = lambda k: _fmt(*_mean_std([_num(r["probe"].get(k)) for r in runs]), digits=1)  # noqa: E731, B023 (called in this iteration)
            lines.append(f"| {v} | {_describe(t['config'])} | {cell('zv_effective_rank_centred')} | "
                         f"{cell('zv_effective_rank_uncentred')} | {cell('za_effective_rank_centred')} | "
                         f"{cell('za_effective_rank_uncentred')} | "
                         f"{_fmt(*_mean_std([_num(r['probe'].get('zv_mean_pairwise_cosine')) for r in runs]))} | "
                         f"{_fmt(*_mean_std([_num(r['probe'].get('retrieval_R@1')) for r in runs]))} |")
        sizes = {(r["probe"].get("n_images"), r["probe"].get("zv_dim")) for t in trains.values()
                 for r in t["runs"].values() if r["probe"]}
        if len(sizes) > 1:
            lines.append(f"\nProbe sizes differ between runs: {sorted(sizes, key=str)} (N, D).")
        # every term computed at weight 0 too, and any other that some run logged
        logged = {n for tr in trains.values() for r in tr["runs"].values() for n, v in r["terms"].items()
                  if v is not None}
        terms = {n: t for n, t in loss_terms().items() if t.always or n in logged}
        count = "two " if len(terms) == 2 else ""
        lines += ["", f"## The {count}loss terms per variant (mean over seeds of the last quarter of logged steps)", "",
                  "Loss ratio = orth_weight x orth / (align_weight x align); gradient ratio = the same for the norms "
                  "of the two unweighted terms' gradients on the trunk's last block (> 1: orthogonality drives the "
                  "shared trunk); equal-gradient weight = the orth_weight at which the two gradients would be "
                  "equal.", "",
                  "| variant | setting | steps | " + " | ".join(f"{n} loss" for n in terms) + " | loss ratio | "
                  "gradient ratio | equal-gradient weight |", "|---|---|---|" + "---|" * len(terms) + "---|---|---|"]
        for v, t in trains.items():
            runs = list(t["runs"].values())
            m = lambda k: _mean_std([r["terms"].get(k) for r in runs])[0]  # noqa: E731, B023 (called in this iteration)
            cells = [(_g if term.wide else _fmt)(m(n)) for n, term in terms.items()]
            lines.append(f"| {v} | {_describe(t['config'])} | {runs[0]['steps']} | " + " | ".join(cells) +
                         f" | {_g(m('loss_ratio'))} | {_g(m('grad_ratio'))} | {_g(m('equal_grad_weight'))} |")
        lines.append("")
    sw = data.get("sweep")
    if sw:
        labels = list(evals)
        lines += ["## Orthogonality-weight sweep", "",
                  "| orth weight | variant | seeds | " + " | ".join(labels) + " | zv centred rank | loss ratio | "
                  "gradient ratio |", "|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
        for r in sw["rows"]:
            cells = [_fmt(*r["downstream"][lb][:2]) if lb in r["downstream"] else "—" for lb in labels]
            lines.append(f"| {r['orth_weight']:g} | {r['variant']} | {r['seeds']} | " + " | ".join(cells) +
                         f" | {_fmt(*(r['zv_rank'] or (None, None)), digits=1)} | {_g(r['loss_ratio'])} | "
                         f"{_g(r['grad_ratio'])} |")
        eq = sw["equal_grad_weight"]
        how = ("where the gradient ratio crosses 1 between two sweep points, log-log interpolation"
               if sw["from_crossing"] else "median of each run's own estimate; the ratio does not cross 1 "
               "within the sweep")
        lines += ["", f"The two terms' gradients on the trunk are equal at an orthogonality weight of about {_g(eq)} "
                  f"({how}); the sweep's nonzero weights ({', '.join(f'{w:g}' for w in sw['weights'])}) "
                  f"{'bracket' if sw['brackets'] else 'do NOT bracket'} it.", ""]
    first = next((r["summary"] for t in trains.values() for r in t["runs"].values()
                  if r["summary"].get("trainable_params") and r["summary"].get("text_encoder_params")
                  and t["config"].get("text_mode", "cache") == "cache"), None)
    if first:
        trainable, text = first["trainable_params"], first["text_encoder_params"]
        lines += ["## Parameters", "",
                  f"- trainable (ResNet50 + projectors): {_params(trainable)}",
                  f"- frozen text encoder ({_short_path(first.get('text_model', 'from the cache'))}): "
                  f"{_params(text)}, never loaded during pre-training",
                  f"- {100 * text / (trainable + text):.1f}% fewer trainable parameters than training both "
                  f"encoders ({_params(trainable + text)})."]
        ref = _cxr_bert_reference()
        if ref:
            r_train, r_text = ref
            lines.append(f"- for reference, the same model against CXR-BERT (BERT-base shape, {_params(r_text)}, "
                         f"768-d): {_params(r_train)} trainable, {100 * r_text / (r_train + r_text):.1f}% fewer "
                         "than training both encoders (the paper reports 78%); counted from the architectures.")
        lines.append("")
    figs = _plots(data, out)
    if figs:
        lines += ["## Plots", ""] + [f"![{t}]({f})" for t, f in figs] + [""]
    return "\n".join(lines)


def _plots(data: dict, out: Path) -> list[tuple[str, str]]:
    trains, evals = data["trains"], data["evals"]
    figs = []
    first = {v: t["runs"][min(t["runs"])] for v, t in trains.items() if t["runs"]}
    if any(r["curves"] for r in first.values()):
        plots.loss_curves({v: r["curves"] for v, r in first.items()}, out / "loss_curves.png",
                          symlog={n for n, t in loss_terms().items() if t.wide})
        figs.append(("Loss curves (first seed of each variant)", "loss_curves.png"))
    spectra = {v: [r["spectrum"] for r in t["runs"].values() if r["spectrum"]] for v, t in trains.items()}
    spectra = {v: s for v, s in spectra.items() if s}
    if spectra:
        plots.spectra(spectra, out / "spectra.png")
        figs.append(("Singular-value spectra of zv and za, centred and uncentred", "spectra.png"))
    if evals:
        rows = {label: {i: (r["mean"], r["std"] or 0.0) if r["mean"] is not None else None
                        for i, r in by_init.items()} for label, by_init in evals.items()}
        names = {label: next(iter(b.values()))["primary"] for label, b in evals.items()}
        plots.metric_bars(rows, names, out / "metrics.png")
        figs.append(("Downstream metric by method", "metrics.png"))
    sw = data.get("sweep")
    if sw:
        plots.sweep(sw["rows"], list(evals), out / "sweep.png", sw["equal_grad_weight"])
        figs.append(("Orthogonality-weight sweep", "sweep.png"))
    return figs


def jsonable(obj):
    """``obj`` with non-finite floats as None and keys as strings: what report.json holds."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
