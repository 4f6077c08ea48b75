"""Metrics of zero-shot classification and image <-> report retrieval, as the field's reference code defines them.

Numpy in, plain Python floats / lists / dicts out (JSON-ready: an undefined value is ``None``). What each
function follows (facts taken from the references; the code is our own):

- ``clip_ranks`` and ``retrieval_metrics``: open_clip ``src/open_clip_train/train.py::get_clip_metrics``
  (``ranking = argsort(logit, descending=True)``; ``preds = where(ranking == ground_truth)[1]``;
  ``mean_rank = preds.mean() + 1``; ``median_rank = floor(median(preds)) + 1``; ``R@k = mean(preds < k)``),
  with ``image_to_text`` on the rows of the logits and ``text_to_image`` on its transpose. open_clip leaves
  ties to ``torch.argsort`` (unspecified order); we fix them as a stable descending sort (see ``clip_ranks``).
  The ``_same_text`` variants, the chance levels and ``own_vs_other_auroc`` are ours: a report corpus holds
  many identical reports ("No acute cardiopulmonary process."), and the strict metric counts a different
  image with the same words as a miss.
- ``binary_prompt_probability``: CheXzero ``zero_shot.py::run_softmax_eval`` (softmax over the cosine
  similarities of the positive and the negative prompt, ``exp(pos) / (exp(pos) + exp(neg))``).
- ``bootstrap_auroc_ci`` and ``auroc_per_label``: CheXzero ``eval.py::bootstrap`` / ``compute_cis`` (1,000
  resamples of the test images with replacement, a fixed seed, the AUROC of every label on each resample,
  a 95% interval from the sorted resampled values). Differences, on purpose: numpy's ``default_rng(seed)``
  instead of ``sklearn.utils.resample(random_state=i)``; ``np.percentile`` (linear interpolation) instead of
  CheXzero's order statistics ``sorted[int(0.025 n) - 1]`` / ``sorted[int(0.975 n) - 1]``; and a resample
  whose labels are all one class is skipped and counted (CheXzero's ``roc_curve`` returns NaN there and
  the NaN enters its sort). ``bootstrap_mean_ci`` is the same percentile bootstrap of a mean.
- ``multiclass_report``: sklearn ``accuracy_score``, ``precision_recall_fscore_support`` (macro,
  ``zero_division=0``) and ``confusion_matrix`` (row = true class, column = predicted class).
- ``class_precision_at_k``: GLoRIA's class-based retrieval Precision@K (Huang et al., ICCV 2021, the
  CheXpert 5x200 retrieval experiment: the share of the top K retrieved items whose class equals the
  query's). The public repository (marshuang80/gloria) ships no retrieval script, so the definition is the
  paper's; ties are broken by the same stable rule as ``clip_ranks``.
- ``alignment_baselines``: the M-FLAG alignment loss (``pipeline/pretrain/losses.py::alignment_loss``, after the
  original code: (2 - 2cos) + (2 - 2cos) per pair) for true pairs, a constant prediction and all mismatched
  pairs.
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import numpy as np

from pipeline.downstream.metrics import auroc_per_class

# Rows per block when a (N, N) matrix is sorted row by row: bounds the int64 scratch to ~64 MiB at N = 8192.
_ROW_BLOCK = 1024

METRIC_DEFINITIONS = {
    "rank": "0-based position of the true item in the query's row sorted by descending score; ties broken "
            "as a stable sort (among equal scores the lower column index comes first)",
    "mean_rank": "mean over queries of rank + 1 (open_clip get_clip_metrics)",
    "median_rank": "floor(median over queries of rank) + 1 (open_clip get_clip_metrics)",
    "R@k": "share of queries whose true item has rank < k (open_clip get_clip_metrics)",
    "R@k_same_text": "share of queries for which some item of the true item's group (an identical report) has "
                     "rank < k",
    "chance": "expected R@k of a uniformly random ranking: k/N strict, mean over queries of "
              "1 - C(N - g, k) / C(N, k) with g the size of the query's group for R@k_same_text",
    "own_vs_other_auroc": "per query, the AUROC of its own score against its scores with the items of other "
                          "groups (ties count 1/2), averaged over queries",
    "P@K": "GLoRIA class-based Precision@K: share of the top-K retrieved items whose class equals the query's, "
           "averaged over queries; K is clipped to the number of items",
    "bootstrap_ci": "percentile interval of the statistic over resamples with replacement (numpy default_rng(seed)); "
                    "AUROC resamples with one class only are skipped and counted",
}


# --------------------------------------------------------------------------- ranks
def _square_scores(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (N, N) score matrix, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("the score matrix contains NaN; ranks are undefined")
    return x


def _row_positions(block: np.ndarray) -> np.ndarray:
    """pos[r, j]: 0-based place of column j in row r sorted by descending score, ties by lower column first."""
    order = np.argsort(-block, axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(block.shape[1]), block.shape), axis=1)
    return pos


def _group_ids(groups: Sequence[Hashable], n: int) -> np.ndarray:
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} pairs")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64)


def _true_and_group_ranks(x: np.ndarray, gid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rank of column i in row i, and (with groups) the best rank of any column of row i's group."""
    n = x.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=np.int64) if gid is not None else None
    for lo in range(0, n, _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, n)
        pos = _row_positions(x[lo:hi])
        rows = np.arange(lo, hi)
        ranks[lo:hi] = pos[rows - lo, rows]
        if gid is not None:
            same = gid[rows][:, None] == gid[None, :]
            best[lo:hi] = np.where(same, pos, n).min(axis=1)
    return ranks, best


