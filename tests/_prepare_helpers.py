"""Tiny MIMIC-CXR-JPG trees in the real layout, with full control over what is broken in them."""
from __future__ import annotations

import csv
import gzip
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.corpora.mimic_files import METADATA_CSV, SPLIT_CSV, image_relpath, report_relpath

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""

META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
               "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


@dataclass
class Img:
    dicom_id: str
    view: str = "PA"


@dataclass
class Study:
    subject_id: str
    study_id: str
    split: str
    images: list[Img]
    report: str | None = None  # None: no report file at all
    extra: dict = field(default_factory=dict)


def dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def report_text(findings: str, impression: str) -> str:
    return REPORT.format(findings=findings, impression=impression)


def phantom(rng: np.random.Generator, size: int, border: int = 0) -> np.ndarray:
    """A smooth textured grey image (JPEG-friendly) inside an optional black border."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 90 + 60 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy) + rng.normal(0, 6, (size, size))
    img = np.clip(img, 20, 235).astype(np.uint8)
    if border:
        img[:border], img[-border:], img[:, :border], img[:, -border:] = 0, 0, 0, 0
    return img


def default_studies(seed: int = 0) -> list[Study]:
    """Seven studies over three splits with PA/AP/LATERAL views, two with text problems."""
    rng = np.random.default_rng(seed)
    d = lambda: dicom_id(rng)  # noqa: E731
    return [
        Study("10000032", "50414267", "train", [Img(d(), "PA"), Img(d(), "LATERAL")],
              report_text("No focal consolidation.", "No acute process.")),
        Study("10000032", "53189527", "train", [Img(d(), "AP")],
              report_text("Mild cardiomegaly.", "Cardiomegaly.")),
        Study("11000011", "51000001", "train", [Img(d(), "PA"), Img(d(), "AP")],
              report_text("Right lower lobe opacity.", "Pneumonia.")),
        Study("12000022", "52000002", "validate", [Img(d(), "PA")],
              report_text("Small left effusion.", "Effusion.")),
        Study("13000033", "53000003", "test", [Img(d(), "AP"), Img(d(), "LL")],
              report_text("No pneumothorax.", "Normal chest.")),
        # Both chosen sections empty: dropped as "no usable text", not an input error.
        Study("14000044", "54000004", "train", [Img(d(), "PA")], report_text("", "")),
        # Only a lateral image: filtered by view, never needs a report.
        Study("15000055", "55000005", "train", [Img(d(), "LATERAL")],
              report_text("Lateral only.", "Lateral.")),
    ]


def make_tree(root: Path, studies: list[Study], *, image_size: int = 64, gz: bool = True,
              zip_reports: bool = False, border: int = 0, seed: int = 0,
              image_format: str = "JPEG") -> Path:
    """Write images, metadata/split CSVs and reports (folder or zip) for ``studies`` under ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta_rows, split_rows = [], []
    reports: dict[str, str] = {}
    for st in studies:
        for im in st.images:
            p = root / image_relpath(st.subject_id, st.study_id, im.dicom_id)
            p.parent.mkdir(parents=True, exist_ok=True)
            arr = phantom(rng, image_size, border)
            Image.fromarray(arr).save(p, format=image_format, **({"quality": 92} if image_format == "JPEG" else {}))
            meta_rows.append([im.dicom_id, st.subject_id, st.study_id, "CHEST (PA AND LAT)", im.view,
                              image_size, image_size, "21800506", "213014.531", "Chest (PA and lateral)",
                              "postero-anterior", "Erect"])
            split_rows.append([im.dicom_id, st.study_id, st.subject_id, st.split])
        if st.report is not None:
            reports[report_relpath(st.subject_id, st.study_id)] = st.report
    write_csv(root / (METADATA_CSV + (".gz" if gz else "")), META_HEADER, meta_rows)
    write_csv(root / (SPLIT_CSV + (".gz" if gz else "")), ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    if zip_reports:
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for rel, text in sorted(reports.items()):
                zf.writestr(rel, text)
    else:
        for rel, text in reports.items():
            (root / rel).write_text(text, encoding="utf-8")
    return root


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def corrupt_zip_member(zip_path: Path, member: str) -> None:
    """Flip bytes inside one member's compressed data so reading it fails its CRC/inflate."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(zip_path.read_bytes())
    # Local header: 30 bytes + name + extra, then the compressed data.
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for k in range(start, start + max(1, info.compress_size)):
        raw[k] ^= 0x5A
    zip_path.write_bytes(bytes(raw))


def read_shards(shards_dir: Path) -> dict[str, dict[str, bytes]]:
    """``{tar name: {member name: bytes}}`` for every shard, read back with tarfile."""
    import tarfile

    out = {}
    for tar in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out[tar.name] = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    return out
