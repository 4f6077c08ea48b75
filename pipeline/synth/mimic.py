"""A synthetic MIMIC-CXR-JPG 2.0.0 tree with MIMIC-CXR reports (FORMATS.md section 1).

The plan (ids, views, findings, report text, labels) is drawn sequentially from the seed; every
image then has its own generator seeded by (seed, study index, image index), so the output is
identical whatever the number of workers.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import io
import logging
import multiprocessing
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common import MflagError, atomic_path, progress
from pipeline.preempt import pool_worker_init
from pipeline.synth.phantom import Findings, Opacity, Sided, is_lateral, render, sample_findings
from pipeline.synth.reports import CHEXPERT_LABELS, Report, make_report

log = logging.getLogger(__name__)

METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
METADATA_NAME = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_NAME = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_NAME = "mimic-cxr-2.0.0-chexpert.csv.gz"
REPORTS_ZIP = "mimic-cxr-reports.zip"

# (views of one study, weight): MIMIC is mostly PA + lateral or a single portable AP; a few studies
# have three images, rare positions or a blank ViewPosition.
_VIEW_SETS = (
    (("PA", "LATERAL"), 0.44), (("AP",), 0.27), (("PA",), 0.03), (("AP", "LATERAL"), 0.06),
    (("PA", "LL"), 0.06), (("PA", "LATERAL", "LATERAL"), 0.03), (("AP", "AP"), 0.03),
    (("PA", "LATERAL", ""), 0.02), (("AP", "AP AXIAL"), 0.015), (("PA LLD", "PA"), 0.01),
    (("LAO",), 0.005), (("RAO", "PA"), 0.005), (("",), 0.02),
)
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                 "LL": "left lateral", "AP AXIAL": "antero-posterior", "PA LLD": "postero-anterior",
                 "LAO": "Left Anterior Oblique", "RAO": "Right Anterior Oblique", "": ""}


@dataclasses.dataclass
class SynthImage:
    dicom_id: str
    view: str  # ViewPosition as written ("" when blank)
    render_view: str  # the projection actually drawn
    rows: int
    cols: int
    seed: tuple[int, ...]


@dataclasses.dataclass
class SynthStudy:
    subject_id: int
    study_id: int
    split: str
    findings: Findings
    report: Report
    procedure: str
    date: int
    time: str
    images: list[SynthImage]

    @property
    def group(self) -> str:
        return f"p{str(self.subject_id)[:2]}"

    def image_path(self, img: SynthImage) -> str:
        return f"files/{self.group}/p{self.subject_id}/s{self.study_id}/{img.dicom_id}.jpg"

    @property
    def report_path(self) -> str:
        return f"files/{self.group}/p{self.subject_id}/s{self.study_id}.txt"


def _unique_ints(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    out: set[int] = set()
    while len(out) < n:
        out.update(int(x) for x in rng.integers(lo, hi, size=n - len(out)))
    vals = sorted(out)
    rng.shuffle(vals)
    return vals[:n]


def _dicom_id(rng: np.random.Generator) -> str:
    h = rng.bytes(20).hex()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def _evolve(prior: Findings, rng: np.random.Generator) -> Findings:
    """A follow-up study: mostly the same findings, some a grade better or worse, some resolved."""
    def step(sev: int) -> int:
        return int(np.clip(sev + rng.integers(-1, 2), 0, 3))

    opac = []
    for o in prior.opacities:
        s = step(o.severity) if o.kind != "nodule" else o.severity
        if s:
            opac.append(Opacity(o.kind, o.location, s))
    eff = tuple(Sided(e.side, s) for e in prior.effusions if (s := step(e.severity)))
    ptx = tuple(Sided(p.side, s) for p in prior.pneumothoraces if (s := step(p.severity)))
    return Findings(tuple(opac), prior.cardiomegaly, eff, ptx, step(prior.edema) if prior.edema else 0,
                    prior.devices, prior.foreign_objects)


def plan_mimic(n_studies: int, seed: int, image_size: int = 256) -> list[SynthStudy]:
    """Every id, view, finding and report of a synthetic MIMIC-CXR of ``n_studies`` studies."""
    if n_studies < 1:
        raise MflagError(f"n_studies must be at least 1, got {n_studies}")
    if image_size < 32:
        raise MflagError(f"image_size must be at least 32 px, got {image_size}")
    rng = np.random.default_rng([seed, 0x4D494D43])
    per_subject: list[int] = []
    while sum(per_subject) < n_studies:
        per_subject.append(int(min(rng.geometric(0.45), n_studies - sum(per_subject), 6)))
    subjects = _unique_ints(rng, len(per_subject), 10_000_000, 20_000_000)
    study_ids = _unique_ints(rng, n_studies, 50_000_000, 60_000_000)
    splits = ["train"] * len(subjects)
    order = rng.permutation(len(subjects))
    for rank, i in enumerate(order):
        # By subject, as the real split; the first two subjects guarantee non-empty val/test.
        r = rng.random()
        splits[i] = ("validate" if rank == 0 else "test" if rank == 1 else
                     "validate" if r < 0.08 else "test" if r < 0.16 else "train")
    weights = np.array([w for _, w in _VIEW_SETS])
    weights /= weights.sum()
    studies: list[SynthStudy] = []
    k = 0
    for subj, count, split in zip(subjects, per_subject, splits):
        prior: Findings | None = None
        # MIMIC shifts dates into 2100-2200, consistently per subject.
        day = datetime.date(int(rng.integers(2110, 2200)), 1, 1) + datetime.timedelta(int(rng.integers(0, 365)))
        for _ in range(count):
            findings = _evolve(prior, rng) if prior is not None and rng.random() < 0.5 else sample_findings(rng)
            views = _VIEW_SETS[int(rng.choice(len(_VIEW_SETS), p=weights))][0]
            frontal = [v for v in views if v and not is_lateral(v)]
            exam = ("CHEST (PORTABLE AP)" if frontal and all(v.startswith("AP") for v in frontal)
                    else "CHEST (PA AND LAT)" if any(is_lateral(v) for v in views) else "CHEST (PA)")
            report = make_report(findings, rng, exam=exam, prior=prior)
            images = []
            for j, view in enumerate(views):
                render_view = view or ("LATERAL" if j and rng.random() < 0.5 else "PA")
                aspect = float(rng.choice([1.0, 1.1, 1.2, 1.25]))
                rows, cols = (int(round(image_size * aspect)), image_size) if rng.random() < 0.85 else \
                    (image_size, int(round(image_size * aspect)))
                images.append(SynthImage(_dicom_id(rng), view, render_view, rows, cols, (seed, k, j)))
            hh, mm, ss = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
            time = f"{hh * 10000 + mm * 100 + ss}.{int(rng.integers(0, 1000)):03d}".rstrip("0").rstrip(".")
            date = day.year * 10000 + day.month * 100 + day.day
            studies.append(SynthStudy(subj, study_ids[k], split, findings, report, exam, date, time, images))
            day += datetime.timedelta(int(rng.integers(1, 400)))
            prior = findings
            k += 1
    return studies


def _render_study_images(job: tuple[str, list[tuple[str, SynthImage]], Findings]) -> int:
    """Worker: render and write the JPEGs of one study (each under its final name when complete)."""
    root, items, findings = job
    for rel, img in items:
        rng = np.random.default_rng(list(img.seed))
        pixels, _ = render(findings, rng, (img.rows, img.cols), img.render_view)
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(pixels, mode="L").save(tmp, format="JPEG", quality=92)
        os.replace(tmp, path)
    return len(items)


def _metadata_rows(studies: list[SynthStudy]) -> list[tuple]:
    rows = []
    for s in studies:
        for img in s.images:
            rows.append((img.dicom_id, s.subject_id, s.study_id, s.procedure, img.view, img.rows, img.cols,
                         s.date, s.time, s.procedure, _VIEW_MEANING[img.view],
                         "" if not img.view else "Recumbent" if img.view.startswith("AP") else "Erect"))
    return rows


def _check_out_dir(out: Path, meta_rows: list[tuple]) -> None:
    """Refuse to write into a folder that holds something else, so two corpora never mix; a rerun
    with the same arguments (same metadata) rewrites the same files."""
    if not out.exists() or not any(out.iterdir()):
        return
    meta = out / METADATA_NAME
    if meta.is_file():
        with gzip.open(meta, "rt", newline="") as fh:
            existing = list(csv.reader(fh))[1:]
        if existing == [[str(x) for x in row] for row in meta_rows]:
            return
        raise MflagError(f"{out} holds a different synthetic MIMIC-CXR (other seed, size or count); "
                         "write into an empty folder")
    raise MflagError(f"{out} is not empty and holds no {METADATA_NAME}; write into an empty folder")


def _fmt_label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def write_csv_gz(path: Path, header: tuple[str, ...], rows) -> None:
    """A gzip'd CSV written atomically, byte-identical for identical rows (gzip mtime 0)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            text = io.TextIOWrapper(gz, encoding="utf-8", newline="")
            w = csv.writer(text, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
            text.flush()
            text.detach()


def write_mimic(out_dir, n_studies: int, seed: int, image_size: int = 256, zip_reports: bool = False,
                workers: int = 1) -> dict:
    """Write a synthetic MIMIC-CXR-JPG 2.0.0 tree of ``n_studies`` studies into ``out_dir``.

    ``image_size`` is the shorter image side (Rows/Columns in the metadata are the true sizes).
    Reports go to ``files/pNN/p<subject>/s<study>.txt`` or, with ``zip_reports``, into
    ``mimic-cxr-reports.zip``. Returns a summary: counts, views, splits and the paths written.
    """
    out = Path(out_dir)
    studies = plan_mimic(n_studies, seed, image_size)
    meta_rows = _metadata_rows(studies)
    _check_out_dir(out, meta_rows)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), [(s.image_path(i), i) for i in s.images], s.findings) for s in studies]
    n_images = sum(len(s.images) for s in studies)
    with progress(total=n_images, desc="synth mimic", unit="img") as bar:
        if workers > 1:
            with multiprocessing.get_context().Pool(workers, initializer=pool_worker_init) as pool:
                for n in pool.imap_unordered(_render_study_images, jobs, chunksize=8):
                    bar.update(n)
        else:
            for job in jobs:
                bar.update(_render_study_images(job))

    if zip_reports:
        reports_path = out / REPORTS_ZIP
        with atomic_path(reports_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for s in studies:
                info = zipfile.ZipInfo(s.report_path, date_time=(2019, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, s.report.text)
    else:
        reports_path = out / "files"
        for s in studies:
            path = out / s.report_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(s.report.text, encoding="utf-8")

    split_rows, chex_rows = [], []
    for s in studies:
        for img in s.images:
            split_rows.append((img.dicom_id, s.study_id, s.subject_id, s.split))
        chex_rows.append((s.subject_id, s.study_id, *(_fmt_label(s.report.labels[c]) for c in CHEXPERT_LABELS)))
    write_csv_gz(out / METADATA_NAME, METADATA_COLUMNS, meta_rows)
    write_csv_gz(out / SPLIT_NAME, SPLIT_COLUMNS, split_rows)
    write_csv_gz(out / CHEXPERT_NAME, CHEXPERT_COLUMNS, sorted(chex_rows))

    summary = {
        "root": str(out),
        "n_subjects": len({s.subject_id for s in studies}),
        "n_studies": len(studies),
        "n_images": n_images,
        "image_size": image_size,
        "seed": seed,
        "views": dict(Counter(i.view for s in studies for i in s.images)),
        "splits": dict(Counter(s.split for s in studies for _ in s.images)),
        "empty_reports": sum(1 for s in studies
                             if not (s.report.sections.get("findings") or s.report.sections.get("impression"))),
        "metadata": str(out / METADATA_NAME),
        "split": str(out / SPLIT_NAME),
        "chexpert": str(out / CHEXPERT_NAME),
        "reports": str(reports_path),
    }
    log.info("synthetic MIMIC-CXR: %d subjects, %d studies, %d images in %s",
             summary["n_subjects"], summary["n_studies"], n_images, out)
    return summary
