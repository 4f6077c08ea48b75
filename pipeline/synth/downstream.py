"""Synthetic downstream datasets in their published layouts (FORMATS.md sections 2-6).

All use the phantom renderer of the pre-training corpus, so labels, boxes and masks come from the
drawn geometry: RSNA boxes are the opacity boxes, SIIM masks the pneumothorax regions, Object-CXR
annotations the foreign objects, CheXpert labels the report labeler's output on the study's report.
Each writer puts the dataset directly into ``out_dir`` (the folder a reader is pointed at) and
returns a summary dict.
"""
from __future__ import annotations

import csv
import logging
import multiprocessing
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common import MflagError, atomic_open, progress
from pipeline.downstream.datasets import registry
from pipeline.downstream.datasets.siim import rle_encode
from pipeline.preempt import pool_worker_init
from pipeline.synth.dicom import siim_uids, write_dicom
from pipeline.synth.phantom import LOBES, Findings, Opacity, Sided, render, sample_findings
from pipeline.synth.reports import make_report, truth_labels

log = logging.getLogger(__name__)

CHEXPERT_HEADER = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
CHEXPERT_PREFIX = "CheXpert-v1.0-small"
RSNA_CLASSES = ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
COVIDX_CLASSES_A = ("normal", "pneumonia", "COVID-19")
COVIDX_CLASSES_B = ("negative", "positive")
OBJECT_TYPES = {"rectangle": 0, "ellipse": 1, "polygon": 2}


def _check(n: int, image_size: int, minimum: int = 1) -> None:
    if n < minimum:
        raise MflagError(f"n must be at least {minimum}, got {n}")
    if image_size < 32:
        raise MflagError(f"image_size must be at least 32 px, got {image_size}")


