"""Sanity of the downstream metrics: perfect, random and hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from pipeline import metrics


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
