"""MIMIC-CXR-JPG 2.0.0 readers: metadata/split CSVs, image paths and report text (folder or zip).

Layout (shared FORMATS.md section 1): ``files/p10/p10000032/s50414267/<dicom_id>.jpg``; reports at
``files/p10/p10000032/s50414267.txt`` in a folder or inside ``mimic-cxr-reports.zip``. Readers here
only read; problems with single rows or reports are returned as ``BadItem`` records so the stage can
count them, name them and decide whether there are too many.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.common import MflagError, progress, unsafe_id_reason
from pipeline.corpora.base import BadItem, read_csv
from pipeline.text.sections import extract_sections, join_sections

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
REPORTS_ZIP = "mimic-cxr-reports.zip"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")

_REPORT_MEMBER = re.compile(r"(?:^|/)p(\d{2})/p(\d+)/s(\d+)\.txt$")
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class MimicImage:
    """One image row joined across the metadata and split CSVs. Ids are digit strings without prefix."""

    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    split: str
    # the image's pixel size as the metadata CSV gives it (DICOM Rows x Columns), None where it does not
    rows: int | None = None
    cols: int | None = None

    @property
    def relpath(self) -> str:
        return image_relpath(self.subject_id, self.study_id, self.dicom_id)


def image_relpath(subject_id: str, study_id: str, dicom_id: str, ext: str = ".jpg") -> str:
    """``files/pNN/p<subject>/s<study>/<dicom_id>.jpg`` relative to the MIMIC-CXR-JPG root."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}{ext}"


def report_relpath(subject_id: str, study_id: str) -> str:
    """``files/pNN/p<subject>/s<study>.txt`` as in the reports folder and zip."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


# --------------------------------------------------------------------------- CSVs
def find_csv(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists (plain first: it reads faster)."""
    root = Path(root)
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    raise MflagError(f"{root}: neither {name} nor {name}.gz found")


def _size(value: str | None) -> int | None:
    """A pixel count from the metadata CSV ("2544" or "2544.0"), or None when blank or not a number."""
    try:
        v = float(value) if value else None
    except ValueError:
        return None
    return int(v) if v is not None and v.is_integer() and v > 0 else None


def _id(value: str | None) -> str | None:
    """MIMIC ids as digit strings; tolerate the float form ("10000032.0") some exports write."""
    if value is None:
        return None
    v = value[:-2] if value.endswith(".0") else value
    v = v.lstrip("ps") if v[:1] in ("p", "s") else v
    return v if _DIGITS.fullmatch(v) else None


@dataclass
class MimicIndex:
    """All images of the selected views and splits, plus what was filtered out and why."""

    images: list[MimicImage]
    bad: list[BadItem]
    filtered: dict[str, dict[str, int]]  # {"view": {"LATERAL": n, ...}, "split": {...}}
    n_rows: int
    metadata_csv: Path
    split_csv: Path


