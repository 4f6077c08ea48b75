"""CheXpert Plus: ``df_chexpert_plus_240401.csv`` (one row per image, report sections as columns) + images.

Images are under ``--root`` at ``path_to_image`` (the JPG or the PNG release: the listed extension is
tried first, then the other). A study is one report: patient (``deid_patient_id``) + report order
(``patient_report_date_order``), key ``<patient>_<order>``. Frontal images only by default
(``frontal_lateral``); the view is ``ap_pa`` (AP/PA). The split is the CSV's (train, valid ->
validate). Text: the ``section_<name>`` columns named by ``--text-sections``, joined in that order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.common import ConfigError
from pipeline.corpora.base import (
    SPLIT_ALIASES,
    BadItem,
    CorpusError,
    CorpusImage,
    CsvColumnError,
    Selection,
    ShardOptions,
    image_key,
    read_csv,
    sections_option,
    splits_option,
    unsafe_relpath_reason,
)
from pipeline.options import option

CSV_NAME = "df_chexpert_plus_240401.csv"
COLUMNS = ("path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order", "split")
_OTHER_EXT = {".jpg": ".png", ".jpeg": ".png", ".png": ".jpg"}


@dataclass(frozen=True, kw_only=True)
class ChexpertPlusConfig(ShardOptions):
    """Options of ``prepare chexpert-plus``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("root", "csv")

    root: str = option(help="CheXpert Plus root: the folder path_to_image is relative to.", exists="dir")
    csv: str | None = option(None, exists="file", help=f"The report table. Default: ROOT/{CSV_NAME} (or .gz).")
    views: tuple[str, ...] = option(("frontal",), help="frontal_lateral values to keep (frontal, lateral).")
    splits: tuple[str, ...] = splits_option(("train", "validate"))
    text_sections: tuple[str, ...] = sections_option("Report sections (section_<name> columns)")

    def normalise(self) -> None:
        if self.csv is None:
            for name in (CSV_NAME, f"{CSV_NAME}.gz"):
                if (Path(self.root) / name).is_file():
                    self._set("csv", str(Path(self.root) / name))
                    break
        self._set("views", tuple(str(v).strip().lower() for v in self.views if str(v).strip()))

    def check(self) -> None:  # the inputs last: a pipeline checks the other options before they exist
        if not self.views:
            raise ConfigError("views: give at least one of frontal, lateral")
        if not Path(self.root).is_dir():
            raise ConfigError(f"root: {self.root} is not a directory")
        if self.csv is None or not Path(self.csv).is_file():
            raise ConfigError(f"csv: {self.csv or Path(self.root) / CSV_NAME} not found; name the table with --csv")

    def content_dict(self) -> dict:
        return {"corpus": "chexpert-plus", **super().content_dict()}


def find_image(root: Path, rel: str) -> str | None:
    """``rel`` as listed, else with the other release's extension (.jpg <-> .png); None when neither exists."""
    if (root / rel).is_file():
        return rel
    p = Path(rel)
    other = _OTHER_EXT.get(p.suffix.lower())
    if other and (root / p.with_suffix(other)).is_file():
        return str(p.with_suffix(other))
    return None


def read(cfg: ChexpertPlusConfig, report) -> Selection:
    root, table = Path(cfg.root), Path(cfg.csv)
    sections = tuple(f"section_{s}" for s in cfg.text_sections)
    try:
        rows = list(read_csv(table, (*COLUMNS, *sections)))
    except CsvColumnError as e:
        report.bad.append(BadItem("missing_column", str(e.path), str(e), {"column": e.column}))
        raise
    images: list[CorpusImage] = []
    texts: dict[tuple[str, str], tuple[str, list[str]]] = {}
    filtered: dict[str, Counter] = {"view": Counter(), "split": Counter()}
    seen: dict[str, str] = {}
    first_row: dict[tuple[str, str], str] = {}
    n_considered = n_bad = 0

    def bad(reason: str, where: str, detail: str, ids: dict) -> None:
        nonlocal n_bad
        n_bad += 1
        report.add_bad(BadItem(reason, where, detail, ids))

    for line, row in rows:
        where = f"{table}:{line}"
        if any(v is None for v in row.values()):
            n_considered += 1
            bad("bad_csv_row", where, "fewer fields than the header", {})
            continue
        view = row["frontal_lateral"].strip().lower()
        if view not in cfg.views:
            filtered["view"][view or "(blank)"] += 1
            continue
        split = SPLIT_ALIASES.get(row["split"].strip().lower(), row["split"].strip().lower() or "(blank)")
        if split not in cfg.splits:
            filtered["split"][split] += 1
            continue
        n_considered += 1
        patient, order = row["deid_patient_id"], row["patient_report_date_order"]
        rel = row["path_to_image"]
        study = f"{patient}_{order[:-2] if order.endswith('.0') else order}"
        ids = {"study_id": study, "subject_id": patient}
        if not patient or not order or not rel:
            bad("bad_csv_row", where, "empty path_to_image, deid_patient_id or patient_report_date_order", ids)
            continue
        why = unsafe_relpath_reason(rel)
        if why is not None:
            bad("unsafe_path", where, f"path_to_image {rel!r} {why}", ids)
            continue
        if rel in seen:
            bad("duplicate_image", where, f"{rel} is already listed at {seen[rel]}", ids)
            continue
        seen[rel] = where
        found = find_image(root, rel)
        if found is None:
            other = _OTHER_EXT.get(Path(rel).suffix.lower(), "another extension")
            bad("missing_image", where, f"{root / rel}: image file not found (nor with {other})", ids)
            continue
        if (patient, study) not in texts:
            used = [s for s, col in zip(cfg.text_sections, sections) if row[col].strip()]
            text = cfg.section_separator.join(" ".join(row[f"section_{s}"].split()) for s in used)
            texts[(patient, study)] = (text, used)
            first_row[(patient, study)] = where
        images.append(CorpusImage(image_key(rel), patient, study, row["ap_pa"].strip().upper(), split, found))
    no_text = {k for k, (t, _) in texts.items() if not t.strip()}
    for patient, study in sorted(no_text):
        report.add_dropped("no_text_empty_sections", first_row[(patient, study)], f"study {study}: no text in sections "
                           f"{','.join(cfg.text_sections)}", {"study_id": study, "subject_id": patient})
        del texts[(patient, study)]
    report.filtered = {k: dict(v) for k, v in filtered.items()}
    report.counts.update(csv_rows=len(rows), images_selected=len(images), studies_with_text=len(texts),
                         filtered_view=sum(filtered["view"].values()), filtered_split=sum(filtered["split"].values()))
    if not images:
        raise CorpusError(f"{table}: no {','.join(cfg.views)} image in splits {','.join(cfg.splits)} found under "
                          f"{root} (see {report.path})")
    return Selection(images, texts, root, n_considered, n_bad, {"corpus": "chexpert-plus"})
