"""Zero-shot and retrieval metrics: hand-computed cases, brute force and the reference formulas."""
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.downstream import language_metrics as lm

# Ranks worked out by hand (stable rule: rank = #greater + #equal at a lower index).
# Rows (image_to_text): row 0 -> 1 (0.9 above), row 1 -> 0 (the equal 0.7 sits at a higher column),
# row 2 -> 3 (0.8 and 0.4 above, the equal 0.3 at column 0 before it), row 3 -> 0.
# Columns (text_to_image): col 0 -> 1, col 1 -> 1, col 2 -> 1 (0.9 above; the equal 0.3 of row 3 comes after),
# col 3 -> 2 (0.7 above, the equal 0.4 of row 2 before it).
TIES = np.array([[0.5, 0.5, 0.9, 0.1],
                 [0.6, 0.7, 0.2, 0.7],
                 [0.3, 0.8, 0.3, 0.4],
                 [0.1, 0.2, 0.3, 0.4]])


def _open_clip_ranks(logits: np.ndarray) -> np.ndarray:
    # open_clip's get_clip_metrics with the stable sort this module documents
    logit = torch.as_tensor(logits)
    ranking = torch.argsort(logit, dim=1, descending=True, stable=True)
    ground_truth = torch.arange(len(logit)).view(-1, 1)
    return torch.where(ranking == ground_truth)[1].numpy()


# --------------------------------------------------------------------------- ranks
def test_clip_ranks_ties_follow_stable_rule_both_directions():
    assert lm.clip_ranks(TIES).tolist() == [1, 0, 3, 0]
    assert lm.clip_ranks(TIES.T).tolist() == [1, 1, 1, 2]


def test_clip_ranks_equal_torch_stable_argsort_on_tie_heavy_matrices():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        x = rng.integers(0, 3, size=(n, n)).astype(float)  # many ties
        assert lm.clip_ranks(x).tolist() == _open_clip_ranks(x).tolist()


def test_clip_ranks_crosses_row_blocks(monkeypatch):
    monkeypatch.setattr(lm, "_ROW_BLOCK", 3)
    x = np.random.default_rng(1).integers(0, 4, size=(10, 10)).astype(float)
    assert lm.clip_ranks(x).tolist() == _open_clip_ranks(x).tolist()


def test_clip_ranks_rejects_non_square_and_nan():
    with pytest.raises(ValueError, match="square"):
        lm.clip_ranks(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        lm.clip_ranks(np.array([[1.0, np.nan], [0.0, 1.0]]))


# --------------------------------------------------------------------------- retrieval
def test_retrieval_metrics_mean_median_and_recall_conventions():
    res = lm.retrieval_metrics(TIES, ks=(1, 2, 3, 4))
    i2t, t2i = res["image_to_text"], res["text_to_image"]
    # ranks [1, 0, 3, 0]: mean 1 + 1; median of [0, 0, 1, 3] is 0.5 -> floor 0 -> + 1
    assert i2t["mean_rank"] == 2.0
    assert i2t["median_rank"] == 1.0
    assert [i2t[f"R@{k}"] for k in (1, 2, 3, 4)] == [0.5, 0.75, 0.75, 1.0]
    # ranks [1, 1, 1, 2]
    assert t2i["mean_rank"] == 2.25
    assert t2i["median_rank"] == 2.0
    assert [t2i[f"R@{k}"] for k in (1, 2, 3, 4)] == [0.0, 0.75, 1.0, 1.0]
    assert res["n_pairs"] == 4
    assert res["chance"] == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "R@4": 1.0}
    assert "R@1_same_text" not in i2t and "n_distinct_texts" not in res


def test_retrieval_metrics_match_open_clip_formulas_on_random_logits():
    x = np.random.default_rng(2).normal(size=(50, 50))
    x[np.arange(50), np.arange(50)] += 1.0
    res = lm.retrieval_metrics(x, ks=(1, 5, 10))
    for name, mat in (("image_to_text", x), ("text_to_image", x.T)):
        preds = _open_clip_ranks(mat)
        assert res[name]["mean_rank"] == pytest.approx(preds.mean() + 1, abs=1e-12)
        assert res[name]["median_rank"] == np.floor(np.median(preds)) + 1
        for k in (1, 5, 10):
            assert res[name][f"R@{k}"] == pytest.approx(np.mean(preds < k), abs=1e-12)


