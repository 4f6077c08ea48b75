"""An easy world in which language supervision must show: each finding has its own visual sign and its own
report phrase, and nothing else tells them apart.

Images are dark noise; finding k (one of CheXpert's five competition tasks) draws a bright disc at its own
place. A study has one finding or none; its report names it ("atelectasis.") or says "no acute finding.".
The same signs make a CheXpert-layout set (train.csv, valid.csv, JPEG images, truth labels)
for zero-shot evaluation. Pre-training shards are in prepare's layout (train-/validate-/test-*.tar,
sizes.json) with ``reports.jsonl``; the text encoder is a small random BERT with a vocabulary learnt from
the reports (``build_tiny_bert``), which embed-text runs once as for real data.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# the disc of each finding: (row, col) centre as a share of the side
PLACES = ((0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7), (0.5, 0.5))
NONE_TEXT = "no acute finding."
CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")


def phrase(finding: str) -> str:
    return f"{finding.lower()}."


def report(labels) -> str:
    present = [phrase(f) for f, y in zip(FINDINGS, labels) if y]
    return " ".join(present) if present else NONE_TEXT


def image(labels, rng: np.random.Generator, size: int) -> np.ndarray:
    img = rng.normal(40, 10, (size, size))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for (cy, cx), y in zip(PLACES, labels):
        if y:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.1 ** 2] = 220
    return np.clip(img, 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """At most one finding per image (none with probability 1/6): a report is then one phrase, which a small
    random text encoder embeds distinctly (it does not embed a list of phrases as their sum)."""
    pick = rng.integers(0, len(FINDINGS) + 1, size=n)
    return np.eye(len(FINDINGS) + 1, dtype=np.uint8)[pick][:, 1:]


def write_pretraining(root: Path, n_train: int = 320, n_held: int = 64, size: int = 40, per_shard: int = 80,
                      seed: int = 0) -> dict:
    """``root/shards`` (train/validate/test tars + sizes.json) and ``root/reports.jsonl``."""
    rng = np.random.default_rng(seed)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    reports = []
    parts = {"train": n_train, "validate": n_held // 2, "test": n_held - n_held // 2}
    study = 50000000
    for split, n in parts.items():
        labels = _labels(rng, n)
        for s, start in enumerate(range(0, n, per_shard)):
            name = f"{split}-{s:06d}.tar"
            chunk = labels[start:start + per_shard]
            with wds.TarWriter(str(shards / name)) as tw:
                for y in chunk:
                    study += 1
                    buf = io.BytesIO()
                    Image.fromarray(image(y, rng, size)).save(buf, format="PNG")
                    key = f"d{study}"
                    meta = {"dicom_id": key, "subject_id": str(10000000 + study % 997), "study_id": str(study),
                            "view": "PA", "split": split, "orig_size": [size, size]}
                    tw.write({"__key__": key, "png": buf.getvalue(), "json": json.dumps(meta).encode()})
                    reports.append({"study_id": str(study), "text": report(y)})
            sizes[name] = len(chunk)
    (shards / "sizes.json").write_text(json.dumps(sizes))
    with open(root / "reports.jsonl", "w", encoding="utf-8") as fh:
        for r in reports:
            fh.write(json.dumps(r) + "\n")
    return {"shards": shards, "reports": root / "reports.jsonl", "texts": [r["text"] for r in reports]}


def write_chexpert(root: Path, n_train: int = 40, n_valid: int = 160, size: int = 48, seed: int = 1) -> Path:
    """A CheXpert-v1.0-small layout whose labels are the drawn findings (valid.csv is the test split)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = []
        for i, y in enumerate(_labels(rng, n)):
            rel = f"{split}/patient{(1 if split == 'train' else 5) * 10000 + i:05d}/study1/view1_frontal.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(y, rng, size)).save(path, quality=95)
            cells = {c: "" for c in CHEXPERT_HEADER}
            cells.update({"Path": f"CheXpert-v1.0-small/{rel}", "Sex": "Female", "Age": "50",
                          "Frontal/Lateral": "Frontal", "AP/PA": "PA", "No Finding": "" if y.any() else "1.0"})
            cells.update({f: f"{float(v):.1f}" for f, v in zip(FINDINGS, y)})
            rows.append([cells[c] for c in CHEXPERT_HEADER])
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(CHEXPERT_HEADER)
            w.writerows(rows)
    return root


def write_prompts(path: Path, shuffle: bool = False) -> Path:
    """Binary prompts: each finding's report phrase against the no-finding report (``shuffle``: each
    finding gets the next finding's phrase, a control that must not work)."""
    names = list(FINDINGS)
    data = {f: {"positive": [phrase(names[(k + 1) % len(names)] if shuffle else f)], "negative": [NONE_TEXT]}
            for k, f in enumerate(names)}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
