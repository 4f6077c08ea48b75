"""RSNA Pneumonia Detection (stage 2): stage_2_train_labels.csv (one row per box) + DICOMs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.common import MflagError, progress, unsafe_id_reason
from pipeline.downstream.datasets._common import (
    DEFAULT_MAX_MISSING,
    DatasetError,
    Tally,
    box_corners,
    check_protocol,
    clip_box,
    dicom_header,
    enforce_missing,
    fill_shapes,
    find_file,
    missing_image,
    read_csv_rows,
)
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow, Record

CLASS_NAMES = ("Lung Opacity",)
LABELS_FILES = ("stage_2_train_labels.csv", "stage_1_train_labels.csv")
IMAGE_DIRS = ("stage_2_train_images", "stage_1_train_images")


def _float(csv_path: Path, line: int, name: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise DatasetError(f"{csv_path}:{line}: column {name!r} is not a number: {raw!r}") from None
    if not math.isfinite(v):
        raise DatasetError(f"{csv_path}:{line}: column {name!r} is not finite: {raw!r}")
    return v


def read_labels(csv_path: str | Path) -> dict[str, np.ndarray]:
    """patientId -> K x 4 float32 boxes (x1, y1, x2, y2) in pixels; K = 0 for negative patients.

    Rows of one patient are gathered in file order. A Target=1 row without a box, a Target=0 row
    with one, or a non-positive width/height is a DatasetError naming the file and line.
    """
    return {pid: np.asarray([b for _, b in rows], dtype=np.float32).reshape(-1, 4)
            for pid, rows in _read_rows(Path(csv_path))[0].items()}


def _read_rows(csv_path: Path) -> tuple[dict[str, list[tuple[int, tuple[float, float, float, float]]]],
                                         dict[str, int]]:
    """(patientId -> [(1-based line, (x1, y1, x2, y2)), ...] (empty for negatives),
    patientId -> first line naming it)."""
    boxes: dict[str, list[tuple[int, tuple[float, float, float, float]]]] = {}
    first: dict[str, int] = {}
    for line, row in read_csv_rows(csv_path, ("patientId", "x", "y", "width", "height", "Target")):
        pid = row["patientId"].strip()
        if not pid:
            raise DatasetError(f"{csv_path}:{line}: empty patientId")
        target = row["Target"].strip()
        fields = [row[c].strip() for c in ("x", "y", "width", "height")]
        per = boxes.setdefault(pid, [])
        first.setdefault(pid, line)
        if target in ("0", "0.0"):
            if any(fields):
                raise DatasetError(f"{csv_path}:{line}: Target=0 row for {pid} has box fields {fields}")
            continue
        if target not in ("1", "1.0"):
            raise DatasetError(f"{csv_path}:{line}: Target is {target!r}, expected 0 or 1")
        if not all(fields):
            raise DatasetError(f"{csv_path}:{line}: Target=1 row for {pid} has empty box fields")
        x, y, w, h = (_float(csv_path, line, c, v) for c, v in zip(("x", "y", "width", "height"), fields))
        if w <= 0 or h <= 0:
            raise DatasetError(f"{csv_path}:{line}: box for {pid} has width {w} / height {h} <= 0")
        per.append((line, (x, y, x + w, y + h)))
    return boxes, first


def _mask(record: Record, height: int, width: int) -> np.ndarray:
    """Filled boxes (MGCA's RSNA segmentation target), rendered at height x width."""
    if record.size is None:
        raise MflagError(f"RSNA record {record.image_id} has no image size; cannot render its mask")
    return fill_shapes([("rectangle", box_corners(b)) for b in record.boxes], record.size, height, width)


def read_rsna(root: str | Path, task: str = "cls", max_missing: float = DEFAULT_MAX_MISSING,
              labels_file: str | None = None, images_dir: str | None = None, protocol: str = "tool",
              require_images: bool = True) -> DatasetSpec:
    """Read RSNA into records: labels (any box), boxes clipped to the DICOM's Rows x Columns.

    ``patient_id`` = ``image_id`` = patientId (one image per patient). Image sizes come from the
    DICOM headers (no pixel decode); ``mask_fn`` fills the boxes for the seg task. With
    ``require_images=False`` a patient without a DICOM keeps its boxes unclipped and no size.
    Under ``protocol="mgca"`` ``label_rows["train"]`` holds each patientId once (MGCA groups the rows
    by patientId, which sorts them).
    """
    check_protocol("rsna", protocol)
    root = Path(root)
    csv_path = root / labels_file if labels_file else find_file(root, LABELS_FILES, "RSNA labels CSV")
    if images_dir:
        img_dir = root / images_dir
    else:
        # The image folder of the same stage as the labels when it exists (stage 2 labels with stage 1
        # images would miss most files), else whichever is there.
        same = [d for d in IMAGE_DIRS if d.split("_", 2)[:2] == csv_path.name.split("_", 2)[:2]]
        if same and (root / same[0]).is_dir():
            img_dir = root / same[0]
        elif require_images or any((root / d).is_dir() for d in IMAGE_DIRS):
            img_dir = find_file(root, IMAGE_DIRS, "RSNA image folder")
        else:
            img_dir = root / (same[0] if same else IMAGE_DIRS[0])  # label files alone: no image is read
    labels, first_line = _read_rows(csv_path)
    tally = Tally()
    tally.counts["patients_labelled"] = len(labels)
    records: list[Record] = []
    have_dir = img_dir.is_dir()  # label files alone: no per-image look-up in a folder that is not there
    for pid, boxes in progress(labels.items(), total=len(labels), desc="RSNA DICOM headers", unit="img"):
        if unsafe_id_reason(pid):
            tally.add("unsafe_ids", message=f"{csv_path}:{first_line[pid]}: patientId {pid!r} "
                                            f"{unsafe_id_reason(pid)}; skipped")
            continue
        path = img_dir / f"{pid}.dcm"
        size = None
        if have_dir and path.is_file():
            size, _ = dicom_header(path)
        else:
            missing_image(tally, require_images, f"{csv_path}:{first_line[pid]}: image {path} for patientId "
                                                 f"{pid} not found, skipped")
            if require_images:
                continue
        kept = []
        for line, b in boxes:
            c, changed = clip_box(b, size)
            if changed:
                tally.add("clipped_boxes", message=f"{csv_path}:{line}: box {list(b)} of {pid} clipped to "
                                                   f"the {size[1]}x{size[0]} image")
            if c is None:
                tally.add("dropped_boxes")
                continue
            kept.append(c)
        records.append(Record(image_id=pid, patient_id=pid, path=path,
                              labels=(1.0 if kept else 0.0,), boxes=tuple(kept),
                              box_kinds=("rectangle",) * len(kept),
                              polygons=tuple(box_corners(b) for b in kept), size=size))
    enforce_missing(tally, len(labels), csv_path, max_missing)
    tally.counts["images"] = len(records)
    tally.counts["boxes"] = sum(len(r.boxes) for r in records)
    label_rows = {"train": tuple(LabelRow(pid, pid, first_line[pid]) for pid in labels)} if protocol == "mgca" else {}
    return DatasetSpec(name="rsna", root=root, records=records, class_names=CLASS_NAMES,
                       label_kind="multilabel", mask_fn=_mask,
                       counts=tally.counts, task=task, protocol=protocol, label_rows=label_rows)