def clip_ranks(logits) -> np.ndarray:
    """0-based rank of the true item (column i) in each row i of a square (N, N) score matrix.

    As open_clip's ``get_clip_metrics`` with the ties fixed: the row is sorted by descending score with a
    stable sort (``torch.argsort(row, descending=True, stable=True)``), so
    rank_i = #{j: s_ij > s_ii} + #{j < i: s_ij == s_ii}. Returns an int64 array of length N.
    """
    ranks, _ = _true_and_group_ranks(_square_scores(logits), None)
    return ranks


# --------------------------------------------------------------------------- retrieval
def _hit_chance(n: int, g: int, k: int) -> float:
    """P(at least one of g marked items among the first k of a uniformly random order of n items)."""
    if k >= n - g + 1:
        return 1.0
    miss = 1.0  # C(n - g, k) / C(n, k) as a product, so no huge integers are formed
    for t in range(k):
        miss *= (n - g - t) / (n - t)
    return 1.0 - miss


def _rank_summary(ranks: np.ndarray, ks: Sequence[int], best: np.ndarray | None) -> dict:
    out = {
        "mean_rank": float(ranks.mean() + 1),
        "median_rank": float(math.floor(float(np.median(ranks))) + 1),
    }
    for k in ks:
        out[f"R@{k}"] = float((ranks < k).mean())
    if best is not None:
        for k in ks:
            out[f"R@{k}_same_text"] = float((best < k).mean())
    return out


