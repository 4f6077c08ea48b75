"""Small, easy downstream sets in the real RSNA layout for the learning tests of the eval stage.

Each image is dark noise; a positive holds 1-2 bright rectangles at random places and sizes, which are
its boxes (det), its mask (seg, RSNA's filled boxes) and its label (cls, any box). A working head
separates them easily; one that predicts nothing, a constant score or a constant box cannot.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.synth.dicom import siim_uids, write_dicom


def _boxes(rng: np.random.Generator, size: int, k: int) -> list[tuple[int, int, int, int]]:
    """``k`` rectangles (x1, y1, x2, y2) of 22-40% of the side, not overlapping."""
    out: list[tuple[int, int, int, int]] = []
    while len(out) < k:
        w, h = (rng.uniform(0.22, 0.4, size=2) * size).astype(int)
        x, y = int(rng.integers(2, size - w - 2)), int(rng.integers(2, size - h - 2))
        b = (x, y, x + w, y + h)
        if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in out):
            out.append(b)
    return out


def write_easy_rsna(out: Path, n: int, size: int = 64, seed: int = 0, positive_fraction: float = 0.5,
                    max_boxes: int = 2) -> dict[str, list[tuple[int, int, int, int]]]:
    """Write ``stage_2_train_labels.csv`` and ``stage_2_train_images/<id>.dcm``; returns id -> boxes."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    truth: dict[str, list[tuple[int, int, int, int]]] = {}
    rows = []
    for i in range(n):
        pid = f"easy{seed:02d}-{i:04d}"
        img = np.clip(rng.normal(40, 12, (size, size)), 0, 255)
        boxes = _boxes(rng, size, int(rng.integers(1, max_boxes + 1))) if rng.random() < positive_fraction else []
        for x1, y1, x2, y2 in boxes:
            img[y1:y2, x1:x2] = np.clip(rng.normal(200, 12, (y2 - y1, x2 - x1)), 0, 255)
        study, series, sop = siim_uids(rng)
        write_dicom(out / "stage_2_train_images" / f"{pid}.dcm", img.astype(np.uint8), sop_uid=sop,
                    study_uid=study, series_uid=series, patient_id=pid)
        truth[pid] = boxes
        rows += [(pid, x1, y1, x2 - x1, y2 - y1, 1) for x1, y1, x2, y2 in boxes] or [(pid, "", "", "", "", 0)]
    with open(out / "stage_2_train_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)
    return truth
