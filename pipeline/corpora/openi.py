"""IU X-ray / OpenI: ``NLMCXR_reports.tgz`` (or the folder it unpacks to) + the PNGs of ``NLMCXR_png.tgz``.

Each ``ecgen-radiology/<n>.xml`` is one report and one study: its key is ``n``; its images are its
``parentImage`` ids, files ``<id>.png`` in the images folder; its text is the ``AbstractText``
sections chosen by label (FINDINGS, IMPRESSION; the MIMIC aliases apply). OpenI has no patient ids
(each report stands for its own patient) and no official split: one is drawn per report from
``--split-seed``. Without ``--projections`` (Kaggle's ``indiana_projections.csv``) every image of a
report is kept, frontal or lateral, and prepare-report.json says so.
"""
from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

from pipeline.common import ConfigError, MflagError, unsafe_id_reason
from pipeline.corpora.base import (
    BadItem,
    CorpusError,
    CorpusImage,
    Selection,
    ShardOptions,
    check_fractions,
    draw_split,
    read_csv,
    sections_option,
    splits_option,
)
from pipeline.options import option
from pipeline.text.sections import ALIASES, join_sections

REPORTS_TGZ = "NLMCXR_reports.tgz"
PROJECTIONS_COLUMNS = ("uid", "filename", "projection")
_XML_NAME = re.compile(r"(?:^|/)(\d+)\.xml$")


@dataclass(frozen=True, kw_only=True)
class OpenIConfig(ShardOptions):
    """Options of ``prepare openi``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("reports", "images", "projections")

    reports: str = option(help=f"{REPORTS_TGZ} as published, or the folder it unpacks to (ecgen-radiology/<n>.xml).",
                          exists="any")
    images: str = option(help="Folder of the PNGs as NLMCXR_png.tgz unpacks (<parentImage id>.png).", exists="dir")
    projections: str | None = option(None, exists="file",
                                     help="indiana_projections.csv (uid,filename,projection): keep frontal images "
                                          "only. Default: every image of a report.")
    text_sections: tuple[str, ...] = sections_option("AbstractText sections (by Label)")
    splits: tuple[str, ...] = splits_option()
    split_seed: int = option(0, help="Seed of the drawn train/validate/test split (by report).")
    split_fractions: tuple[float, ...] = option((0.9, 0.05, 0.05), min=0, max=1,
                                                help="Shares of train, validate and test in the drawn split.")

    def check(self) -> None:
        check_fractions("split_fractions", self.split_fractions)
        if not Path(self.reports).exists():
            raise ConfigError(f"reports: {self.reports} does not exist")
        if not Path(self.images).is_dir():
            raise ConfigError(f"images: {self.images} is not a directory")

    def content_dict(self) -> dict:
        return {"corpus": "openi", **super().content_dict()}


@dataclass
class OpenIReport:
    """One ecgen-radiology XML: its number, sections by canonical name and parentImage ids."""

    study: str
    where: str
    sections: dict[str, str]
    images: list[str]


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def parse_report(data: bytes, study: str, where: str) -> OpenIReport:
    """Sections (``AbstractText`` by Label, canonical names as MIMIC's parser) and parentImage ids of one
    report; a Label seen twice is joined in order. Raises ``MflagError`` naming ``where`` for bad XML."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise MflagError(f"{where}: not valid XML ({e})") from e
    sections: dict[str, str] = {}
    for node in root.iter("AbstractText"):
        label = " ".join((node.get("Label") or "").upper().split())
        if not label:
            continue
        name = ALIASES.get(label, label.lower().replace(" ", "_"))
        body = _clean("".join(node.itertext()))
        sections[name] = f"{sections[name]} {body}".strip() if sections.get(name) else body
    images = [i for i in (n.get("id") for n in root.iter("parentImage")) if i is not None]
    return OpenIReport(study, where, sections, list(dict.fromkeys(images)))


def iter_reports(path: str | Path) -> Iterator[tuple[str, str, bytes]]:
    """``(study number, where, XML bytes)`` of every ``<n>.xml`` in the tgz or folder ``path``, in
    number order. Raises ``MflagError`` when there are none or the archive cannot be read."""
    path = Path(path)
    found: list[tuple[int, str, object]] = []
    if path.is_dir():
        base = path / "ecgen-radiology" if (path / "ecgen-radiology").is_dir() else path
        for p in base.iterdir():
            m = _XML_NAME.search(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), str(p), p))
        if not found:
            raise MflagError(f"{path}: no report XMLs (<n>.xml) here or in ecgen-radiology/")
        for _, where, p in sorted(found):
            yield str(int(_XML_NAME.search(p.name).group(1))), where, p.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            members = [(int(m.group(1)), mem) for mem in tf.getmembers() if mem.isfile()
                       for m in [_XML_NAME.search(mem.name)] if m]
            if not members:
                raise MflagError(f"{path}: no report XMLs (ecgen-radiology/<n>.xml) inside")
            for number, mem in sorted(members, key=lambda t: t[0]):
                fh = tf.extractfile(mem)
                yield str(number), f"{path}:{mem.name}", fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MflagError(f"{path}: cannot read the reports archive ({type(e).__name__}: {e})") from e


