"""CheXpert v1.0 (and the -small variant): train.csv / valid.csv, five competition tasks."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pipeline.common import MflagError, unsafe_id_reason
from pipeline.downstream.datasets._common import (
    DEFAULT_MAX_MISSING,
    DatasetError,
    Tally,
    check_protocol,
    enforce_missing,
    missing_image,
    read_csv_rows,
)
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow, Record

TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# What an uncertain (-1) label becomes, per policy. "competition" is the usual CheXpert policy:
# U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation.
POLICIES: dict[str, dict[str, float]] = {
    "competition": {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                    "Pleural Effusion": 1.0},
    "ones": dict.fromkeys(TASKS, 1.0),
    "zeros": dict.fromkeys(TASKS, 0.0),
}
# The other label columns MGCA's 5x200 selection (mgca/preprocess/chexpert.py) requires to be 0: a
# frontal row joins the draw for task k when k is 1 and these and the other four tasks are 0 (blank = 0).
# "No Finding" is not checked there.
MGCA_5X200_OTHERS = ("Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
                     "Pleural Other", "Fracture", "Support Devices")
_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": 0.0}
_PREFIXES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_PATIENT = re.compile(r"^patient\d+$")


def _resolve_root(root: Path) -> Path:
    """The folder holding train.csv; users may also point at its parent."""
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return root
    for p in _PREFIXES:
        if (root / p / "train.csv").is_file() or (root / p / "valid.csv").is_file():
            return root / p
    raise MflagError(f"CheXpert: no train.csv or valid.csv under {root} (or {'/'.join(_PREFIXES)})")


def _relative(csv_path: str) -> PurePosixPath:
    """Strip the dataset folder prefix (CheXpert-v1.0-small/ or CheXpert-v1.0/) from a CSV Path."""
    parts = PurePosixPath(csv_path.replace("\\", "/")).parts
    # [pub] other mirrors rename the top folder; anything before train/ or valid/ is a prefix.
    for i, p in enumerate(parts):
        if p in ("train", "valid", "test"):
            return PurePosixPath(*parts[i:])
    if parts and parts[0] in _PREFIXES:
        return PurePosixPath(*parts[1:])
    return PurePosixPath(*parts)


def _number(csv_path: Path, line: int, column: str, raw: str) -> float:
    """A label cell as pandas reads it after fillna(0): blank is 0, else the number."""
    raw = raw.strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise DatasetError(f"{csv_path}:{line}: column {column!r} has {raw!r}, expected a number or blank") from None


def _mgca_group(csv_path: Path, line: int, row: dict[str, str]) -> int:
    """The competition task a frontal row is the only positive of under MGCA's 5x200 rule, else -1."""
    tasks = [_number(csv_path, line, t, row[t]) for t in TASKS]
    if any(_number(csv_path, line, c, row[c]) != 0.0 for c in MGCA_5X200_OTHERS):
        return -1
    ones = [k for k, v in enumerate(tasks) if v == 1.0]
    zeros = [k for k, v in enumerate(tasks) if v == 0.0]
    return ones[0] if len(ones) == 1 and len(zeros) == len(TASKS) - 1 else -1


def read_chexpert(root: str | Path, task: str = "cls", uncertainty: str = "competition",
                  frontal_only: bool = True, max_missing: float = DEFAULT_MAX_MISSING,
                  files: tuple[str, ...] = ("train.csv", "valid.csv"), protocol: str = "tool",
                  require_images: bool = True) -> DatasetSpec:
    """Read CheXpert into records with the five competition labels (0/1 after ``uncertainty``).

    ``uncertainty``: competition (U-Ones/U-Zeros mix) | ones | zeros; blank labels count as 0.
    Records carry ``official_split`` "train" or "valid"; ``patient_id`` is the patientNNNNN folder.
    Under ``protocol="mgca"`` every CSV row (laterals too) is also kept in ``label_rows``, and train.csv
    must have the eight other label columns MGCA's 5x200 selection reads.
    """
    check_protocol("chexpert", protocol)
    if uncertainty not in POLICIES:
        raise MflagError(f"CheXpert: unknown uncertainty policy {uncertainty!r} (one of {', '.join(POLICIES)})")
    policy = POLICIES[uncertainty]
    root = _resolve_root(Path(root))
    tally = Tally()
    records: list[Record] = []
    label_rows: dict[str, tuple[LabelRow, ...]] = {}
    seen: set[str] = set()
    n_labelled = 0
    found_any = False
    for fname in files:
        csv_path = root / fname
        if not csv_path.is_file():
            continue
        found_any = True
        split = Path(fname).stem
        mgca_train = protocol == "mgca" and split == "train"
        required = ("Path", "Frontal/Lateral", *TASKS) + (MGCA_5X200_OTHERS if mgca_train else ())
        rows: list[LabelRow] = []
        for line, row in read_csv_rows(csv_path, required):
            tally.add("rows")
            view = row["Frontal/Lateral"].strip()
            rel = _relative(row["Path"].strip())
            image_id = str(rel)
            unsafe = unsafe_id_reason(image_id, allow_subfolders=True)
            if unsafe:
                tally.add("unsafe_ids", message=f"{csv_path}:{line}: Path {row['Path']!r} {unsafe}; row skipped")
                continue
            keep = view == "Frontal" or not frontal_only
            patient = next((p for p in rel.parts if _PATIENT.match(p)), None)
            if patient is None and (keep or protocol == "mgca"):
                raise DatasetError(f"{csv_path}:{line}: no patientNNNNN folder in Path {row['Path']!r}")
            if protocol == "mgca":
                rows.append(LabelRow(image_id, patient, line, keep=keep,
                                     group=_mgca_group(csv_path, line, row) if mgca_train and view == "Frontal"
                                     else -1))
            if not keep:
                tally.add("skipped_lateral")
                continue
            if image_id in seen:
                tally.add("duplicate_rows", message=f"{csv_path}:{line}: duplicate image {image_id}, skipped")
                continue
            seen.add(image_id)
            labels = []
            for t in TASKS:
                raw = row[t].strip()
                if raw not in _VALUES:
                    raise DatasetError(f"{csv_path}:{line}: column {t!r} has {raw!r}, expected 1.0, 0.0, -1.0 or blank")
                v = _VALUES[raw]
                labels.append(policy[t] if v == -1.0 else v)
            n_labelled += 1
            path = root / rel
            if not path.is_file():
                missing_image(tally, require_images, f"{csv_path}:{line}: image {path} not found, skipped")
                if require_images:
                    continue
            records.append(Record(image_id=image_id, patient_id=patient, path=path, labels=tuple(labels),
                                  official_split=split))
        if protocol == "mgca":
            label_rows[split] = tuple(rows)
    if not found_any:
        raise MflagError(f"CheXpert: none of {', '.join(files)} under {root}")
    enforce_missing(tally, n_labelled, root, max_missing)
    tally.counts["images"] = len(records)
    return DatasetSpec(name="chexpert", root=root, records=records, class_names=TASKS,
                       label_kind="multilabel", counts=tally.counts, task=task,
                       protocol=protocol, label_rows=label_rows)
