"""Object-CXR (foreign objects): train.csv / dev.csv `image_name,annotation` with three shape types."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.common import MflagError, unsafe_id_reason
from pipeline.downstream.datasets._common import (
    DEFAULT_MAX_MISSING,
    DatasetError,
    Tally,
    check_protocol,
    clip_box,
    enforce_missing,
    fill_shapes,
    image_size,
    missing_image,
    read_csv_rows,
)
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow, Record

CLASS_NAMES = ("foreign object",)
KINDS = {0: "rectangle", 1: "ellipse", 2: "polygon"}

Shape = tuple[str, tuple[tuple[float, float], ...]]
# MGCA's polygon box (mgca/preprocess/object_cxr.py): the outline is buffered by this many pixels and
# the box is centred on the buffered shape's pole of inaccessibility, found to this tolerance.
MGCA_POLYGON_BUFFER = 100
MGCA_POLYLABEL_TOLERANCE = 10


def parse_annotation(text: str, where: str) -> list[Shape]:
    """Parse one annotation field into (kind, points) shapes; ``where`` ("file:line") prefixes errors.

    Rectangles and ellipses give their two corners (x1, y1), (x2, y2); polygons their vertices.
    Empty text is no object. An unknown type or a wrong coordinate count is a DatasetError.
    """
    shapes: list[Shape] = []
    # [pub] a trailing ';' or doubled separators carry no object: skip empty pieces.
    for k, piece in enumerate(p for p in text.split(";") if p.strip()):
        tokens = piece.split()
        try:
            nums = [float(t) for t in tokens]
        except ValueError:
            raise DatasetError(f"{where}: object {k + 1} has a non-numeric token: {piece.strip()!r}") from None
        kind_idx = nums[0]
        if kind_idx not in KINDS:
            raise DatasetError(f"{where}: object {k + 1} has unknown type {tokens[0]!r} (0 rectangle, 1 ellipse, "
                               f"2 polygon)")
        kind = KINDS[int(kind_idx)]
        coords = nums[1:]
        if kind in ("rectangle", "ellipse") and len(coords) != 4:
            raise DatasetError(f"{where}: object {k + 1} ({kind}) needs 4 coordinates x1 y1 x2 y2, got {len(coords)}")
        if kind == "polygon" and (len(coords) % 2 or len(coords) < 6):
            raise DatasetError(f"{where}: object {k + 1} (polygon) needs an even number (>= 6) of coordinates, "
                               f"got {len(coords)}")
        pts = tuple((coords[i], coords[i + 1]) for i in range(0, len(coords), 2))
        shapes.append((kind, pts))
    return shapes


def mgca_box(kind: str, pts: tuple[tuple[float, float], ...]) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of one object as MGCA derives it (mgca/preprocess/object_cxr.py, not clipped).

    Rectangles and ellipses: the box of their two corners, i.e. the tight box. Polygons: the closed
    outline is buffered by 100 px, c is the pole of inaccessibility of that shape (shapely's polylabel,
    tolerance 10), and the box is centred on c with half sizes reaching the farthest vertex on each
    axis, so it holds the tight box and is wider where c is off the tight box's centre.
    """
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    if kind != "polygon":
        return min(xs), min(ys), max(xs), max(ys)
    # Shapely 2.1 replaced the pure-Python polylabel MGCA ran (shapely 1.8, same as 2.0) with GEOS's,
    # which returns other points: pyproject pins shapely < 2.1 for that reason.
    from shapely.geometry import LineString
    from shapely.ops import polylabel

    ring = LineString(list(pts) + [pts[0]])
    c = polylabel(ring.buffer(MGCA_POLYGON_BUFFER), tolerance=MGCA_POLYLABEL_TOLERANCE)
    minx, miny, maxx, maxy = ring.bounds
    wx = max(abs(minx - c.x), abs(maxx - c.x))
    wy = max(abs(miny - c.y), abs(maxy - c.y))
    # MGCA keeps (x - wx, y - wy, 2 wx, 2 wy); x2 = x1 + width keeps its arithmetic.
    x1, y1 = c.x - wx, c.y - wy
    return x1, y1, x1 + 2 * wx, y1 + 2 * wy


def _mask(record: Record, height: int, width: int) -> np.ndarray:
    """Filled rectangles, ellipses and polygons rendered at height x width."""
    if record.size is None:
        raise MflagError(f"Object-CXR record {record.image_id} has no image size; cannot render its mask")
    return fill_shapes(list(zip(record.box_kinds, record.polygons)), record.size, height, width)


