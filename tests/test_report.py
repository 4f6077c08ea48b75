"""The report's statements follow the measured numbers, whichever way they point."""
from stages.report import _claims


def _ev(mean, std=0.01, primary="auroc"):
    return {"primary": primary, "mean": mean, "std": std, "n_seeds": 2, "summary": {}}


def _tr(orth_weight, orth, rank):
    return {"orth_weight": orth_weight, "curves": {"orth": [(1, orth * 2), (2, orth)]},
            "summary": {"final_probe": {"zv_effective_rank": rank}}}


def test_claims_agree_disagree_and_cannot_tell():
    data = {
        "evals": {
            "cls": {"random": _ev(0.50), "mflag": _ev(0.70), "align-only": _ev(0.45)},
            "det": {"random": _ev(0.001, 0.0, "map"), "mflag": _ev(0.002, 0.0, "map"),
                    "align-only": _ev(0.0, 0.0, "map")},
        },
        "trains": {"mflag": _tr(1.0, 10.0, 30.0), "align-only": _tr(0.0, 500.0, 10.0)},
    }
    text = "\n".join(_claims(data, "random"))
    assert "cls: `mflag` auroc 0.700 ± 0.010 vs `random`" in text and "agrees with the paper: pre-training beats" in text
    assert "`align-only` auroc 0.450" in text and "does NOT agree with the paper: pre-training does not beat" in text
    assert "det: `mflag`" in text and "cannot test the paper's claim" in text
    assert "effective rank of zv 30.0 with orth (`mflag`) vs 10.0 without" in text
    assert "keeps the image latent space from collapsing" in text
    assert "agrees with the paper: the orthogonality loss improves the downstream result" in text
    assert "10.0 with orth vs 500.0 without — the loss does keep" in text


def test_orthogonality_that_hurts_is_said_so():
    data = {"evals": {"cls": {"mflag": _ev(0.55), "align-only": _ev(0.70)}},
            "trains": {"mflag": _tr(1.0, 10.0, 8.0), "align-only": _tr(0.0, 500.0, 12.0)}}
    text = "\n".join(_claims(data, "random"))
    assert "does NOT agree with the paper: the orthogonality loss does not improve" in text
    assert "did not raise the effective rank" in text


def test_one_seed_is_inconclusive():
    one = {"primary": "auroc", "mean": 0.83, "std": 0.0, "n_seeds": 1, "summary": {}}
    data = {"evals": {"cls": {"random": {**one, "mean": 0.17}, "mflag": one, "align-only": {**one, "mean": 0.5}}},
            "trains": {"mflag": _tr(1.0, 10.0, 8.0), "align-only": _tr(0.0, 500.0, 12.0)}}
    text = "\n".join(_claims(data, "random"))
    assert "agrees with the paper" not in text.split("collapse")[0]
    assert text.count("one seed, no spread to judge against") == 3