def test_same_text_hit_when_beaten_only_by_identical_report():
    # Row 0's true text (0.2) is beaten only by column 1, which has the same report: a same-text hit.
    # Row 2's true text is beaten by column 0 of another report: a miss either way.
    x = np.array([[0.2, 0.9, 0.1],
                  [0.3, 0.8, 0.1],
                  [0.7, 0.4, 0.6]])
    res = lm.retrieval_metrics(x, groups=["a", "a", "b"], ks=(1, 2))
    i2t, t2i = res["image_to_text"], res["text_to_image"]
    assert i2t["R@1"] == pytest.approx(1 / 3)
    assert i2t["R@1_same_text"] == pytest.approx(2 / 3)
    # columns: col 0 ranks its image 2nd... [0.2, 0.3, 0.7] -> strict 2, best same-report image (row 1) 1;
    # col 1 [0.9, 0.8, 0.4] -> strict 1, same 0; col 2 [0.1, 0.1, 0.6] -> 0, 0
    assert t2i["R@1"] == pytest.approx(1 / 3)
    assert t2i["R@1_same_text"] == pytest.approx(2 / 3)
    assert t2i["R@2"] == pytest.approx(2 / 3)
    assert t2i["R@2_same_text"] == 1.0
    assert res["n_pairs"] == 3 and res["n_distinct_texts"] == 2
    # k = 1: group sizes 2, 2, 1 -> (2/3 + 2/3 + 1/3) / 3
    assert res["chance"]["R@1_same_text"] == pytest.approx(5 / 9)
    assert res["chance"]["R@1"] == pytest.approx(1 / 3)


def test_same_text_equals_strict_when_all_texts_distinct():
    x = np.random.default_rng(3).integers(0, 3, size=(12, 12)).astype(float)
    res = lm.retrieval_metrics(x, groups=list(range(12)), ks=(1, 3, 20))
    for name in ("image_to_text", "text_to_image"):
        for k in (1, 3, 20):
            assert res[name][f"R@{k}_same_text"] == res[name][f"R@{k}"]
    for k in (1, 3, 20):
        assert res["chance"][f"R@{k}_same_text"] == pytest.approx(res["chance"][f"R@{k}"], abs=1e-15)
    assert res["chance"]["R@20"] == 1.0


def _brute_chance(groups, k):
    n = len(groups)
    hits = total = 0
    for perm in itertools.permutations(range(n)):
        top = set(perm[:k])
        for i in range(n):
            hits += any(groups[j] == groups[i] for j in top)
            total += 1
    return hits / total


@pytest.mark.parametrize("groups", [["a", "a", "b", "c", "c"], ["x", "x", "x", "y", "z", "z"], [1, 2, 3, 4]])
def test_chance_matches_enumeration_of_all_rankings(groups):
    n = len(groups)
    ks = (1, 2, 3, n - 1, n + 2)
    res = lm.retrieval_metrics(np.eye(n), groups=groups, ks=ks)
    for k in ks:
        assert res["chance"][f"R@{k}_same_text"] == pytest.approx(_brute_chance(groups, k), abs=1e-12)
        assert res["chance"][f"R@{k}"] == pytest.approx(_brute_chance(list(range(n)), k), abs=1e-12)


def test_retrieval_metrics_rejects_bad_groups_and_k():
    with pytest.raises(ValueError, match="groups"):
        lm.retrieval_metrics(np.eye(3), groups=["a", "b"])
    with pytest.raises(ValueError, match="k"):
        lm.retrieval_metrics(np.eye(3), ks=(0,))


# --------------------------------------------------------------------------- own vs other AUROC
def test_own_vs_other_auroc_by_hand_with_tie():
    x = np.array([[0.5, 0.5, 0.2],
                  [0.9, 0.4, 0.4],
                  [0.1, 0.3, 0.2]])
    res = lm.own_vs_other_auroc(x)
    # row 0: 0.5 vs {0.5 tie, 0.2 win} = 0.75; row 1: 0.4 vs {0.9 loss, 0.4 tie} = 0.25; row 2: {win, loss} = 0.5
    assert res["per_query"] == [0.75, 0.25, 0.5]
    assert res["mean"] == 0.5 and res["n_queries"] == 3 and res["n_skipped"] == 0
    grouped = lm.own_vs_other_auroc(x, groups=["a", "a", "b"])
    # rows 0 and 1 only count column 2: win (1.0) and tie (0.5); row 2 counts columns 0 and 1: 0.5
    assert grouped["per_query"] == [1.0, 0.5, 0.5]
    assert grouped["mean"] == pytest.approx(2 / 3)
    single = lm.own_vs_other_auroc(x, groups=["a", "a", "a"])
    assert single == {"mean": None, "per_query": [None, None, None], "n_queries": 0, "n_skipped": 3}