def retrieval_metrics(logits, groups: Sequence[Hashable] | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image <-> text retrieval metrics of a square (N, N) image x text score matrix whose pair i is (i, i).

    ``image_to_text`` ranks each row, ``text_to_image`` each column (open_clip's names and +1 conventions).
    With ``groups`` (one hashable per pair, equal for pairs with the same report) each direction also gets
    ``R@k_same_text`` (a hit when any item of the true item's group is in the top k), and ``chance`` gets
    the same-text chance level. ``n_pairs`` and the strict chance k/N are always reported.
    """
    x = _square_scores(logits)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    n = x.shape[0]
    gid = _group_ids(groups, n) if groups is not None else None
    out: dict = {}
    for name, mat in (("image_to_text", x), ("text_to_image", x.T)):
        ranks, best = _true_and_group_ranks(mat, gid)
        out[name] = _rank_summary(ranks, ks, best)
    out["n_pairs"] = n
    chance = {f"R@{k}": min(k, n) / n for k in ks}
    if gid is not None:
        sizes = np.bincount(gid)[gid]
        out["n_distinct_texts"] = int(gid.max() + 1)
        for k in ks:
            per_size = {int(g): _hit_chance(n, int(g), k) for g in np.unique(sizes)}
            chance[f"R@{k}_same_text"] = float(np.mean([per_size[int(g)] for g in sizes]))
    out["chance"] = chance
    return out


def own_vs_other_auroc(logits, groups: Sequence[Hashable] | None = None) -> dict:
    """Per row i of a square (N, N) score matrix, the AUROC of s_ii against s_ij over the columns j of other
    groups (all j != i without groups), ties counting 1/2; the mean over rows that have such a column.

    Returns ``{"mean", "per_query" (None for a skipped row), "n_queries", "n_skipped"}``.
    """
    x = _square_scores(logits)
    n = x.shape[0]
    gid = _group_ids(groups, n) if groups is not None else np.arange(n)
    per: list[float | None] = []
    for lo in range(0, n, _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, n)
        rows = np.arange(lo, hi)
        block = x[lo:hi]
        own = block[rows - lo, rows][:, None]
        valid = gid[rows][:, None] != gid[None, :]
        n_neg = valid.sum(axis=1)
        score = ((block < own) & valid).sum(axis=1) + 0.5 * ((block == own) & valid).sum(axis=1)
        per.extend(float(s / m) if m else None for s, m in zip(score, n_neg))
    defined = [v for v in per if v is not None]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "per_query": per,
        "n_queries": len(defined),
        "n_skipped": n - len(defined),
    }


# --------------------------------------------------------------------------- bootstrap
def _interval(stats: Sequence[float], level: float) -> tuple[float | None, float | None]:
    if len(stats) == 0:
        return None, None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(np.asarray(stats, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def _check_level(level: float, n_resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def bootstrap_mean_ci(values, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the mean of 1-D per-item ``values`` (items resampled with replacement).

    Returns ``{"mean", "low", "high", "n_resamples", "n_skipped" (always 0), "seed", "level"}``; the same
    values and seed give the same interval.
    """
    _check_level(level, n_resamples)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError(f"expected a non-empty 1-D array of finite values, got shape {v.shape}")
    rng = np.random.default_rng(seed)
    n = len(v)
    means = np.empty(n_resamples)
    step = max(1, 2**22 // n)  # resamples per draw, so the index block stays ~32 MiB
    for lo in range(0, n_resamples, step):
        hi = min(lo + step, n_resamples)
        means[lo:hi] = v[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    low, high = _interval(means, level)
    return {"mean": float(v.mean()), "low": low, "high": high, "n_resamples": n_resamples, "n_skipped": 0,
            "seed": seed, "level": level}


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    return auroc_per_class(y[:, None], s[:, None])[0]


def _bootstrap_aurocs(y_true: np.ndarray, scores: np.ndarray, n_resamples: int, seed: int):
    """CheXzero's scheme for an (N, L) label matrix (NaN = missing): each resample draws N images with
    replacement once, and every label is scored on the drawn images that carry it. Yields, per resample,
    the list of L AUROCs (None where the drawn labels of that column are one class)."""
    rng = np.random.default_rng(seed)
    n = y_true.shape[0]
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        yr, sr = y_true[idx], scores[idx]
        out = []
        for c in range(y_true.shape[1]):
            keep = ~np.isnan(yr[:, c])
            out.append(_binary_auroc(yr[keep, c], sr[keep, c]) if keep.any() else None)
        yield out


def _as_binary(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    known = y[~np.isnan(y)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (missing)")
    return y, s


def bootstrap_auroc_ci(y_true, y_score, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the AUROC of 0/1 ``y_true`` against ``y_score`` (N images resampled
    with replacement, CheXzero's eval bootstrap); a resample with one class only is skipped and counted.

    Returns ``{"auroc", "low", "high", "n_resamples", "n_skipped", "seed", "level"}``; ``low``/``high`` are
    None when every resample was skipped, ``auroc`` None when the full sample has one class.
    """
    _check_level(level, n_resamples)
    y, s = _as_binary(y_true, y_score)
    if y.ndim != 1 or len(y) == 0 or np.isnan(y).any():
        raise ValueError(f"expected non-empty 1-D labels without NaN, got shape {y.shape}")
    stats = [r[0] for r in _bootstrap_aurocs(y[:, None], s[:, None], n_resamples, seed)]
    kept = [v for v in stats if v is not None]
    low, high = _interval(kept, level)
    return {"auroc": _binary_auroc(y, s), "low": low, "high": high, "n_resamples": n_resamples,
            "n_skipped": n_resamples - len(kept), "seed": seed, "level": level}


def auroc_per_label(y_true, scores, names: Sequence[str], n_resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Per-label AUROC of (N, L) 0/1 labels (NaN = missing, masked per label) against (N, L) scores, with
    CheXzero-style bootstrap intervals: each resample draws the images once for all labels.

    Returns ``{"per_label": {name: {"auroc", "low", "high", "n", "n_skipped"}}, "mean" (over the defined
    labels), "mean_low"/"mean_high" (interval of that mean; resamples where a defined label is one class are
    skipped), "n_skipped_mean", "undefined" (labels with one class in the full sample), "n_resamples",
    "seed", "level"}``.
    """
    _check_level(level, n_resamples)
    y, s = _as_binary(y_true, scores)
    names = list(names)
    if y.ndim != 2 or len(y) == 0 or y.shape[1] != len(names):
        raise ValueError(f"expected (N, L) labels with L = {len(names)} names, got shape {y.shape}")
    point = []
    for c in range(y.shape[1]):
        keep = ~np.isnan(y[:, c])
        point.append(_binary_auroc(y[keep, c], s[keep, c]) if keep.any() else None)
    defined = [c for c, v in enumerate(point) if v is not None]
    per_label_stats: list[list[float]] = [[] for _ in names]
    mean_stats: list[float] = []
    for res in _bootstrap_aurocs(y, s, n_resamples, seed):
        for c in defined:
            if res[c] is not None:
                per_label_stats[c].append(res[c])
        if defined and all(res[c] is not None for c in defined):
            mean_stats.append(float(np.mean([res[c] for c in defined])))
    per_label = {}
    for c, name in enumerate(names):
        low, high = _interval(per_label_stats[c], level) if point[c] is not None else (None, None)
        per_label[name] = {"auroc": point[c], "low": low, "high": high, "n": int((~np.isnan(y[:, c])).sum()),
                           "n_skipped": n_resamples - len(per_label_stats[c])}
    mean_low, mean_high = _interval(mean_stats, level)
    return {
        "per_label": per_label,
        "mean": float(np.mean([point[c] for c in defined])) if defined else None,
        "mean_low": mean_low,
        "mean_high": mean_high,
        "n_skipped_mean": n_resamples - len(mean_stats),
        "undefined": [names[c] for c, v in enumerate(point) if v is None],
        "n_resamples": n_resamples,
        "seed": seed,
        "level": level,
    }


# --------------------------------------------------------------------------- zero-shot classification
def binary_prompt_probability(pos_scores, neg_scores) -> np.ndarray:
    """CheXzero's positive/negative prompt softmax: exp(p) / (exp(p) + exp(n)) per element, computed as the
    logistic function of p - n (equal, and finite for any finite scores). Arrays of the same shape."""
    from scipy.special import expit

    p = np.asarray(pos_scores, dtype=np.float64)
    q = np.asarray(neg_scores, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"positive {p.shape} and negative {q.shape} scores differ in shape")
    return expit(p - q)


def multiclass_report(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1 (``zero_division=0``), per-class precision/recall/F1/support and
    the confusion matrix (rows = true class, columns = predicted class, both in ``class_names`` order) of
    integer class indices ``y_true`` and ``y_pred`` (N,)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    yt = np.asarray(y_true).astype(np.int64)
    yp = np.asarray(y_pred).astype(np.int64)
    names = list(class_names)
    if yt.shape != yp.shape or yt.ndim != 1 or len(yt) == 0:
        raise ValueError(f"expected two non-empty (N,) index arrays, got {yt.shape} and {yp.shape}")
    bad = np.setdiff1d(np.concatenate([yt, yp]), np.arange(len(names)))
    if len(bad):
        raise ValueError(f"class indices {bad.tolist()} outside 0..{len(names) - 1}")
    labels = list(range(len(names)))
    p_macro, r_macro, f_macro, _ = precision_recall_fscore_support(yt, yp, labels=labels, average="macro",
                                                                   zero_division=0)
    p, r, f, support = precision_recall_fscore_support(yt, yp, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(yt, yp)),
        "precision_macro": float(p_macro),
        "recall_macro": float(r_macro),
        "f1_macro": float(f_macro),
        "confusion_matrix": confusion_matrix(yt, yp, labels=labels).tolist(),
        "confusion_matrix_axes": "rows = true class, columns = predicted class, in class_names order",
        "per_class": {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                             "support": int(support[c])} for c, name in enumerate(names)},
        "class_names": names,
        "n": int(len(yt)),
    }


# --------------------------------------------------------------------------- class-based retrieval
def class_precision_at_k(logits, query_labels, item_labels, ks: Sequence[int] = (5, 10, 100)) -> dict:
    """GLoRIA's Precision@K of a (Q, I) query x item score matrix: per query, the share of its top-K items
    (stable descending sort, as ``clip_ranks``) whose label equals the query's, averaged over queries.

    Keys ``P@{K}`` use the K asked for; ``k_used[f"P@{K}"]`` is min(K, I), the K actually applied.
    """
    x = np.asarray(logits, dtype=np.float64)
    ql = np.asarray(query_labels)
    il = np.asarray(item_labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or ql.shape != (x.shape[0],) or il.shape != (x.shape[1],):
        raise ValueError(f"expected (Q, I) scores with Q query labels and I item labels, got {x.shape}, "
                         f"{ql.shape}, {il.shape}")
    if np.isnan(x).any():
        raise ValueError("the score matrix contains NaN; the ranking is undefined")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    n_items = x.shape[1]
    used = {k: min(k, n_items) for k in ks}
    hits = {k: 0.0 for k in ks}
    for lo in range(0, x.shape[0], _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, x.shape[0])
        order = np.argsort(-x[lo:hi], axis=1, kind="stable")[:, :max(used.values())]
        match = il[order] == ql[lo:hi, None]
        for k in ks:
            hits[k] += float(match[:, :used[k]].mean(axis=1).sum())
    n_q = x.shape[0]
    out: dict = {f"P@{k}": hits[k] / n_q for k in ks}
    out["k_used"] = {f"P@{k}": used[k] for k in ks}
    out["n_queries"] = n_q
    out["n_items"] = n_items
    return out


# --------------------------------------------------------------------------- alignment baselines
def _unit_rows(z: np.ndarray) -> np.ndarray:
    # eps as torch.nn.functional.normalize, so a zero row gives cos 0 (loss 4) as in training
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def alignment_baselines(za, zt, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The M-FLAG alignment loss 4 - 4cos(za_i, zt_i) of (N, P) image / text projections (pair = row), next
    to what it would be without learning anything.

    - ``true_pair``: mean over pairs i of 4 - 4cos(za_i, zt_i);
    - ``constant``: every image predicts the mean of the zt rows (the mean projected text): mean over i of
      4 - 4cos(mean(zt), zt_i);
    - ``shuffled``: the exact expectation under a random re-pairing, the mean over all i != j of
      4 - 4cos(za_i, zt_j), from normalised sums in O(N P);
    - ``true_minus_shuffled``: per pair i, loss_ii - mean_{j != i} loss_ij (negative when true pairs are
      closer than the others), averaged.

    Each entry is ``{"mean", "low", "high", ...}`` from ``bootstrap_mean_ci`` over the per-pair values (for
    ``shuffled``, the per-row means over j != i, whose mean is the all-pairs mean); plus ``"n"``.
    """
    a = np.asarray(za, dtype=np.float64)
    t = np.asarray(zt, dtype=np.float64)
    if a.ndim != 2 or a.shape != t.shape or a.shape[0] < 2:
        raise ValueError(f"expected two (N, P) arrays of equal shape with N >= 2, got {a.shape} and {t.shape}")
    if not (np.isfinite(a).all() and np.isfinite(t).all()):
        raise ValueError("projections must be finite")
    n = a.shape[0]
    ua, ut = _unit_rows(a), _unit_rows(t)
    cos_true = (ua * ut).sum(axis=1)
    loss_true = 4.0 - 4.0 * cos_true
    loss_const = 4.0 - 4.0 * (ut @ _unit_rows(t.mean(axis=0, keepdims=True))[0])
    # mean_{j != i} cos(a_i, t_j) = (a_i . sum_j t_j - a_i . t_i) / (N - 1)
    loss_other = 4.0 - 4.0 * (ua @ ut.sum(axis=0) - cos_true) / (n - 1)

    def entry(values: np.ndarray) -> dict:
        return bootstrap_mean_ci(values, n_resamples=n_resamples, seed=seed, level=level)

    return {
        "true_pair": entry(loss_true),
        "constant": entry(loss_const),
        "shuffled": entry(loss_other),
        "true_minus_shuffled": entry(loss_true - loss_other),
        "n": n,
    }
