"""Downstream metrics: AUROC / accuracy (cls), Dice (seg), mAP over IoU ranges (det).

Every metric here has a written definition in ``METRIC_DEFINITIONS`` that eval copies into its
results, so a number in a table can always be traced back to how it was computed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# The paper's detection tables average AP over IoU 0.40, 0.45, ..., 0.75 (the protocol of the RSNA
# challenge and of MGCA's detection code); COCO averages over 0.50, 0.55, ..., 0.95.
IOU_PAPER = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))
IOU_COCO = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))
# MGCA scores detection on the boxes its non_max_suppression keeps: objectness >= 0.5, NMS IoU 0.5
# (mgca/models/ssl_detector.py: conf_thres=0.5, nms_thres=0.5).
MGCA_CONF_THRESH = 0.5
MGCA_NMS_IOU = 0.5

METRIC_DEFINITIONS = {
    "auroc": "mean over classes of the per-class ROC AUC (sklearn roc_auc_score) of the sigmoid "
             "scores; a class whose test labels are all equal has no AUROC and is left out of the "
             "mean (listed in auroc_undefined)",
    "accuracy": "fraction of test images whose arg-max class equals the label",
    "dice": "per-image Dice 2|P∩G|/(|P|+|G|) of the mask thresholded at probability 0.5, averaged "
            "over test images; an image whose prediction and ground truth are both empty counts 1, "
            "one that is empty while the other is not counts 0",
    "dice_pooled": "Dice over all test pixels pooled: 2*sum|P∩G| / (sum|P| + sum|G|)",
    "dice_positive": "per-image Dice averaged over the test images whose ground truth is non-empty",
    "map_40_75": "COCO-style AP (101-point interpolated, all areas, up to 100 detections) averaged "
                 "over IoU thresholds 0.40:0.75 step 0.05 (the paper's protocol), torchmetrics "
                 "MeanAveragePrecision with the pycocotools backend",
    "map_coco": "the same AP averaged over IoU 0.50:0.95 step 0.05 (COCO mAP)",
    "map_50": "the same AP at IoU 0.50",
    "map_40_75_mgca": "MGCA's detection metric: the same AP over IoU 0.40:0.75 step 0.05, but only on the "
                      "boxes with score >= 0.5 after class-wise NMS at IoU 0.5, and only over the test "
                      "images that have at least one ground-truth box and at least one such box (images "
                      "without ground truth or without a confident prediction are left out, their "
                      "ground truth and false positives included); n_images_mgca counts the images kept",
}


# --------------------------------------------------------------------------- classification
def auroc_per_class(y_true: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """Per-class ROC AUC for N x C 0/1 labels and N x C scores; None where a class is undefined."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and scores {scores.shape} must both be N x C")
    out: list[float | None] = []
    for c in range(y_true.shape[1]):
        col = y_true[:, c] > 0.5
        if col.all() or not col.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(col, scores[:, c])))
    return out