def test_own_vs_other_auroc_equals_sklearn_per_row():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, size=(9, 9)).astype(float)
    groups = [0, 0, 1, 2, 2, 2, 3, 4, 4]
    res = lm.own_vs_other_auroc(x, groups=groups)
    for i in range(9):
        neg = [j for j in range(9) if groups[j] != groups[i]]
        y = np.r_[1, np.zeros(len(neg))]
        s = np.r_[x[i, i], x[i, neg]]
        assert res["per_query"][i] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_mean_ci_is_reproducible_and_seed_dependent():
    v = np.random.default_rng(5).normal(size=200)
    a = lm.bootstrap_mean_ci(v, n_resamples=300, seed=7)
    b = lm.bootstrap_mean_ci(v, n_resamples=300, seed=7)
    c = lm.bootstrap_mean_ci(v, n_resamples=300, seed=8)
    assert a == b
    assert (a["low"], a["high"]) != (c["low"], c["high"])
    assert a["mean"] == pytest.approx(v.mean()) and a["seed"] == 7 and a["n_skipped"] == 0


def test_bootstrap_mean_ci_matches_direct_percentile_computation():
    v = np.arange(30, dtype=float) ** 2
    res = lm.bootstrap_mean_ci(v, n_resamples=500, seed=11, level=0.9)
    rng = np.random.default_rng(11)
    means = v[rng.integers(0, 30, size=(500, 30))].mean(axis=1)
    assert (res["low"], res["high"]) == tuple(np.percentile(means, [5.0, 95.0]))


def test_bootstrap_mean_ci_width_matches_normal_theory():
    v = np.random.default_rng(6).normal(size=400)
    res = lm.bootstrap_mean_ci(v, n_resamples=2000, seed=0)
    half = (res["high"] - res["low"]) / 2
    assert half == pytest.approx(1.96 * v.std() / math.sqrt(400), rel=0.15)
    assert res["low"] < v.mean() < res["high"]
    const = lm.bootstrap_mean_ci(np.full(10, 3.5), n_resamples=50)
    assert (const["low"], const["high"]) == (3.5, 3.5)


def test_bootstrap_auroc_ci_separated_scores_and_skip_count():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    res = lm.bootstrap_auroc_ci(y, s, n_resamples=400, seed=3)
    assert res["auroc"] == 1.0 and (res["low"], res["high"]) == (1.0, 1.0)
    # the skipped resamples are exactly the draws with one class only
    rng = np.random.default_rng(3)
    one_class = sum(len(set(y[rng.integers(0, 5, size=5)])) == 1 for _ in range(400))
    assert one_class > 0 and res["n_skipped"] == one_class
    assert res == lm.bootstrap_auroc_ci(y, s, n_resamples=400, seed=3)
    other = lm.bootstrap_auroc_ci(y, s[::-1], n_resamples=400, seed=3)
    assert other["auroc"] == 0.0 and other["high"] < 0.5


def test_bootstrap_auroc_ci_depends_on_seed():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, size=100)
    s = y + rng.normal(0, 1.0, size=100)
    a = lm.bootstrap_auroc_ci(y, s, n_resamples=200, seed=0)
    b = lm.bootstrap_auroc_ci(y, s, n_resamples=200, seed=1)
    assert a["auroc"] == b["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert (a["low"], a["high"]) != (b["low"], b["high"])
    assert a["low"] < a["auroc"] < a["high"]


# --------------------------------------------------------------------------- zero-shot classification
def test_binary_prompt_probability_is_chexzero_softmax():
    p = lm.binary_prompt_probability(np.array([0.3, 0.0, -0.5]), np.array([0.1, 0.0, 0.5]))
    assert p[0] == pytest.approx(1 / (1 + math.exp(-0.2)), abs=1e-15)
    assert p[1] == 0.5
    assert p[2] == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(0.5)), abs=1e-15)
    # stable where exp overflows
    big = lm.binary_prompt_probability(np.array([1000.0, -1000.0]), np.array([999.0, 1000.0]))
    assert big[0] == pytest.approx(1 / (1 + math.exp(-1.0))) and big[1] == 0.0
    with pytest.raises(ValueError):
        lm.binary_prompt_probability(np.zeros(2), np.zeros(3))


