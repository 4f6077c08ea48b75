"""results.json's metrics recomputed from eval's predictions files with sklearn and pycocotools alone
(independent of pipeline.downstream.metrics), for the tests that check the two agree."""
import json

import numpy as np


def _doc(path_or_doc):
    return path_or_doc if isinstance(path_or_doc, dict) else json.loads(open(path_or_doc).read())


def read_cls_csv(path):
    """(ids, N x C labels, N x C scores) of a cls predictions CSV, read with the csv module."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [k[len("label:"):] for k in rows[0] if k.startswith("label:")]
    y = np.array([[float(r[f"label:{c}"]) for c in names] for r in rows])
    p = np.array([[float(r[f"score:{c}"]) for c in names] for r in rows])
    return [r["image_id"] for r in rows], y, p


def recompute_cls(path, label_kind):
    """results.json's cls metrics from a predictions CSV, with sklearn."""
    from sklearn.metrics import roc_auc_score

    _, y, p = read_cls_csv(path)
    aucs = [roc_auc_score(y[:, c], p[:, c]) for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    out = {"auroc": float(np.mean(aucs)) if aucs else None}
    if label_kind == "multiclass":
        out["accuracy"] = float((p.argmax(1) == y.argmax(1)).mean())
    return out


IOU_40_75 = tuple(np.linspace(0.40, 0.75, 8))


def recompute_det(path_or_doc, iou_thresholds=IOU_40_75, min_score=None, skip=False):
    """COCO mAP over ``iou_thresholds`` from a predictions JSON with pycocotools' COCOeval (maxDets 100, all
    areas). ``min_score`` keeps only boxes scoring at least that; ``skip`` leaves out images without ground
    truth or without a kept box (MGCA's filters)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = _doc(path_or_doc)
    images, anns, dets = [], [], []
    for k, im in enumerate(doc["images"]):
        keep = [j for j, s in enumerate(im["scores"]) if min_score is None or s >= min_score]
        if skip and (not im["truth"] or not keep):
            continue
        images.append({"id": k, "width": doc["image_size"], "height": doc["image_size"]})
        for x1, y1, x2, y2 in im["truth"]:
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for j in keep:
            x1, y1, x2, y2 = im["boxes"][j]
            dets.append({"image_id": k, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": im["scores"][j]})
    if not anns:
        return None
    if not dets:
        return 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.params.iouThrs = np.array(iou_thresholds)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return max(float(ev.stats[0]), 0.0)


def recompute_seg(path_or_doc):
    """Per-image Dice (F1 over pixels; both empty counts 1) averaged over images, with pycocotools + sklearn."""
    from pycocotools import mask as mask_utils
    from sklearn.metrics import f1_score

    doc = _doc(path_or_doc)

    def dec(r):
        return mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}).ravel()

    return float(np.mean([f1_score(dec(im["truth"]), dec(im["pred"]), zero_division=1.0) for im in doc["images"]]))


def rle_of(mask):
    """A boolean mask as the predictions file's COCO RLE (for hand-made predictions)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
