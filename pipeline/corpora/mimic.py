"""The MIMIC-CXR-JPG corpus: ``prepare mimic``'s options and its reader (files: ``pipeline.corpora.mimic_files``).

Images come from the metadata and split CSVs (views and splits filtered), report text from the
MIMIC-CXR report files or zip by section. Its shards, reports.jsonl and manifest are what they were
before prepare read other corpora (a test compares their hashes).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.common import ConfigError
from pipeline.corpora.base import (
    BadItem,
    CorpusError,
    CorpusImage,
    CsvColumnError,
    Selection,
    ShardOptions,
    sections_option,
    splits_option,
)
from pipeline.corpora.mimic_files import MimicImage, load_index, study_texts
from pipeline.options import option


@dataclass(frozen=True, kw_only=True)
class MimicConfig(ShardOptions):
    """Options of ``prepare mimic`` (each field is the option of the same name, pipeline.options).
    ``reports`` defaults to ``root`` (reports extracted beside images)."""

    INPUTS: ClassVar[tuple[str, ...]] = ("root", "reports")

    root: str = option(help="MIMIC-CXR-JPG root (holds files/ and the metadata/split CSVs, .csv or .csv.gz).",
                       exists="dir")
    reports: str | None = option(None, exists="any",
                                 help="Reports folder (files/pNN/...) or mimic-cxr-reports.zip. Default: --root.")
    views: tuple[str, ...] = option(("PA", "AP"), help="ViewPosition values to keep.")
    splits: tuple[str, ...] = splits_option()
    text_sections: tuple[str, ...] = sections_option()

    def normalise(self) -> None:
        if self.reports is None:
            self._set("reports", self.root)
        self._set("views", tuple(str(v).strip().upper() for v in self.views if str(v).strip()))

    def check(self) -> None:
        if not Path(self.root).is_dir():
            raise ConfigError(f"root: {self.root} is not a directory")
        if not Path(self.reports).exists():
            raise ConfigError(f"reports: {self.reports} does not exist")
        if not self.views:
            raise ConfigError("views: give at least one view position (e.g. PA,AP)")


def read(cfg: MimicConfig, report) -> Selection:
    """The selected images of a MIMIC-CXR-JPG root and the text of their studies."""
    root = Path(cfg.root)
    try:
        index = load_index(root, cfg.views, cfg.splits)
    except CsvColumnError as e:
        report.bad.append(BadItem("missing_column", str(e.path), str(e), {"column": e.column}))
        raise  # prepare writes the failed report
    for b in index.bad:
        report.add_bad(b)
    report.counts["metadata_rows"] = index.n_rows
    report.counts["filtered_view"] = sum(index.filtered["view"].values())
    report.counts["filtered_split"] = sum(index.filtered["split"].values())
    report.filtered = index.filtered
    images = index.images
    report.counts["images_selected"] = len(images)
    # Denominator of the bad fraction: every image that prepare was asked to consider.
    n_considered = len(images) + sum(1 for b in index.bad if b.reason in ("bad_csv_row", "no_split_row"))
    if not images:
        raise CorpusError(f"{index.metadata_csv}: no images with views {','.join(cfg.views)} in splits "
                          f"{','.join(cfg.splits)} (filtered by view: {index.filtered['view']}, "
                          f"by split: {index.filtered['split']})")

    by_study: dict[tuple[str, str], list[MimicImage]] = defaultdict(list)
    for img in images:
        by_study[(img.subject_id, img.study_id)].append(img)
    texts, n_no_report = study_texts(by_study, cfg.reports, cfg.text_sections, cfg.section_separator, report)
    n_bad_images = sum(1 for b in index.bad if b.reason in ("bad_csv_row", "no_split_row")) + n_no_report
    report.counts["studies_selected"] = len(by_study)
    report.counts["studies_with_text"] = len(texts)
    records = [CorpusImage(i.dicom_id, i.subject_id, i.study_id, i.view, i.split, i.relpath, i.rows, i.cols)
               for i in images]
    return Selection(records, texts, root, n_considered, n_bad_images)