def read_object_cxr(root: str | Path, task: str = "det", max_missing: float = DEFAULT_MAX_MISSING,
                    files: tuple[str, ...] = ("train.csv", "dev.csv"), protocol: str = "tool",
                    require_images: bool = True) -> DatasetSpec:
    """Read Object-CXR: one record per image with bounding boxes of every object, ``box_kinds`` and
    outlines in ``polygons``.

    Boxes: under ``protocol="tool"`` the tight box of each object clipped to the real image size read
    from the file header; under ``"mgca"`` MGCA's box (``mgca_box``), not clipped (boxes reaching
    outside the image are counted as ``boxes_outside_image``), and every CSV row in ``label_rows``.
    Images live in ``<split>/`` next to ``<split>.csv``; ``official_split`` is "train" or "dev".
    There is no patient id, so ``patient_id`` = ``image_id`` ("<split>/<image_name>").
    """
    check_protocol("object-cxr", protocol)
    root = Path(root)
    tally = Tally()
    records: list[Record] = []
    label_rows: dict[str, tuple[LabelRow, ...]] = {}
    n_labelled = 0
    found_any = False
    for fname in files:
        csv_path = root / fname
        if not csv_path.is_file():
            continue
        found_any = True
        split = Path(fname).stem
        seen: set[str] = set()
        rows: list[LabelRow] = []
        for line, row in read_csv_rows(csv_path, ("image_name", "annotation")):
            tally.add("rows")
            name = row["image_name"].strip()
            if not name:
                raise DatasetError(f"{csv_path}:{line}: empty image_name")
            if unsafe_id_reason(name):
                tally.add("unsafe_ids", message=f"{csv_path}:{line}: image_name {name!r} {unsafe_id_reason(name)}; "
                                                "row skipped")
                continue
            rows.append(LabelRow(f"{split}/{name}", f"{split}/{name}", line))
            if name in seen:
                tally.add("duplicate_rows", message=f"{csv_path}:{line}: duplicate image {name}, skipped")
                continue
            seen.add(name)
            shapes = parse_annotation(row["annotation"], f"{csv_path}:{line}")
            n_labelled += 1
            path = root / split / name
            size = None
            if path.is_file():
                size = image_size(path)
            else:
                missing_image(tally, require_images, f"{csv_path}:{line}: image {path} not found, skipped")
                if require_images:
                    continue
            boxes, kinds, outlines = [], [], []
            for kind, pts in shapes:
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                box, changed = clip_box((min(xs), min(ys), max(xs), max(ys)), size)
                if changed:
                    tally.add("clipped_boxes", message=f"{csv_path}:{line}: {kind} of {name} extends outside "
                                                       f"the {size[1]}x{size[0]} image, clipped")
                if box is None:
                    tally.add("dropped_boxes")
                    continue
                outline = pts
                if size is not None:
                    h, w = size
                    outline = tuple((min(max(x, 0.0), float(w)), min(max(y, 0.0), float(h))) for x, y in pts)
                if kind in ("rectangle", "ellipse"):
                    x1, y1, x2, y2 = box
                    outline = ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
                if protocol == "mgca":
                    box = mgca_box(kind, pts)
                    if size is not None and clip_box(box, size)[1]:
                        tally.add("boxes_outside_image")
                boxes.append(box)
                kinds.append(kind)
                outlines.append(outline)
            records.append(Record(image_id=f"{split}/{name}", patient_id=f"{split}/{name}", path=path,
                                  labels=(1.0 if boxes else 0.0,), boxes=tuple(boxes), box_kinds=tuple(kinds),
                                  polygons=tuple(outlines), size=size, official_split=split))
        if protocol == "mgca":
            label_rows[split] = tuple(rows)
    if not found_any:
        raise MflagError(f"Object-CXR: none of {', '.join(files)} under {root}")
    enforce_missing(tally, n_labelled, root, max_missing)
    tally.counts["images"] = len(records)
    tally.counts["boxes"] = sum(len(r.boxes) for r in records)
    return DatasetSpec(name="object-cxr", root=root, records=records, class_names=CLASS_NAMES,
                       label_kind="multilabel", mask_fn=_mask, counts=tally.counts,
                       task=task, protocol=protocol, label_rows=label_rows)
