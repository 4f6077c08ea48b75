"""SIIM-ACR Pneumothorax: the relative, column-major run-length encoding of train-rle.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.common import MflagError, progress
from pipeline.downstream.datasets._common import (
    DEFAULT_MAX_MISSING,
    DatasetError,
    Tally,
    check_protocol,
    dicom_header,
    enforce_missing,
    find_file,
    missing_image,
    read_csv_rows,
)
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow, Record


class RLEError(MflagError):
    pass


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a SIIM RLE string to an (height, width) uint8 0/1 mask.

    Pairs are (background pixels since the end of the previous run, run length), counted over the
    column-major flattening (``mask.T.flatten()``). ``"-1"`` (with or without spaces) is empty.
    """
    rle = rle.strip()
    flat = np.zeros(height * width, dtype=np.uint8)
    if rle in ("-1", ""):
        return flat.reshape(width, height).T.copy()
    try:
        nums = [int(t) for t in rle.split()]
    except ValueError as e:
        raise RLEError(f"RLE has a non-integer token: {e}") from None
    if len(nums) % 2:
        raise RLEError(f"RLE has an odd number of tokens ({len(nums)})")
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        if start < 0 or length <= 0:
            raise RLEError(f"RLE has a negative offset or non-positive run ({start} {length})")
        pos += start
        if pos + length > flat.size:
            raise RLEError(
                f"RLE run {pos}+{length} goes past the end of a {height}x{width} image ({flat.size} pixels)")
        flat[pos:pos + length] = 1
        pos += length
    return flat.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D 0/1 mask as SIIM relative column-major RLE; ``"-1"`` for an empty mask.

    A run touching the last pixel is kept (the official sample encoder drops it).
    """
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    padded = np.concatenate([[0], flat, [0]])
    edges = np.flatnonzero(np.diff(padded))
    if edges.size == 0:
        return "-1"
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{g} {n}" for g, n in zip(gaps, lengths))


# --------------------------------------------------------------------------- reader
CLASS_NAMES = ("Pneumothorax",)
_EMPTY = ("-1", "")


def check_rle(rle: str, height: int, width: int) -> str | None:
    """Why ``rle`` cannot be decoded at height x width (None when it can), without decoding it."""
    try:
        nums = [int(t) for t in rle.split()]
    except ValueError as e:
        return f"non-integer token ({e})"
    if len(nums) % 2:
        return f"odd number of tokens ({len(nums)})"
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        if start < 0 or length <= 0:
            return f"negative offset or non-positive run ({start} {length})"
        pos += start + length
    if pos > height * width:
        return f"runs end at pixel {pos}, past the end of a {height}x{width} image ({height * width} pixels)"
    return None


def siim_mask(record: Record, height: int, width: int) -> np.ndarray:
    """Union of the record's RLE rows decoded at its real size, resized (nearest) to height x width."""
    if record.size is None:
        raise MflagError(f"SIIM record {record.image_id} has no image size; cannot decode its RLE")
    h, w = record.size
    mask = np.zeros((h, w), dtype=np.uint8)
    for rle in record.rle:
        mask |= rle_decode(rle, h, w)
    if (h, w) != (height, width):
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask * 255).resize((width, height), Image.NEAREST)) // 255
        mask = mask.astype(np.uint8)
    return mask


def read_siim(root: str | Path, task: str = "seg", max_missing: float = DEFAULT_MAX_MISSING,
              labels_file: str | None = None, images_dir: str | None = None, protocol: str = "tool",
              require_images: bool = True) -> DatasetSpec:
    """Read SIIM-ACR into records: rle = the image's non-empty RLE rows (unioned by ``mask_fn``).

    train-rle.csv is read with skipinitialspace; ``-1`` and `` -1`` are empty. DICOMs are found by
    stem anywhere under dicom-images-train/. Sizes and PatientID come from the DICOM headers
    (no pixel decode); patient_id falls back to the ImageId when the header has none (or, with
    ``require_images=False``, when there is no DICOM). Malformed RLE (bad token, odd count, runs past
    the image end) is an RLEError naming the file and line; without a DICOM only the tokens are checked.
    Under ``protocol="mgca"`` ``label_rows["train"]`` holds every CSV row in file order with
    ``positive`` = non-empty mask: MGCA splits SIIM by row, not by image.
    """
    check_protocol("siim", protocol)
    root = Path(root)
    # Only train-rle.csv: the later stage_2_train.csv uses absolute, not relative, run starts.
    csv_path = root / labels_file if labels_file else find_file(root, ("train-rle.csv",), "SIIM RLE CSV")
    if images_dir:
        img_dir = root / images_dir
    elif require_images or any((root / d).is_dir() for d in ("dicom-images-train", "dicom-images")):
        img_dir = find_file(root, ("dicom-images-train", "dicom-images"), "SIIM DICOM folder")
    else:
        img_dir = root / "dicom-images-train"  # label files alone: no image is read
    rows: dict[str, list[tuple[int, str]]] = {}
    label_rows: list[LabelRow] = []
    tally = Tally()
    for line, row in read_csv_rows(csv_path, ("ImageId", "EncodedPixels"), skipinitialspace=True):
        tally.add("rows")
        image_id = row["ImageId"].strip()
        if not image_id:
            raise DatasetError(f"{csv_path}:{line}: empty ImageId")
        rle = row["EncodedPixels"].strip()
        rows.setdefault(image_id, []).append((line, rle))
        if protocol == "mgca":
            label_rows.append(LabelRow(image_id, image_id, line, positive=rle not in _EMPTY))
    files = {p.stem: p for p in sorted(img_dir.rglob("*.dcm"))} if img_dir.is_dir() else {}
    records: list[Record] = []
    for image_id, entries in progress(rows.items(), total=len(rows), desc="SIIM DICOM headers", unit="img"):
        path = files.get(image_id)
        size, pid = None, None
        if path is not None:
            size, pid = dicom_header(path)
        else:
            missing_image(tally, require_images,
                          f"{csv_path}:{entries[0][0]}: no {image_id}.dcm under {img_dir}, skipped")
            if require_images:
                continue
            path = img_dir / f"{image_id}.dcm"
        rles = []
        for line, rle in entries:
            if rle in _EMPTY:
                continue
            why = check_rle(rle, *size) if size else check_rle(rle, 1 << 62, 1)
            if why:
                raise RLEError(f"{csv_path}:{line}: malformed RLE for {image_id}: {why}")
            rles.append(rle)
        records.append(Record(image_id=image_id, patient_id=pid or image_id, path=path,
                              labels=(1.0 if rles else 0.0,), rle=tuple(rles), size=size))
    enforce_missing(tally, len(rows), csv_path, max_missing)
    tally.counts["images"] = len(records)
    tally.counts["positive"] = sum(1 for r in records if r.rle)
    tally.counts["unlabelled_dicoms"] = len(set(files) - set(rows))
    if protocol == "mgca":
        # Patients come from the DICOM headers; rows of an image without one keep the ImageId.
        patient = {r.image_id: r.patient_id for r in records}
        label_rows = [LabelRow(x.image_id, patient.get(x.image_id, x.image_id), x.line, positive=x.positive)
                      for x in label_rows]
    return DatasetSpec(name="siim", root=root, records=records, class_names=CLASS_NAMES,
                       label_kind="multilabel", mask_fn=siim_mask, counts=tally.counts,
                       task=task, protocol=protocol, label_rows={"train": tuple(label_rows)} if label_rows else {})