def test_auroc_per_label_masks_missing_and_skips_one_class():
    y = np.array([[1, 0, 1],
                  [0, 0, np.nan],
                  [1, 0, 0],
                  [0, 0, np.nan],
                  [np.nan, 0, 1],
                  [1, 0, 0]], dtype=float)
    s = np.array([[0.9, 0.1, 0.8],
                  [0.2, 0.2, 0.99],  # the NaN rows of label c score high: counted, they would break AUROC 1
                  [0.4, 0.3, 0.3],
                  [0.5, 0.4, 0.99],
                  [0.1, 0.5, 0.7],
                  [0.6, 0.6, 0.1]])
    res = lm.auroc_per_label(y, s, ["a", "b", "c"], n_resamples=200, seed=0)
    # a: positives {0.9, 0.4, 0.6} vs negatives {0.2, 0.5}: pairs won 2 + 1 + 2 of 6
    assert res["per_label"]["a"]["auroc"] == pytest.approx(5 / 6)
    assert res["per_label"]["a"]["n"] == 5
    assert res["per_label"]["b"] == {"auroc": None, "low": None, "high": None, "n": 6, "n_skipped": 200}
    assert res["per_label"]["c"]["auroc"] == 1.0 and res["per_label"]["c"]["n"] == 4
    assert res["undefined"] == ["b"]
    assert res["mean"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert res["mean_low"] <= res["mean"] <= res["mean_high"]


def test_auroc_per_label_single_column_equals_bootstrap_auroc_ci():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, size=60).astype(float)
    s = y * 0.5 + rng.random(60)
    res = lm.auroc_per_label(y[:, None], s[:, None], ["x"], n_resamples=150, seed=4)
    ref = lm.bootstrap_auroc_ci(y, s, n_resamples=150, seed=4)
    got = res["per_label"]["x"]
    assert (got["auroc"], got["low"], got["high"], got["n_skipped"]) == (ref["auroc"], ref["low"], ref["high"],
                                                                          ref["n_skipped"])
    assert (res["mean_low"], res["mean_high"]) == (ref["low"], ref["high"])