def load_index(root: str | os.PathLike, views: Sequence[str], splits: Sequence[str]) -> MimicIndex:
    """Join the metadata and split CSVs of a MIMIC-CXR-JPG root by dicom_id and filter views/splits.

    ``views`` compare case-insensitively with ViewPosition (blank views never match). Malformed or
    duplicate rows and images without a split row become ``BadItem``s naming "file:line".
    """
    root = Path(root)
    meta_path, split_path = find_csv(root, METADATA_CSV), find_csv(root, SPLIT_CSV)
    bad: list[BadItem] = []
    split_of: dict[str, tuple[str, str, str]] = {}
    for line, row in read_csv(split_path, SPLIT_COLUMNS):
        where = f"{split_path}:{line}"
        subj, study, dicom = _id(row["subject_id"]), _id(row["study_id"]), row["dicom_id"]
        if not dicom or subj is None or study is None or not row["split"]:
            bad.append(BadItem("bad_csv_row", where, f"malformed row {row}"))
        elif dicom in split_of:
            bad.append(BadItem("bad_csv_row", where, f"duplicate dicom_id {dicom}", {"dicom_id": dicom}))
        else:
            split_of[dicom] = (row["split"].strip().lower(), subj, study)

    want_views = {v.strip().upper() for v in views}
    want_splits = {s.strip().lower() for s in splits}
    filtered: dict[str, dict[str, int]] = {"view": {}, "split": {}}
    images: list[MimicImage] = []
    seen: set[str] = set()
    n_rows = 0
    for line, row in read_csv(meta_path, METADATA_COLUMNS, optional=("Rows", "Columns")):
        n_rows += 1
        where = f"{meta_path}:{line}"
        subj, study, dicom = _id(row["subject_id"]), _id(row["study_id"]), row["dicom_id"]
        if not dicom or subj is None or study is None:
            bad.append(BadItem("bad_csv_row", where, f"malformed row {row}"))
            continue
        why = unsafe_id_reason(dicom)
        if why is not None:  # it would name a file outside --root and a tar member outside the shard
            bad.append(BadItem("bad_csv_row", where, f"dicom_id {dicom!r} {why}; not used as a file name",
                               {"subject_id": subj, "study_id": study}))
            continue
        ids = {"dicom_id": dicom, "subject_id": subj, "study_id": study}
        if dicom in seen:
            bad.append(BadItem("bad_csv_row", where, f"duplicate dicom_id {dicom}", ids))
            continue
        seen.add(dicom)
        view = (row["ViewPosition"] or "").strip()
        if view.upper() not in want_views:
            key = view or "(blank)"
            filtered["view"][key] = filtered["view"].get(key, 0) + 1
            continue
        sp = split_of.get(dicom)
        if sp is None:
            bad.append(BadItem("no_split_row", where, f"dicom_id {dicom} is not in {split_path.name}", ids))
            continue
        split, s_subj, s_study = sp
        if (s_subj, s_study) != (subj, study):
            bad.append(BadItem("bad_csv_row", where,
                               f"{meta_path.name} and {split_path.name} disagree on subject/study of {dicom}", ids))
            continue
        if split not in want_splits:
            filtered["split"][split] = filtered["split"].get(split, 0) + 1
            continue
        images.append(MimicImage(dicom, subj, study, view.upper(), split, _size(row.get("Rows")),
                                 _size(row.get("Columns"))))
    return MimicIndex(images, bad, filtered, n_rows, meta_path, split_path)


# --------------------------------------------------------------------------- reports
class ReportError(Exception):
    """A report exists but cannot be read (``reason`` is "unreadable_report" or "empty_report")."""

    def __init__(self, reason: str, where: str, detail: str):
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: {detail}")


def _has_reports(files: Path, max_subjects: int = 64) -> bool:
    """True when one of the first ``max_subjects`` subject folders under ``files/pNN/`` holds a report
    (a few directory listings, not a walk of the whole tree)."""
    seen = 0
    try:
        for group in sorted(files.iterdir()):
            if not (group.is_dir() and group.name.startswith("p")):
                continue
            for subject in group.iterdir():
                if subject.is_dir() and subject.name.startswith("p"):
                    if any(c.suffix == ".txt" and c.name.startswith("s") for c in subject.iterdir()):
                        return True
                    seen += 1
                    if seen >= max_subjects:
                        return False
    except OSError:
        return False
    return False


