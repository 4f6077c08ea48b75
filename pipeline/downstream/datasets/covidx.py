"""COVIDx CXR-2/3: space-separated label files `patientid filename class datasource`, two label sets."""
from __future__ import annotations

from pathlib import Path

from pipeline.common import MflagError, open_text_utf8, unsafe_id_reason
from pipeline.downstream.datasets._common import (
    DEFAULT_MAX_MISSING,
    DatasetError,
    Tally,
    check_protocol,
    enforce_missing,
    missing_image,
)
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow, Record

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "A": ("normal", "pneumonia", "COVID-19"),
    "B": ("negative", "positive"),
}


def _find_label_file(root: Path, split: str, given: str | None) -> Path | None:
    if given:
        p = root / given
        if not p.is_file():
            raise MflagError(f"COVIDx: label file {p} not found")
        return p
    if (root / f"{split}.txt").is_file():
        return root / f"{split}.txt"
    # [pub] releases name them train_COVIDx9A.txt, test_COVIDx9B.txt, ...: accept one unambiguous match.
    matches = sorted(p for p in root.glob(f"{split}*.txt") if p.is_file())
    if len(matches) > 1:
        raise MflagError(f"COVIDx: several {split} label files under {root} "
                         f"({', '.join(m.name for m in matches)}); name one explicitly")
    return matches[0] if matches else None


def _parse_line(path: Path, line_no: int, text: str) -> tuple[str, str, str]:
    """(patientid, filename, class) of one label line."""
    tokens = text.split()
    # [pub] four columns `patientid filename class datasource`; older releases omit datasource.
    # With four or more tokens the class is the second to last, so a filename with spaces survives.
    if len(tokens) >= 4:
        return tokens[0], " ".join(tokens[1:-2]), tokens[-2]
    if len(tokens) == 3:
        return tokens[0], tokens[1], tokens[2]
    raise DatasetError(f"{path}:{line_no}: expected `patientid filename class datasource`, got {text.strip()!r}")


def read_covidx(root: str | Path, task: str = "cls", label_set: str = "auto",
                train_file: str | None = None, test_file: str | None = None,
                train_dir: str = "train", test_dir: str = "test",
                max_missing: float = DEFAULT_MAX_MISSING, protocol: str = "tool",
                require_images: bool = True) -> DatasetSpec:
    """Read COVIDx into one-hot multiclass records.

    ``label_set``: "A" (normal, pneumonia, COVID-19), "B" (negative, positive) or "auto" (the set
    containing every class in the files). A class outside the set is a DatasetError naming the file and
    line; nothing is mapped silently. Records carry ``official_split`` "train" or "test".
    Under ``protocol="mgca"`` every label line (duplicates too) is kept in ``label_rows`` by file.
    """
    check_protocol("covidx", protocol)
    if label_set not in ("auto", *LABEL_SETS):
        raise MflagError(f"COVIDx: label_set must be auto, A or B, not {label_set!r}")
    root = Path(root)
    rows: list[tuple[Path, int, str, str, str, str]] = []  # file, line, split, pid, fname, class
    for split, given, _img_dir in (("train", train_file, train_dir), ("test", test_file, test_dir)):
        path = _find_label_file(root, split, given)
        if path is None:
            continue
        with open_text_utf8(path) as fh:
            for line_no, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                pid, fname, cls = _parse_line(path, line_no, text)
                rows.append((path, line_no, split, pid, fname, cls))
    if not rows:
        raise MflagError(f"COVIDx: no label lines found under {root} (train.txt / test.txt or train*.txt / test*.txt)")

    # Class strings match case-insensitively ("covid-19" and "COVID-19" are one class) but nothing else
    # is folded: an unknown string stays an error.
    if label_set == "auto":
        seen = {r[5].lower() for r in rows}
        fits = [k for k, names in LABEL_SETS.items() if seen <= {n.lower() for n in names}]
        if not fits:
            # Name the first line that fits no set, judged against the set its file mostly uses.
            best = max(LABEL_SETS, key=lambda k: sum(r[5].lower() in {n.lower() for n in LABEL_SETS[k]} for r in rows))
            label_set = best
        else:
            label_set = fits[0]
    names = LABEL_SETS[label_set]
    index = {n.lower(): i for i, n in enumerate(names)}

    tally = Tally()
    records: list[Record] = []
    seen_ids: set[str] = set()
    dirs = {"train": train_dir, "test": test_dir}
    for path, line_no, split, pid, fname, cls in rows:
        if cls.lower() not in index:
            raise DatasetError(f"{path}:{line_no}: unknown class {cls!r} for label set {label_set} "
                               f"({', '.join(names)})")
        tally.add("rows")
        image_id = f"{split}/{fname}"
        if unsafe_id_reason(fname):
            tally.add("unsafe_ids", message=f"{path}:{line_no}: filename {fname!r} {unsafe_id_reason(fname)}; "
                                            "line skipped")
            continue
        if image_id in seen_ids:
            tally.add("duplicate_rows", message=f"{path}:{line_no}: duplicate image {fname}, skipped")
            continue
        seen_ids.add(image_id)
        img = root / dirs[split] / fname
        if not img.is_file():
            missing_image(tally, require_images, f"{path}:{line_no}: image {img} not found, skipped")
            if require_images:
                continue
        onehot = [0.0] * len(names)
        onehot[index[cls.lower()]] = 1.0
        records.append(Record(image_id=image_id, patient_id=pid, path=img, labels=tuple(onehot),
                              official_split=split))
    enforce_missing(tally, tally.counts.get("rows", 0) - tally.counts.get("duplicate_rows", 0), root, max_missing)
    tally.counts["images"] = len(records)
    label_rows: dict[str, tuple[LabelRow, ...]] = {}
    if protocol == "mgca":
        for split in ("train", "test"):
            label_rows[split] = tuple(LabelRow(f"{split}/{fname}", pid, line_no)
                                      for _, line_no, sp, pid, fname, _ in rows if sp == split)
    return DatasetSpec(name="covidx", root=root, records=records, class_names=names,
                       label_kind="multiclass", counts=tally.counts, task=task,
                       protocol=protocol, label_rows=label_rows)