def test_multiclass_report_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 1]
    res = lm.multiclass_report(np.array(y_true), np.array(y_pred), ["a", "b", "c"])
    assert res["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 1, 2]]
    assert res["accuracy"] == pytest.approx(5 / 9)
    # precision by column: 2/3, 1/3, 2/3; recall by row: 2/3, 1/2, 1/2; F1: 2/3, 2/5, 4/7
    assert res["precision_macro"] == pytest.approx(5 / 9)
    assert res["recall_macro"] == pytest.approx(5 / 9)
    assert res["f1_macro"] == pytest.approx((2 / 3 + 2 / 5 + 4 / 7) / 3)
    assert res["per_class"]["b"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert res["per_class"]["c"]["f1"] == pytest.approx(4 / 7)
    # a class in class_names with no images and no predictions scores 0 (zero_division=0) and counts in macro
    four = lm.multiclass_report(np.array(y_true), np.array(y_pred), ["a", "b", "c", "d"])
    assert four["precision_macro"] == pytest.approx(5 / 12)
    assert four["confusion_matrix"][3] == [0, 0, 0, 0] and four["per_class"]["d"]["support"] == 0
    with pytest.raises(ValueError, match="outside"):
        lm.multiclass_report(np.array([0, 3]), np.array([0, 1]), ["a", "b"])


# --------------------------------------------------------------------------- class-based retrieval
def test_class_precision_at_k_by_hand_with_ties_and_clipped_k():
    x = np.array([[0.9, 0.8, 0.8, 0.1],    # order 0, 1, 2, 3 (tie 1 before 2) -> labels 0, 1, 0, 1
                  [0.5, 0.5, 0.5, 0.6]])   # order 3, 0, 1, 2 -> labels 1, 0, 1, 0
    res = lm.class_precision_at_k(x, np.array([0, 1]), np.array([0, 1, 0, 1]), ks=(1, 2, 3, 10))
    # query 0: 1, 1/2, 2/3, 2/4; query 1: 1, 1/2, 2/3, 2/4
    assert res["P@1"] == 1.0
    assert res["P@2"] == 0.5
    assert res["P@3"] == pytest.approx(2 / 3)
    assert res["P@10"] == 0.5
    assert res["k_used"] == {"P@1": 1, "P@2": 2, "P@3": 3, "P@10": 4}
    assert res["n_queries"] == 2 and res["n_items"] == 4
    # if the tie in row 0 went the other way P@2 of query 0 would be 1, the mean 0.75
    swapped = lm.class_precision_at_k(x[:, [0, 2, 1, 3]], np.array([0, 1]), np.array([0, 0, 1, 1]), ks=(2,))
    assert swapped["P@2"] == 0.75


# --------------------------------------------------------------------------- alignment baselines
def test_alignment_baselines_identical_projections():
    z = np.random.default_rng(12).normal(size=(20, 8))
    res = lm.alignment_baselines(z, 3.0 * z, n_resamples=100)
    assert res["true_pair"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["true_pair"]["low"] == pytest.approx(0.0, abs=1e-12)
    assert res["true_pair"]["high"] == pytest.approx(0.0, abs=1e-12)
    assert res["true_minus_shuffled"]["high"] < 0
    assert res["n"] == 20


def test_alignment_baselines_equal_brute_force():
    rng = np.random.default_rng(13)
    za, zt = rng.normal(size=(15, 6)), rng.normal(size=(15, 6)) + 0.5

    def loss(a, t):
        return 4 - 4 * float(a @ t) / (np.linalg.norm(a) * np.linalg.norm(t))

    res = lm.alignment_baselines(za, zt, n_resamples=100, seed=2)
    full = np.array([[loss(za[i], zt[j]) for j in range(15)] for i in range(15)])
    off = ~np.eye(15, dtype=bool)
    assert res["true_pair"]["mean"] == pytest.approx(np.diag(full).mean(), abs=1e-9)
    assert res["shuffled"]["mean"] == pytest.approx(full[off].mean(), abs=1e-9)
    mean_text = zt.mean(axis=0)
    assert res["constant"]["mean"] == pytest.approx(np.mean([loss(mean_text, zt[i]) for i in range(15)]), abs=1e-9)
    per_pair = np.diag(full) - np.array([full[i, off[i]].mean() for i in range(15)])
    assert res["true_minus_shuffled"]["mean"] == pytest.approx(per_pair.mean(), abs=1e-9)
    ref = lm.bootstrap_mean_ci(per_pair, n_resamples=100, seed=2)
    assert res["true_minus_shuffled"]["low"] == pytest.approx(ref["low"], abs=1e-9)
    assert res["true_minus_shuffled"]["high"] == pytest.approx(ref["high"], abs=1e-9)


def test_class_precision_at_k_equals_stable_sort_brute_force_on_many_ties():
    rng = np.random.default_rng(14)
    x = rng.integers(0, 3, size=(6, 300)).astype(float)
    q, items = rng.integers(0, 5, size=6), rng.integers(0, 5, size=300)
    res = lm.class_precision_at_k(x, q, items, ks=(5, 10, 100))
    order = torch.argsort(torch.as_tensor(x), dim=1, descending=True, stable=True).numpy()
    for k in (5, 10, 100):
        assert res[f"P@{k}"] == pytest.approx(np.mean(items[order[:, :k]] == q[:, None]), abs=1e-12)


def test_prompts_file_is_declared_utf8_and_refuses_a_duplicate_class(tmp_path):
    """The text-read rules of issue 22 hold for eval --prompts too: UTF-8 (BOM tolerated), a bad byte one
    line naming the line, a class given twice refused naming both lines."""
    from pipeline.downstream.prompts import PromptsError, load_prompts_file

    ok = tmp_path / "ok.yaml"
    ok.write_text("\ufeffA:\n  positive: [a]\n  negative: [no a]\n", encoding="utf-8")
    assert load_prompts_file(ok, ["A"], "binary") == {"A": {"positive": ["a"], "negative": ["no a"]}}
    dup = tmp_path / "dup.yaml"
    dup.write_text("A: [one]\nB: [two]\nA: [three]\n", encoding="utf-8")
    with pytest.raises(PromptsError, match=r"dup.yaml: key 'A' is given twice \(lines 1 and 3\)"):
        load_prompts_file(dup, ["A", "B"], "chexpert5x200")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("A: [one]\nB: [cr\xe8me]\n".encode("latin-1"))
    with pytest.raises(PromptsError, match=r"latin.yaml: line 2: not valid UTF-8"):
        load_prompts_file(latin, ["A", "B"], "chexpert5x200")