class ReportSource:
    """Report text per (subject_id, study_id) from an extracted folder or ``mimic-cxr-reports.zip``.

    ``path`` may be the zip, a folder holding ``mimic-cxr-reports.zip`` (used in preference to any
    text files beside it), or a folder holding ``files/pNN/...`` (or being ``files/`` itself). Use
    ``get`` from one process only (zip handles are not shareable across forks); ``close`` when done.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if path.is_dir() and (path / REPORTS_ZIP).is_file():
            # The zip is the published form; a MIMIC-CXR-JPG root often holds it next to files/.
            path = path / REPORTS_ZIP
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise MflagError(f"{path}: not a readable zip of reports ({e})") from e
            for name in self._zip.namelist():
                m = _REPORT_MEMBER.search(name)
                if m:
                    self._members[report_relpath(m.group(2), m.group(3))] = name
            self.where = str(path)
            if not self._members:
                raise MflagError(f"{path}: no reports of the form files/pNN/p<subject>/s<study>.txt inside")
        elif path.is_dir():
            self._base = path.parent if path.name == "files" else path
            self.where = str(self._base)
            if not _has_reports(self._base / "files"):
                raise MflagError(
                    f"{path}: no reports here (expected files/pNN/p<subject>/s<study>.txt or {REPORTS_ZIP}). "
                    "MIMIC-CXR-JPG does not include the reports: pass --reports with mimic-cxr-reports.zip "
                    "(from the MIMIC-CXR project) or the folder it was extracted to")
        else:
            raise MflagError(f"{path}: reports folder or zip not found")

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    def location(self, subject_id: str, study_id: str) -> str:
        """Where the report of a study is or would be: a file path or ``zip:member``."""
        rel = report_relpath(subject_id, study_id)
        if self._zip is not None:
            return f"{self.where}:{self._members.get(rel, rel)}"
        return str(self._base / rel)

    def get(self, subject_id: str, study_id: str) -> str | None:
        """The report text, or None when the study has no report.

        Raises ``ReportError`` for an unreadable file/zip member (CRC error, bad compression, not
        UTF-8) or a report with no text at all.
        """
        rel = report_relpath(subject_id, study_id)
        where = self.location(subject_id, study_id)
        try:
            if self._zip is not None:
                member = self._members.get(rel)
                if member is None:
                    return None
                data = self._zip.read(member)
            else:
                try:
                    data = (self._base / rel).read_bytes()
                except FileNotFoundError:
                    return None
            text = data.decode("utf-8").removeprefix("\ufeff")
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError,
                UnicodeDecodeError) as e:
            raise ReportError("unreadable_report", where, f"cannot read report ({type(e).__name__}: {e})") from e
        if not text.strip():
            raise ReportError("empty_report", where, "report is empty")
        return text

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "ReportSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def study_texts(by_study: dict[tuple[str, str], list], reports_path: str, sections: Sequence[str],
                separator: str, report) -> tuple[dict[tuple[str, str], tuple[str, list[str]]], int]:
    """The report text of each ``(subject_id, study_id)`` of ``by_study`` (-> its images): the
    ``sections`` joined by ``separator``, as ``{key: (text, sections used)}``, and the number of images
    whose study has no readable report. Unreadable or missing reports go to ``report.add_bad``, reports
    without text in those sections to ``report.add_dropped``. Read in the calling process: the zip
    handle must not cross a fork."""

    texts: dict[tuple[str, str], tuple[str, list[str]]] = {}
    n_bad_images = 0
    with ReportSource(reports_path) as reports:
        for key in progress(sorted(by_study, key=lambda k: (int(k[0]), int(k[1]))), total=len(by_study),
                            desc="reports", unit="study"):
            subj, study = key
            ids = {"subject_id": subj, "study_id": study, "n_images": len(by_study[key])}
            try:
                raw = reports.get(subj, study)
            except ReportError as e:
                report.add_bad(BadItem(e.reason, e.where, e.detail, ids))
                n_bad_images += len(by_study[key])
                continue
            if raw is None:
                report.add_bad(BadItem("no_report", reports.location(subj, study), "study has no report", ids))
                n_bad_images += len(by_study[key])
                continue
            found = extract_sections(raw)
            text, used = join_sections(found, sections, separator)
            if not text.strip():
                present = [s for s in sections if s in found]
                reason = "no_text_empty_sections" if present else "no_text_sections_absent"
                report.add_dropped(reason, reports.location(subj, study),
                                   f"no text in sections {','.join(sections)} "
                                   f"(found: {','.join(sorted(found)) or 'none'})", ids)
                continue
            texts[key] = (text, used)
    return texts, n_bad_images