def _rng(seed: int, tag: int, *idx: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag, *idx])


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _save_image(path: Path, img: np.ndarray, rgb: bool = False, quality: int = 92) -> None:
    """Write an 8-bit image (grey, or grey content in RGB), under its final name when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(img, mode="L")
    if rgb:
        pil = pil.convert("RGB")
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    tmp.replace(path)


def _write_csv(path: Path, header, rows) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if header is not None:
            w.writerow(header)
        w.writerows(rows)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _map(fn, jobs: list, workers: int, desc: str) -> list:
    """``[fn(job) for job in jobs]`` in order, over a process pool when ``workers > 1``.

    Everything random about a job is drawn before it is dispatched, so results do not depend on
    the number of workers.
    """
    out = []
    with progress(total=len(jobs), desc=desc, unit="img") as bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(workers, initializer=pool_worker_init) as pool:
                for res in pool.imap(fn, jobs, chunksize=4):
                    out.append(res)
                    bar.update(1)
        else:
            for job in jobs:
                out.append(fn(job))
                bar.update(1)
    return out


def _render_save(job) -> None:
    """Worker: render one image and write it as JPEG/PNG (grey or RGB)."""
    path, findings, seed, size, view, rgb = job
    img, _ = render(findings, np.random.default_rng(list(seed)), size, view)
    _save_image(Path(path), img, rgb=rgb)


# --------------------------------------------------------------------------- CheXpert
def write_chexpert(out_dir, n: int, seed: int, image_size: int = 320, valid_fraction: float = 0.1,
                   workers: int = 1) -> dict:
    """CheXpert-v1.0-small: ``train/`` and ``valid/`` patient folders plus train.csv / valid.csv.

    ``out_dir`` plays the role of the ``CheXpert-v1.0-small`` folder; CSV paths carry that prefix
    as the real files do. About ``n`` images. Train labels are the labeler's output on each study's
    report (blanks, -1.0 uncertain); valid labels are the expert-style 0/1 truth, as in the release.
    """
    _check(n, image_size, 2)
    out = Path(out_dir)
    rng = _rng(seed, 1)
    rows = {"train": [], "valid": []}
    jobs = []
    pid, made = 0, 0
    while made < n:
        pid += 1
        # Patient-level split; the first two patients make sure both splits exist.
        split = "valid" if pid == 2 or (pid > 2 and rng.random() < valid_fraction) else "train"
        sex = str(rng.choice(["Male", "Female", "Female", "Male", "Unknown"], p=[.3, .3, .18, .18, .04]))
        age = int(rng.integers(18, 91))
        for k in range(1, int(rng.integers(1, 4)) + 1):
            if made >= n:
                break
            f = sample_findings(rng)
            labels = truth_labels(f) if split == "valid" else make_report(f, rng).labels
            ap = "AP" if rng.random() < 0.7 else "PA"
            views = [("frontal", ap)] + ([("lateral", "")] if rng.random() < 0.25 else [])
            for j, (fl, appa) in enumerate(views, start=1):
                if made >= n:
                    break
                rel = f"{split}/patient{pid:05d}/study{k}/view{j}_{fl}.jpg"
                size = (image_size, int(round(image_size * rng.uniform(1.0, 1.3))))
                jobs.append((str(out / rel), f, (seed, 11, pid, k, j), size,
                             appa if fl == "frontal" else "LATERAL", False))
                rows[split].append((f"{CHEXPERT_PREFIX}/{rel}", sex, age, fl.capitalize(), appa,
                                    *(_fmt(labels[c]) for c in CHEXPERT_HEADER[5:])))
                made += 1
    _map(_render_save, jobs, workers, "synth chexpert")
    for split in ("train", "valid"):
        _write_csv(out / f"{split}.csv", CHEXPERT_HEADER, rows[split])
    return {"root": str(out), "dataset": "chexpert", "n_images": made, "n_patients": pid,
            "train": len(rows["train"]), "valid": len(rows["valid"]),
            "csv": [str(out / "train.csv"), str(out / "valid.csv")]}


# --------------------------------------------------------------------------- RSNA
def _pneumonia_findings(rng: np.random.Generator, n_boxes: int) -> Findings:
    # Distinct lobes, both lungs possible; RSNA boxes are sizeable, so mostly moderate or severe.
    locs = rng.choice(list(LOBES), size=n_boxes, replace=False)
    opac = tuple(Opacity("consolidation", str(loc), int(rng.choice([1, 2, 3], p=[.15, .45, .4]))) for loc in locs)
    eff = (Sided(str(rng.choice(["R", "L"])), 1),) if rng.random() < 0.15 else ()
    return Findings(opacities=opac, effusions=eff, devices=("endotracheal tube",) if rng.random() < 0.1 else ())


def _not_normal_findings(rng: np.random.Generator) -> Findings:
    while True:
        f = sample_findings(rng, abnormal=1.0)
        f = Findings((), f.cardiomegaly, f.effusions, f.pneumothoraces, 0, f.devices, ())
        if not f.is_normal or f.devices:
            return f


def _rsna_image(job) -> list[tuple[float, float, float, float]]:
    """Worker: render and write one RSNA DICOM; returns its opacity boxes (x1, y1, x2, y2)."""
    path, findings, seed, size, view, dicom_kw = job
    img, geo = render(findings, np.random.default_rng(list(seed)), size, view)
    write_dicom(path, img, view=view, **dicom_kw)
    return [b for b in geo.boxes("opacity") if b[2] > b[0] and b[3] > b[1]]


def write_rsna(out_dir, n: int, seed: int, image_size: int = 1024, positive_fraction: float = 0.3,
               monochrome1_fraction: float = 0.1, workers: int = 1) -> dict:
    """RSNA Pneumonia stage 2: ``stage_2_train_images/<patientId>.dcm`` plus the labels CSV (one row
    per box, x, y, width, height in pixels; negatives with empty fields) and the class CSV."""
    _check(n, image_size)
    out = Path(out_dir)
    rng = _rng(seed, 2)
    plan, jobs = [], []
    for i in range(n):
        pid = _uuid(rng)
        r = rng.random()
        if r < positive_fraction or i == 0:
            k = int(rng.choice([1, 2, 3], p=[.72, .24, .04]))
            f, cls = _pneumonia_findings(rng, k), "Lung Opacity"
        elif r < positive_fraction + (1 - positive_fraction) * 0.45 or i == 1:
            f, cls = Findings(), "Normal"
        else:
            f, cls = _not_normal_findings(rng), "No Lung Opacity / Not Normal"
        view = "AP" if rng.random() < (0.6 if cls == "Lung Opacity" else 0.4) else "PA"
        study, series, sop = siim_uids(rng)
        dicom_kw = dict(sop_uid=sop, study_uid=study, series_uid=series, patient_id=pid,
                        monochrome1=bool(rng.random() < monochrome1_fraction),
                        pixel_spacing=0.143 * 1024 / image_size, sex=str(rng.choice(["M", "F"])),
                        age=int(rng.integers(18, 90)))
        plan.append((pid, cls))
        jobs.append((str(out / "stage_2_train_images" / f"{pid}.dcm"), f, (seed, 12, i), image_size, view, dicom_kw))
    label_rows, class_rows = [], []
    n_boxes = Counter()
    for (pid, cls), boxes in zip(plan, _map(_rsna_image, jobs, workers, "synth rsna")):
        if cls == "Lung Opacity" and boxes:
            for x1, y1, x2, y2 in boxes:
                label_rows.append((pid, f"{x1:.1f}", f"{y1:.1f}", f"{x2 - x1:.1f}", f"{y2 - y1:.1f}", 1))
                class_rows.append((pid, cls))
            n_boxes[len(boxes)] += 1
        else:
            if cls == "Lung Opacity":  # an opacity fully hidden behind the heart: not labelable
                cls = "No Lung Opacity / Not Normal"
            label_rows.append((pid, "", "", "", "", 0))
            class_rows.append((pid, cls))
    _write_csv(out / "stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), label_rows)
    _write_csv(out / "stage_2_detailed_class_info.csv", ("patientId", "class"), class_rows)
    classes = Counter(c for _, c in dict(class_rows).items())
    return {"root": str(out), "dataset": "rsna", "n_images": n, "rows": len(label_rows),
            "positive": sum(n_boxes.values()), "boxes_per_positive": dict(n_boxes), "classes": dict(classes),
            "labels": str(out / "stage_2_train_labels.csv")}


# --------------------------------------------------------------------------- COVIDx
def _covid_findings(rng: np.random.Generator, cls: str) -> Findings:
    if cls == "pneumonia":
        # Bacterial: dense lobar consolidation, usually one lobe.
        locs = rng.choice(list(LOBES), size=int(rng.choice([1, 2], p=[.75, .25])), replace=False)
        return Findings(opacities=tuple(Opacity("consolidation", str(loc), int(rng.integers(2, 4))) for loc in locs))
    if cls == "COVID-19":
        # Viral: bilateral, peripheral, lower-zone ground glass.
        locs = ["right lower lobe", "left lower lobe"] + list(
            rng.choice(["right middle lobe", "lingula", "right upper lobe", "left upper lobe"],
                       size=int(rng.integers(0, 3)), replace=False))
        return Findings(opacities=tuple(Opacity("ground-glass", str(loc), int(rng.integers(2, 4))) for loc in locs))
    return Findings()


def write_covidx(out_dir, n: int, seed: int, image_size: int = 384, label_set: str = "A",
                 test_fraction: float = 0.15, workers: int = 1) -> dict:
    """COVIDx CXR: ``train/``, ``test/`` (png/jpg, grey or RGB) and ``train.txt`` / ``test.txt`` with
    ``patientid filename class datasource`` lines. ``label_set`` "A" (normal/pneumonia/COVID-19) or
    "B" (positive/negative; COVID-19 is positive)."""
    _check(n, image_size, 3)
    if label_set not in ("A", "B"):
        raise MflagError(f"label_set must be 'A' or 'B', got {label_set!r}")
    out = Path(out_dir)
    rng = _rng(seed, 3)
    lines = {"train": [], "test": []}
    made, p = 0, 0
    seen: set[str] = set()
    # By patient. The first patients cover every class in both splits (when n allows).
    forced_test = {3, 4, 5} if n >= 12 else {1}
    jobs = []
    while made < n:
        cls = COVIDX_CLASSES_A[p % 3] if p < 6 else str(rng.choice(COVIDX_CLASSES_A))
        split = "test" if p in forced_test or (p >= 6 and rng.random() < test_fraction) else "train"
        p += 1
        source = (str(rng.choice(["rsna", "rsna", "actmed"])) if cls != "COVID-19"
                  else str(rng.choice(["cohen", "ricord", "bimcv", "sirm", "fig1", "actmed"])))
        style = int(rng.integers(3 if cls == "COVID-19" else 2))
        patient = ""
        while not patient or patient in seen:  # patient ids must not collide across patients
            patient = (str(int(rng.integers(1, 5000))) if style == 0 else _uuid(rng) if style == 1
                       else f"COVID-{int(rng.integers(10000, 99999))}")
        seen.add(patient)
        for k in range(int(rng.choice([1, 2], p=[.8, .2]))):
            if made >= n:
                break
            ext = str(rng.choice([".png", ".jpg", ".jpeg"], p=[.55, .35, .1]))
            name = (f"{patient}{ext}" if style == 1 and k == 0
                    else f"{patient}-{_uuid(rng)[:8]}-day{k}{ext}" if style == 0
                    else f"{patient}({k + 1}){ext}")
            size = (int(round(image_size * rng.uniform(0.9, 1.3))), int(round(image_size * rng.uniform(0.9, 1.3))))
            f = _covid_findings(rng, cls)
            view = "AP" if rng.random() < 0.5 else "PA"
            jobs.append((str(out / split / name), f, (seed, 13, made), size, view, bool(rng.random() < 0.5)))
            label = cls if label_set == "A" else ("positive" if cls == "COVID-19" else "negative")
            lines[split].append(f"{patient} {name} {label} {source}")
            made += 1
    _map(_render_save, jobs, workers, "synth covidx")
    for split in ("train", "test"):
        with atomic_open(out / f"{split}.txt", "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines[split]))
    counts = {s: dict(Counter(line.split(" ")[2] for line in lines[s])) for s in lines}
    return {"root": str(out), "dataset": "covidx", "label_set": label_set, "n_images": made,
            "train": len(lines["train"]), "test": len(lines["test"]), "classes": counts,
            "labels": [str(out / "train.txt"), str(out / "test.txt")]}


# --------------------------------------------------------------------------- SIIM
def _siim_image(job) -> list[str]:
    """Worker: render and write one SIIM DICOM; returns the RLE of each pneumothorax instance."""
    path, findings, seed, size, view, dicom_kw = job
    img, geo = render(findings, np.random.default_rng(list(seed)), size, view)
    write_dicom(path, img, view=view, **dicom_kw)
    return [rle_encode(r.mask) for r in geo.select("pneumothorax") if r.mask.any()]


def write_siim(out_dir, n: int, seed: int, image_size: int = 1024, positive_fraction: float = 0.3,
               monochrome1_fraction: float = 0.1, workers: int = 1) -> dict:
    """SIIM-ACR Pneumothorax: ``dicom-images-train/<Study>/<Series>/<SOP>.dcm`` and ``train-rle.csv``.

    ImageId = SOP Instance UID = file stem. A positive image gets one RLE row per pneumothorax (two
    for bilateral ones); empty masks are written as ``-1`` or ``" -1"`` (both occur in the wild).
    """
    _check(n, image_size)
    out = Path(out_dir)
    rng = _rng(seed, 4)
    plan, jobs = [], []
    for i in range(n):
        study, series, sop = siim_uids(rng)
        if rng.random() < positive_fraction or i == 0:
            sides = ["R", "L"] if rng.random() < 0.2 else [str(rng.choice(["R", "L"]))]
            base = sample_findings(rng, abnormal=0.3)
            f = Findings(base.opacities, base.cardiomegaly, base.effusions,
                         tuple(Sided(s, int(rng.integers(1, 4))) for s in sides), base.edema, base.devices)
        else:
            base = sample_findings(rng)
            f = Findings(base.opacities, base.cardiomegaly, base.effusions, (), base.edema, base.devices)
        view = "PA" if rng.random() < 0.6 else "AP"
        lead = "" if rng.random() < 0.5 else " "
        dicom_kw = dict(sop_uid=sop, study_uid=study, series_uid=series, patient_id=_uuid(rng),
                        monochrome1=bool(rng.random() < monochrome1_fraction),
                        pixel_spacing=round(float(rng.uniform(0.139, 0.171)) * 1024 / image_size, 6),
                        sex=str(rng.choice(["M", "F"])), age=int(rng.integers(18, 90)))
        plan.append((sop, lead))
        jobs.append((str(out / "dicom-images-train" / study / series / f"{sop}.dcm"), f, (seed, 14, i),
                     image_size, view, dicom_kw))
    rows: list[str] = []
    positives = 0
    for (sop, lead), rles in zip(plan, _map(_siim_image, jobs, workers, "synth siim")):
        positives += bool(rles)
        rows.extend(f"{sop},{lead}{rle}" for rle in rles or ["-1"])
    with atomic_open(out / "train-rle.csv", "w", encoding="utf-8") as fh:
        fh.write("ImageId, EncodedPixels\n")
        fh.write("".join(r + "\n" for r in rows))
    return {"root": str(out), "dataset": "siim", "n_images": n, "positive": positives, "rows": len(rows),
            "instances": sum(1 for r in rows if not r.endswith("-1")), "rle": str(out / "train-rle.csv")}


# --------------------------------------------------------------------------- Object-CXR
def annotation_string(regions) -> str:
    """Object-CXR annotation: ``TYPE x1 y1 x2 y2`` (rectangle 0, ellipse 1) or ``2 x1 y1 ... xn yn``."""
    parts = []
    for r in regions:
        coords = " ".join(f"{int(x)} {int(y)}" for x, y in r.points)
        parts.append(f"{OBJECT_TYPES[r.kind]} {coords}")
    return ";".join(parts)


def _object_image(job) -> str:
    """Worker: render and write one Object-CXR JPEG; returns its annotation string."""
    path, findings, seed, size, view = job
    img, geo = render(findings, np.random.default_rng(list(seed)), size, view)
    _save_image(Path(path), img)
    return annotation_string(geo.select("foreign_object"))


def write_object_cxr(out_dir, n: int, seed: int, image_size: int = 512, dev_fraction: float = 0.11,
                     workers: int = 1) -> dict:
    """Object-CXR: ``train/`` and ``dev/`` (``00001.jpg``..., dev numbered after train) with
    ``train.csv`` / ``dev.csv`` (``image_name,annotation``). Half of each split has objects; image
    sizes vary between about 0.75x and 1.35x ``image_size`` per side."""
    _check(n, image_size, 2)
    out = Path(out_dir)
    rng = _rng(seed, 5)
    n_dev = max(1, int(round(n * dev_fraction)))
    n_train = n - n_dev
    plan, jobs = [], []
    for split, start, count in (("train", 1, n_train), ("dev", n_train + 1, n_dev)):
        positive = np.zeros(count, dtype=bool)
        positive[rng.permutation(count)[: (count + 1) // 2]] = True
        for j in range(count):
            idx = start + j
            name = f"{idx:05d}.jpg"
            base = sample_findings(rng, abnormal=0.3)
            shapes = tuple(str(s) for s in rng.choice(list(OBJECT_TYPES), size=int(rng.integers(1, 5)))) \
                if positive[j] else ()
            f = Findings(base.opacities, base.cardiomegaly, base.effusions, base.pneumothoraces, base.edema,
                         base.devices, shapes)
            size = (int(round(image_size * rng.uniform(0.75, 1.35))), int(round(image_size * rng.uniform(0.75, 1.35))))
            plan.append((split, name))
            jobs.append((str(out / split / name), f, (seed, 15, idx), size, "PA" if rng.random() < 0.7 else "AP"))
    rows = {"train": [], "dev": []}
    n_objects = Counter()
    for (split, name), ann in zip(plan, _map(_object_image, jobs, workers, "synth object-cxr")):
        rows[split].append((name, ann))
        n_objects[split] += len(ann.split(";")) if ann else 0
    for split in ("train", "dev"):
        _write_csv(out / f"{split}.csv", ("image_name", "annotation"), rows[split])
    return {"root": str(out), "dataset": "object-cxr", "n_images": n, "train": n_train, "dev": n_dev,
            "with_objects": {s: sum(1 for _, a in rows[s] if a) for s in rows}, "objects": dict(n_objects),
            "csv": [str(out / "train.csv"), str(out / "dev.csv")]}


class _Writers(Mapping):
    """Dataset name -> its writer, read from the dataset registry (``DatasetEntry.writer``) at each look-up, so
    a dataset registered there is written by ``cli.py synth`` and the pipeline YAML's ``downstream: synth:``."""

    def __getitem__(self, name: str):
        if name not in registry.synth_names():
            raise KeyError(name)
        return registry.synth_writer(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.synth_names())

    def __len__(self) -> int:
        return len(registry.synth_names())


WRITERS: Mapping = _Writers()
