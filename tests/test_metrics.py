"""Sanity of the downstream metrics: perfect, random and hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from pipeline.downstream import metrics


# --------------------------------------------------------------------------- classification
def test_auroc_perfect_and_inverted():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], float)
    assert metrics.mean_auroc(y, y * 0.8 + 0.1) == 1.0
    assert metrics.mean_auroc(y, 1 - y) == 0.0


def test_auroc_shuffled_is_near_half():
    rng = np.random.default_rng(0)
    y = (rng.random((4000, 3)) < 0.3).astype(float)
    scores = y + rng.normal(0, 0.01, y.shape)
    shuffled = scores[rng.permutation(len(scores))]
    assert metrics.mean_auroc(y, shuffled) == pytest.approx(0.5, abs=0.03)


def test_auroc_class_without_positives_is_left_out():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], float)
    s = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    assert metrics.auroc_per_class(y, s) == [1.0, None]
    assert metrics.mean_auroc(y, s) == 1.0
    res = metrics.classification_metrics(y, s, "multilabel", ["a", "b"])
    assert res["auroc_undefined"] == ["b"]
    assert math.isnan(metrics.mean_auroc(y[:, 1:], s[:, 1:]))


def test_accuracy_one_hot_and_indices():
    y = np.eye(3)[[0, 1, 2, 1]]
    s = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    assert metrics.accuracy(y, s) == 0.75
    assert metrics.accuracy(np.array([0, 1, 2, 1]), s) == 0.75
    res = metrics.classification_metrics(y, s, "multiclass", ["a", "b", "c"])
    assert res["accuracy"] == 0.75 and 0 <= res["auroc"] <= 1


def test_auroc_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.auroc_per_class(np.zeros((3, 2)), np.zeros((3, 3)))


# --------------------------------------------------------------------------- segmentation
def test_dice_perfect_and_definition_of_empty_masks():
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[0, 2:5, 2:5] = 1
    gt[1, 0:2, 0:8] = 1  # image 2 is empty in truth
    res = metrics.dice_scores(gt, gt)
    assert res["dice"] == 1.0 and res["dice_pooled"] == 1.0 and res["dice_positive"] == 1.0
    assert res["n_positive"] == 2
    # empty vs empty counts 1; a false positive on an empty image counts 0
    pred = gt.copy()
    pred[2, 0, 0] = 1
    res = metrics.dice_scores(pred, gt)
    assert res["dice"] == pytest.approx(2 / 3)
    assert res["dice_positive"] == 1.0
    assert res["dice_pooled"] == pytest.approx(2 * 25 / (25 + 1 + 25))


def test_dice_hand_computed_partial_overlap():
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, :, :2] = 1  # 8 pixels
    pred = np.zeros_like(gt)
    pred[0, :2, :] = 1  # 8 pixels, 4 shared
    acc = metrics.DiceAccumulator()
    acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert acc.compute()["dice"] == pytest.approx(0.5)


def test_dice_all_empty_masks_is_one():
    z = np.zeros((2, 5, 5), np.uint8)
    res = metrics.dice_scores(z, z)
    assert res["dice"] == 1.0 and res["dice_pooled"] == 1.0 and math.isnan(res["dice_positive"])


# --------------------------------------------------------------------------- detection
def _t(boxes):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)}


def test_map_perfect_predictions_is_one():
    targets = [_t([[10, 10, 50, 60]]), _t([[5, 5, 20, 20], [30, 30, 90, 80]]), _t([])]
    preds = [{**t, "scores": torch.ones(len(t["boxes"]))} for t in targets]
    res = metrics.detection_map(preds, targets)
    assert res["map_40_75"] == pytest.approx(1.0)
    assert res["map_coco"] == pytest.approx(1.0)
    assert res["map_50"] == pytest.approx(1.0)
    assert res["n_gt_boxes"] == 3


def test_map_paper_range_differs_from_coco_on_loose_boxes():
    # each prediction overlaps its target with IoU 0.62: a hit at 0.40..0.60, a miss above
    targets = [_t([[0, 0, 100, 100]]) for _ in range(4)]
    preds = [{**_t([[0, 0, 100, 62]]), "scores": torch.tensor([0.9])} for _ in range(4)]
    res = metrics.detection_map(preds, targets)
    # 0.40,0.45,...,0.60 hit (5 of 8 thresholds); COCO 0.50,0.55,0.60 hit (3 of 10)
    assert res["map_40_75"] == pytest.approx(5 / 8, abs=0.01)
    assert res["map_coco"] == pytest.approx(3 / 10, abs=0.01)
    assert res["map_50"] == pytest.approx(1.0)


def test_map_no_ground_truth_is_undefined_and_misses_score_zero():
    preds = [{**_t([[0, 0, 10, 10]]), "scores": torch.tensor([0.5])}]
    assert math.isnan(metrics.detection_map(preds, [_t([])])["map_40_75"])
    far = [{**_t([[200, 200, 220, 220]]), "scores": torch.tensor([0.5])}]
    assert metrics.detection_map(far, [_t([[0, 0, 10, 10]])])["map_40_75"] == pytest.approx(0.0)


def test_primary_metric_names():
    assert metrics.primary_metric("cls", "multilabel") == "auroc"
    assert metrics.primary_metric("cls", "multiclass") == "accuracy"
    assert metrics.primary_metric("seg") == "dice"
    assert metrics.primary_metric("det") == "map_40_75"
    for k in ("auroc", "accuracy", "dice", "dice_pooled", "map_40_75", "map_coco"):
        assert k in metrics.METRIC_DEFINITIONS


# --------------------------------------------------------------------------- MGCA's detection metric
def _p(boxes, scores):
    return {**_t(boxes), "scores": torch.tensor(scores, dtype=torch.float32)}


# Ground truth and predictions of six images. A true positive is its ground-truth box exactly (IoU 1 at
# every threshold), a false positive lies far from every box, so AP is the same at IoU 0.40 ... 0.75.
_A, _B, _D1, _D2, _D3, _E, _F = ([10, 10, 30, 30], [40, 40, 70, 60], [0, 0, 20, 20], [30, 0, 50, 20],
                                 [60, 0, 80, 20], [5, 50, 25, 80], [50, 50, 90, 95])
_FAR = [200, 200, 220, 220]
MIXED_TARGETS = [_t([_A]), _t([_B]), _t([]), _t([_D1, _D2, _D3]), _t([_E]), _t([_F])]
MIXED_PREDS = [
    _p([_A], [0.9]),  # A: confident true positive
    _p([_B, _FAR], [0.8, 0.7]),  # B: confident true positive and confident false positive
    _p([_FAR], [0.95]),  # C: no ground truth, the highest-scoring box of all is a false positive
    _p([], []),  # D: three ground-truth boxes, no prediction
    _p([_E], [0.3]),  # E: a low-confidence true positive only
    _p([_F, _FAR], [0.6, 0.2]),  # F: confident true positive, low-confidence false positive
]


def test_mgca_map_differs_from_ours_exactly_as_defined():
    # Ours: all 6 images, 7 ground-truth boxes, every box. By falling score:
    #   0.95 FP (C), 0.9 TP (A), 0.8 TP (B), 0.7 FP (B), 0.6 TP (F), 0.3 TP (E), 0.2 FP (F)
    #   precision 0, 1/2, 2/3, 1/2, 3/5, 2/3, 4/7 at recall 0, 1/7, 2/7, 2/7, 3/7, 4/7, 4/7.
    #   The interpolated precision (max to the right) is 2/3 up to recall 4/7 = 0.571, 0 beyond:
    #   recall thresholds 0.00 .. 0.57 (58 of 101) at 2/3, so AP = 58 * (2/3) / 101.
    # MGCA: scores >= 0.5 only, then images with ground truth and a kept box: A, B, F (C has no
    #   ground truth, D no prediction, E nothing over 0.5), 3 ground-truth boxes:
    #   0.9 TP, 0.8 TP, 0.7 FP, 0.6 TP -> precision 1, 1, 2/3, 3/4 at recall 1/3, 2/3, 2/3, 1.
    #   Interpolated: 1 up to recall 2/3 (thresholds 0.00 .. 0.66, 67 of 101), 3/4 from 0.67 to 1.00
    #   (34 of 101), so AP = (67 + 34 * 3/4) / 101.
    ours = 58 * (2 / 3) / 101
    mgca = (67 + 34 * 0.75) / 101
    res = metrics.detection_map(MIXED_PREDS, MIXED_TARGETS)
    assert res["map_40_75"] == pytest.approx(ours, abs=1e-6)
    assert res["map_40_75_mgca"] == pytest.approx(mgca, abs=1e-6)
    assert res["n_images_mgca"] == 3 and res["n_images"] == 6 and res["n_gt_boxes"] == 7
    assert metrics.detection_map_mgca(MIXED_PREDS, MIXED_TARGETS) == pytest.approx(mgca, abs=1e-6)
    # which images MGCA scores, and with which boxes
    kept_preds, kept_targets = metrics.mgca_eligible(MIXED_PREDS, MIXED_TARGETS)
    assert [t["boxes"].tolist() for t in kept_targets] == [[_A], [_B], [_F]]
    assert [p["scores"].tolist() for p in kept_preds] == [[pytest.approx(0.9)],
                                                          [pytest.approx(0.8), pytest.approx(0.7)],
                                                          [pytest.approx(0.6)]]


def test_mgca_map_edge_cases():
    # a score of exactly 0.5 counts (MGCA keeps conf >= conf_thres)
    t = [_t([_A])]
    assert metrics.detection_map_mgca([_p([_A], [0.5])], t) == pytest.approx(1.0)
    assert math.isnan(metrics.detection_map_mgca([_p([_A], [0.49])], t))
    # ours still sees the 0.49 box: a perfect ranking
    assert metrics.detection_map([_p([_A], [0.49])], t)["map_40_75"] == pytest.approx(1.0)
    # NMS at 0.5 inside the metric: a confident duplicate (IoU 0.8 with the first) is suppressed, a
    # neighbour with IoU 1/3 stays and is a false positive
    dup, neighbour = [10, 10, 30, 26], [20, 10, 40, 30]
    preds = [_p([_A, dup, neighbour], [0.9, 0.8, 0.7])]
    kept, _ = metrics.mgca_eligible(preds, t)
    assert kept[0]["boxes"].tolist() == [_A, neighbour]
    # every image without ground truth: undefined in both definitions
    res = metrics.detection_map([_p([_A], [0.9])], [_t([])])
    assert math.isnan(res["map_40_75_mgca"]) and res["n_images_mgca"] == 0
    assert "map_40_75_mgca" in metrics.METRIC_DEFINITIONS
