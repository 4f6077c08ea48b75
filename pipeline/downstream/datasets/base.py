"""The common record every downstream reader returns, and the dataset description eval consumes."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a downstream dataset.

    ``labels``: classification targets, one float per class of ``DatasetSpec.class_names``
    (multi-label 0/1 after the uncertainty policy, or one-hot for multi-class).
    ``boxes``: (x1, y1, x2, y2) in pixels of the stored image. ``box_kinds`` names each box's shape
    where the dataset has several (object-cxr: rectangle, ellipse, polygon) and ``polygons`` holds
    each object's outline points [(x, y), ...] (a rectangle's 4 corners, an ellipse's bounding box
    corners, a polygon's vertices). ``rle``: SIIM rows for this image (unioned).
    ``official_split``: the split the dataset itself defines (e.g. "valid", "dev", "test"), if any.
    """

    image_id: str
    patient_id: str
    path: Path
    labels: tuple[float, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    box_kinds: tuple[str, ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    rle: tuple[str, ...] = ()
    size: tuple[int, int] | None = None  # (height, width) when known without decoding
    official_split: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LabelRow:
    """One row of a label file as published, kept only under ``protocol="mgca"``: MGCA's splits draw on
    row positions, so every row counts, in file order, duplicates and rows no record keeps included.

    ``keep``: the row passes the filter MGCA's dataset class applies before training (CheXpert: the
    view; True elsewhere). ``positive``: the row's mask is non-empty (SIIM). ``group``: the competition
    task (0-4) a CheXpert frontal row is the only positive of, which puts it in MGCA's 5x200 draw; -1
    otherwise.
    """

    image_id: str
    patient_id: str
    line: int
    keep: bool = True
    positive: bool = False
    group: int = -1


@dataclasses.dataclass
class DatasetSpec:
    """A read dataset: its records plus what eval needs to know to train on it.

    ``label_kind``: "multilabel" (AUROC per class) or "multiclass" (accuracy).
    ``tasks``: the eval tasks this dataset supports (``load_dataset`` sets them from the dataset registry).
    ``mask_fn(record, height, width) -> uint8 HxW`` renders the segmentation target.
    ``counts``: what the reader counted (rows read, missing images, clipped boxes, ...).
    ``task`` / ``protocol``: what the dataset was read for (``load_dataset`` sets them).
    ``label_rows``: under ``protocol="mgca"``, every row of each label file by the split it belongs
    to ("train", "valid", "test", "dev"), for the splits MGCA draws by row position; empty otherwise.
    """

    name: str
    root: Path
    records: list[Record]
    class_names: tuple[str, ...] = ()
    label_kind: str = "multilabel"
    tasks: tuple[str, ...] = ("cls",)
    mask_fn: Callable[[Record, int, int], np.ndarray] | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    task: str = ""
    protocol: str = "tool"
    label_rows: dict[str, tuple[LabelRow, ...]] = dataclasses.field(default_factory=dict)
