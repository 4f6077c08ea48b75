"""CheXpert v1.0 (and the -small variant): train.csv / valid.csv, five competition tasks."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pipeline.common import MflagError, unsafe_id_reason
from pipeline.datasets._common import (DEFAULT_MAX_MISSING, DatasetError, Tally, check_task,
                                       enforce_missing, read_csv_rows)
from pipeline.datasets.base import DatasetSpec, Record

TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# What an uncertain (-1) label becomes, per policy. "competition" is the usual CheXpert policy:
# U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation.
POLICIES: dict[str, dict[str, float]] = {
    "competition": {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                    "Pleural Effusion": 1.0},
    "ones": dict.fromkeys(TASKS, 1.0),
    "zeros": dict.fromkeys(TASKS, 0.0),
}
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


def read_chexpert(root: str | Path, task: str = "cls", uncertainty: str = "competition",
                  frontal_only: bool = True, max_missing: float = DEFAULT_MAX_MISSING,
                  files: tuple[str, ...] = ("train.csv", "valid.csv")) -> DatasetSpec:
    """Read CheXpert into records with the five competition labels (0/1 after ``uncertainty``).

    ``uncertainty``: competition (U-Ones/U-Zeros mix) | ones | zeros; blank labels count as 0.
    Records carry ``official_split`` "train" or "valid"; ``patient_id`` is the patientNNNNN folder.
    """
    check_task("chexpert", task, ("cls",))
    if uncertainty not in POLICIES:
        raise MflagError(f"CheXpert: unknown uncertainty policy {uncertainty!r} (one of {', '.join(POLICIES)})")
    policy = POLICIES[uncertainty]
    root = _resolve_root(Path(root))
    tally = Tally()
    records: list[Record] = []
    seen: set[str] = set()
    n_labelled = 0
    found_any = False
    for fname in files:
        csv_path = root / fname
        if not csv_path.is_file():
            continue
        found_any = True
        split = Path(fname).stem
        for line, row in read_csv_rows(csv_path, ("Path", "Frontal/Lateral", *TASKS)):
            tally.add("rows")
            view = row["Frontal/Lateral"].strip()
            if frontal_only and view != "Frontal":
                tally.add("skipped_lateral")
                continue
            rel = _relative(row["Path"].strip())
            image_id = str(rel)
            if unsafe_id_reason(image_id, allow_subfolders=True):
                tally.add("unsafe_ids", message=f"{csv_path}:{line}: Path {row['Path']!r} "
                                                f"{unsafe_id_reason(image_id, True)}; row skipped")
                continue
            if image_id in seen:
                tally.add("duplicate_rows", message=f"{csv_path}:{line}: duplicate image {image_id}, skipped")
                continue
            seen.add(image_id)
            patient = next((p for p in rel.parts if _PATIENT.match(p)), None)
            if patient is None:
                raise DatasetError(f"{csv_path}:{line}: no patientNNNNN folder in Path {row['Path']!r}")
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
                tally.add("missing_images", message=f"{csv_path}:{line}: image {path} not found, skipped")
                continue
            records.append(Record(image_id=image_id, patient_id=patient, path=path, labels=tuple(labels),
                                  official_split=split))
    if not found_any:
        raise MflagError(f"CheXpert: none of {', '.join(files)} under {root}")
    enforce_missing(tally, n_labelled, root, max_missing)
    tally.counts["images"] = len(records)
    return DatasetSpec(name="chexpert", root=root, records=records, class_names=TASKS,
                       label_kind="multilabel", tasks=("cls",), counts=tally.counts)