def mean_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean of the defined per-class AUROCs; NaN when no class has both labels in ``y_true``."""
    vals = [v for v in auroc_per_class(y_true, scores) if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Arg-max accuracy; ``y_true`` is N class indices or an N x C one-hot matrix."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        y_true = y_true.argmax(axis=1)
    pred = np.asarray(scores).argmax(axis=1)
    if len(pred) == 0:
        return float("nan")
    return float((pred == y_true).mean())


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, label_kind: str,
                           class_names: Sequence[str]) -> dict:
    """The cls metrics of a test set; the first key named in ``primary_metric(label_kind)`` is the one
    early stopping and the results table use."""
    if label_kind == "multiclass":
        return {"accuracy": accuracy(y_true, scores), "auroc": mean_auroc(_one_hot(y_true, scores), scores)}
    per = auroc_per_class(y_true, scores)
    return {
        "auroc": mean_auroc(y_true, scores),
        "auroc_per_class": {n: v for n, v in zip(class_names, per)},
        "auroc_undefined": [n for n, v in zip(class_names, per) if v is None],
    }


def _one_hot(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        return y_true
    out = np.zeros_like(np.asarray(scores), dtype=np.float64)
    out[np.arange(len(y_true)), y_true.astype(int)] = 1
    return out


def primary_metric(task: str, label_kind: str = "multilabel") -> str:
    """The metric early stopping maximises and the results table leads with."""
    if task == "cls":
        return "accuracy" if label_kind == "multiclass" else "auroc"
    return {"seg": "dice", "det": "map_40_75"}[task]


# --------------------------------------------------------------------------- segmentation
class DiceAccumulator:
    """Streams batches of binary masks and reports per-image, positive-only and pooled Dice."""

    def __init__(self) -> None:
        self.per_image: list[float] = []
        self.positive: list[float] = []
        self.inter = 0
        self.total = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """``pred`` and ``target``: B x H x W (or B x 1 x H x W) binary masks."""
        pred = torch.as_tensor(pred).reshape(len(pred), -1) > 0
        target = torch.as_tensor(target).reshape(len(target), -1) > 0
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        inter = (pred & target).sum(1).to(torch.int64)
        sizes = pred.sum(1).to(torch.int64) + target.sum(1).to(torch.int64)
        for i, s, has_gt in zip(inter.tolist(), sizes.tolist(), target.any(1).tolist()):
            d = 1.0 if s == 0 else 2.0 * i / s
            self.per_image.append(d)
            if has_gt:
                self.positive.append(d)
        self.inter += int(inter.sum())
        self.total += int(sizes.sum())

    def compute(self) -> dict:
        nan = float("nan")
        return {
            "dice": float(np.mean(self.per_image)) if self.per_image else nan,
            "dice_positive": float(np.mean(self.positive)) if self.positive else nan,
            "dice_pooled": (2.0 * self.inter / self.total) if self.total else (1.0 if self.per_image else nan),
            "n_images": len(self.per_image),
            "n_positive": len(self.positive),
        }


def dice_scores(pred: np.ndarray, target: np.ndarray) -> dict:
    """Dice of N x H x W binary predictions against targets (see ``METRIC_DEFINITIONS``)."""
    acc = DiceAccumulator()
    acc.update(pred, target)
    return acc.compute()


# --------------------------------------------------------------------------- detection
class DetectionAccumulator:
    """Collects per-image predictions and ground-truth boxes; ``compute`` gives paper, COCO and MGCA mAP.

    Predictions: dicts with ``boxes`` (K x 4 xyxy), ``scores`` (K), ``labels`` (K); targets: dicts with
    ``boxes`` and ``labels``. All in the same pixel frame.
    """

    def __init__(self) -> None:
        self.preds: list[dict] = []
        self.targets: list[dict] = []

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        for p, t in zip(preds, targets, strict=True):
            self.preds.append({k: torch.as_tensor(p[k]).detach().cpu() for k in ("boxes", "scores", "labels")})
            self.targets.append({k: torch.as_tensor(t[k]).detach().cpu() for k in ("boxes", "labels")})

    def compute(self) -> dict:
        n_gt = int(sum(len(t["boxes"]) for t in self.targets))
        out = {"n_images": len(self.targets), "n_gt_boxes": n_gt}
        if n_gt == 0:
            # AP is undefined without a single ground-truth box; torchmetrics would report -1.
            return {**out, "map_40_75": float("nan"), "map_coco": float("nan"), "map_50": float("nan"),
                    "map_40_75_mgca": float("nan"), "n_images_mgca": 0}
        out["map_40_75"] = _map(self.preds, self.targets, IOU_PAPER)
        coco = _map(self.preds, self.targets, IOU_COCO, with_50=True)
        out["map_coco"], out["map_50"] = coco
        kept_preds, kept_targets = mgca_eligible(self.preds, self.targets)
        out["map_40_75_mgca"] = _map(kept_preds, kept_targets, IOU_PAPER) if kept_targets else float("nan")
        out["n_images_mgca"] = len(kept_targets)
        return out


def _map(preds, targets, thresholds, with_50: bool = False):
    from torchmetrics.detection import MeanAveragePrecision

    # pycocotools' own recall grid (float64): torchmetrics' default is a float32 linspace, whose points
    # differ from 0.01 k in the last bits, so a recall that falls exactly on a grid point (e.g. 2 of 40
    # boxes) is interpolated differently than COCOeval run on the predictions file would
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=list(thresholds),
                                  rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(), backend="pycocotools")
    preds = [{"boxes": p["boxes"].float().reshape(-1, 4), "scores": p["scores"].float(),
              "labels": p["labels"].long()} for p in preds]
    targets = [{"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long()} for t in targets]
    metric.update(preds, targets)
    res = metric.compute()
    value = _clean(float(res["map"]))
    if with_50:
        return value, _clean(float(res["map_50"]))
    return value


def _clean(v: float) -> float:
    # torchmetrics marks "no data" as -1
    return float("nan") if v < 0 or math.isnan(v) else v


def mgca_eligible(preds: Sequence[dict], targets: Sequence[dict], conf_thresh: float = MGCA_CONF_THRESH,
                  nms_iou: float = MGCA_NMS_IOU) -> tuple[list[dict], list[dict]]:
    """The (preds, targets) MGCA's metric scores: per image the boxes with score >= ``conf_thresh``
    after class-wise NMS at ``nms_iou``, and only the images with a ground-truth box and a kept box.

    MGCA thresholds before NMS and we after; the two agree (greedy NMS visits boxes by falling score, so
    boxes under the cut never suppress a box over it). NMS here is a no-op on the output of our
    detectors, which already ran it at 0.5; it makes the definition hold for any input. MGCA keeps
    ``score >= 0.5`` (``conf_mask = image_pred[:, 4] >= conf_thres``), so a score of exactly 0.5 counts.
    """
    from torchvision.ops import batched_nms

    kept_preds, kept_targets = [], []
    for p, t in zip(preds, targets, strict=True):
        if len(torch.as_tensor(t["boxes"]).reshape(-1, 4)) == 0:
            continue  # MGCA drops images without ground truth (filtered_target.shape[0] > 0)
        boxes = torch.as_tensor(p["boxes"]).float().reshape(-1, 4)
        scores = torch.as_tensor(p["scores"]).float().reshape(-1)
        labels = torch.as_tensor(p["labels"]).long().reshape(-1)
        cut = scores >= conf_thresh
        boxes, scores, labels = boxes[cut], scores[cut], labels[cut]
        if len(scores) == 0:
            continue  # ... and images without a confident box (non_max_suppression returns None)
        keep = batched_nms(boxes, scores, labels, nms_iou)
        kept_preds.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        kept_targets.append(t)
    return kept_preds, kept_targets


def detection_map_mgca(preds: Sequence[dict], targets: Sequence[dict]) -> float:
    """MGCA's mAP over IoU 0.40:0.75 (``map_40_75_mgca`` in ``METRIC_DEFINITIONS``); NaN when no image
    has both a ground-truth box and a box with score >= 0.5. Same inputs as ``detection_map``."""
    kept_preds, kept_targets = mgca_eligible(preds, targets)
    if not kept_targets:
        return float("nan")
    return _map(kept_preds, kept_targets, IOU_PAPER)


def detection_map(preds: Sequence[dict], targets: Sequence[dict]) -> dict:
    """mAP over IoU 0.40:0.75 (``map_40_75``), COCO mAP@[.50:.95] (``map_coco``), AP50 (``map_50``) and
    MGCA's filtered mAP over IoU 0.40:0.75 (``map_40_75_mgca``, with ``n_images_mgca``)."""
    acc = DetectionAccumulator()
    acc.update(preds, targets)
    return acc.compute()
