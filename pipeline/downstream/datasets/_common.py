"""Helpers shared by the downstream readers: CSV access with line numbers, missing-image policy,
box clipping, image sizes read from file headers, and filled-shape masks."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.common import MflagError, open_text_utf8

log = logging.getLogger(__name__)

DEFAULT_MAX_MISSING = 0.05
_WARN_LIMIT = 5  # per-kind warnings printed in full; the rest are only counted


class DatasetError(MflagError):
    """A downstream dataset file is malformed; the message names the file and line."""


def check_task(name: str, task: str, supported: Sequence[str]) -> None:
    if task not in supported:
        raise MflagError(f"dataset {name!r} supports tasks {', '.join(supported)}, not {task!r}")


# --protocol: "tool" (this tool's reading and splits) or "mgca" (MGCA's, docs/PROTOCOLS.md).
PROTOCOLS = ("tool", "mgca")


def check_protocol(name: str, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise MflagError(f"dataset {name!r}: unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")


def find_file(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``candidates`` (relative to ``root``) that exists; an error listing them otherwise."""
    for c in candidates:
        p = root / c
        if p.exists():
            return p
    raise MflagError(f"{what} not found under {root} (looked for {', '.join(candidates)})")


def read_csv_rows(path: Path, required: Sequence[str], skipinitialspace: bool = False
                  ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (1-based line number, row dict) for each data row of a CSV with a header.

    Header names are compared after stripping spaces; a missing required column is a DatasetError
    naming the file and the columns it has.
    """
    try:
        fh = open_text_utf8(path)  # UTF-8, BOM tolerated; a bad byte is one line naming file and line
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e.strerror})") from e
    with fh:
        reader = csv.reader(fh, skipinitialspace=skipinitialspace)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path}: empty file (expected header {','.join(required)})") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)}; header is {header}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            yield line, dict(zip(header, row))


class Tally:
    """Counts reader events and logs the first few of each kind with file and line."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1, message: str | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        if message is not None and self.counts[kind] <= _WARN_LIMIT:
            log.warning("%s", message)
            if self.counts[kind] == _WARN_LIMIT:
                log.warning("further %s warnings are only counted", kind)


def missing_image(tally: Tally, require_images: bool, message: str) -> None:
    """Count an image missing on disk: a skipped record (with a warning) when images are required,
    else only a count (``require_images=False`` reads label files alone and expects no images)."""
    if require_images:
        tally.add("missing_images", message=message)
    else:
        tally.add("images_not_on_disk")


def enforce_missing(tally: Tally, n_labelled: int, source: Path, max_missing: float) -> None:
    """Fail when more than ``max_missing`` of the labelled images are missing on disk."""
    missing = tally.counts.get("missing_images", 0)
    if n_labelled and missing / n_labelled > max_missing:
        raise MflagError(
            f"{source}: {missing} of {n_labelled} labelled images are missing on disk "
            f"({missing / n_labelled:.1%} > max_missing {max_missing:.1%}); check the dataset root, "
            f"or raise max_missing (--dataset-option max_missing=0.1, or dataset_options in a pipeline YAML)")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a JPG/PNG from its header (PIL opens lazily, no pixel decode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as e:
        raise MflagError(f"{path}: not a readable image ({e})") from e
    return int(h), int(w)


def dicom_header(path: Path) -> tuple[tuple[int, int], str | None]:
    """((Rows, Columns), PatientID or None) from a DICOM header, without reading pixel data."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "PatientID"])
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as e:  # pydicom raises several types for truncated or non-DICOM files
        raise MflagError(f"{path}: cannot read DICOM Rows/Columns ({e})") from e
    pid = str(ds.get("PatientID", "") or "").strip() or None
    return (rows, cols), pid


def clip_box(box: Sequence[float], size: tuple[int, int] | None
             ) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Clip (x1, y1, x2, y2) to an image of ``size`` (height, width).

    Returns (box or None when nothing is left inside the image, whether clipping changed it).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if size is None:
        return (x1, y1, x2, y2), False
    h, w = size
    c = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
    changed = c != (x1, y1, x2, y2)
    if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
        return None, True
    return c, changed


def fill_shapes(shapes: Sequence[tuple[str, Sequence[tuple[float, float]]]], src_size: tuple[int, int],
                height: int, width: int) -> np.ndarray:
    """Rasterise shapes given in pixels of an image of ``src_size`` (h, w) into a height x width mask.

    ``shapes``: (kind, points) with kind rectangle/ellipse (points = 2 opposite corners or the 4 box
    corners) or polygon (vertices). Returns uint8 0/1.
    """
    from PIL import Image, ImageDraw

    sh, sw = src_size
    sx, sy = width / sw, height / sh
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    for kind, pts in shapes:
        scaled = [(x * sx, y * sy) for x, y in pts]
        if kind in ("rectangle", "ellipse"):
            xs = [p[0] for p in scaled]
            ys = [p[1] for p in scaled]
            # PIL's right/bottom bounds are inclusive: stop one pixel short of x2 / y2.
            bbox = (min(xs), min(ys), max(max(xs) - 1, min(xs)), max(max(ys) - 1, min(ys)))
            if kind == "rectangle":
                draw.rectangle(bbox, fill=1)
            else:
                draw.ellipse(bbox, fill=1)
        elif kind == "polygon":
            draw.polygon(scaled, fill=1)
        else:
            raise ValueError(f"unknown shape kind {kind!r}")
    return np.asarray(im, dtype=np.uint8).copy()


def box_corners(box: Sequence[float]) -> tuple[tuple[float, float], ...]:
    x1, y1, x2, y2 = box
    return ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