def read_projections(path: str | Path) -> dict[str, str]:
    """``indiana_projections.csv`` -> {image id as in parentImage (``CXR<filename stem>``): projection}."""

    out: dict[str, str] = {}
    for _, row in read_csv(path, PROJECTIONS_COLUMNS):
        name = row["filename"] or ""
        stem = re.sub(r"(\.dcm)?\.png$", "", name, flags=re.IGNORECASE)
        if stem and row["projection"]:
            out[stem if stem.startswith("CXR") else f"CXR{stem}"] = row["projection"].strip().lower()
    return out


def image_file(image_id: str, present: set[str]) -> str | None:
    """The file of a parentImage id in the images folder: ``<id>.png`` as NLMCXR_png.tgz unpacks, else the
    Kaggle copy's ``<id without CXR>.dcm.png`` (images_normalized/); None when neither is there."""
    for name in (f"{image_id}.png", f"{image_id.removeprefix('CXR')}.dcm.png"):
        if name in present:
            return name
    return None


def read(cfg: OpenIConfig, report) -> Selection:
    """The reports with text and at least one image present become studies; the rest is counted."""
    images_dir = Path(cfg.images)
    projections = read_projections(cfg.projections) if cfg.projections else None
    present = {p.name for p in images_dir.iterdir()} if images_dir.is_dir() else set()
    images: list[CorpusImage] = []
    texts: dict[tuple[str, str], tuple[str, list[str]]] = {}
    filtered: dict[str, Counter] = {"view": Counter(), "split": Counter()}
    n_reports = n_considered = n_bad = 0
    for study, where, data in iter_reports(cfg.reports):
        n_reports += 1
        ids = {"study_id": study, "subject_id": study}
        try:
            rep = parse_report(data, study, where)
        except MflagError as e:
            report.add_bad(BadItem("unreadable_report", where, str(e), ids))
            continue
        # Reasons in this order: no image listed, no frontal one (with --projections), no text, then
        # (for reports that would be used) no listed image present in the images folder.
        if not rep.images:
            report.add_dropped("no_image_listed", where, "the report lists no parentImage", ids)
            continue
        listed = []
        for image_id in rep.images:
            why = unsafe_id_reason(image_id) or ("contains '.'" if "." in image_id else None)
            if why is not None:  # it names a file, and a shard member (whose key ends at the first dot)
                report.add_bad(BadItem("bad_image_id", where, f"parentImage id {image_id!r} {why}", ids))
                continue
            view = projections.get(image_id, "") if projections is not None else ""
            if projections is not None and view != "frontal":
                filtered["view"][view or "(not in projections)"] += 1
                continue
            listed.append((image_id, view))
        if not listed:
            report.add_dropped("no_frontal_image", where, f"no frontal image among {', '.join(rep.images)}", ids)
            continue
        text, used = join_sections(rep.sections, cfg.text_sections, cfg.section_separator)
        if not text.strip():
            present_sections = [s for s in cfg.text_sections if s in rep.sections]
            reason = "no_text_empty_sections" if present_sections else "no_text_sections_absent"
            report.add_dropped(reason, where, f"no text in sections {','.join(cfg.text_sections)} "
                               f"(found: {','.join(sorted(rep.sections)) or 'none'})", ids)
            continue
        split = draw_split(study, cfg.split_seed, cfg.split_fractions)
        if split not in cfg.splits:
            filtered["split"][split] += len(listed)
            continue
        n_considered += len(listed)
        kept = []
        for image_id, view in listed:
            name = image_file(image_id, present)
            if name is not None:
                kept.append(CorpusImage(image_id, study, study, view.upper(), split, name))
            else:
                n_bad += 1
                report.add_bad(BadItem("missing_image", str(images_dir / f"{image_id}.png"),
                                       "image file not found", {"dicom_id": image_id, **ids}))
        if not kept:
            report.add_dropped("no_image_present", where,
                               f"none of {', '.join(i for i, _ in listed)} is in {images_dir}", ids)
            continue
        images.extend(kept)
        texts[(study, study)] = (text, used)
    report.filtered = {k: dict(v) for k, v in filtered.items()}
    report.counts.update(reports_read=n_reports, images_selected=len(images), studies_with_text=len(texts),
                         filtered_view=sum(filtered["view"].values()), filtered_split=sum(filtered["split"].values()))
    if projections is None:
        report.notes.append("no --projections given: every image of a report is kept, frontal and lateral")
    if not images:
        dropped = dict(Counter(d["reason"] for d in report.dropped))
        raise CorpusError(f"{cfg.reports}: no report has both text in sections {','.join(cfg.text_sections)} and "
                          f"an image in {images_dir} (skipped: {dropped or 'none'}; bad: "
                          f"{dict(report.reason_counts()) or 'none'}; every one is named in {report.path})")
    split_counts = Counter(i.split for i in images)
    manifest = {"corpus": "openi", "split": {
        "drawn": True, "unit": "report", "seed": cfg.split_seed,
        "fractions": dict(zip(("train", "validate", "test"), cfg.split_fractions)),
        "studies": {s: len({i.study for i in images if i.split == s}) for s in split_counts}}}
    return Selection(images, texts, images_dir, n_considered, n_bad, manifest)

