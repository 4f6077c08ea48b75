"""Tiny synthetic pre-training worlds for the train-vision tests: webdataset shards in prepare's
layout (train-/validate-NNNNNN.tar, sizes.json) and a matching text-embedding cache.

The signal is learnable on purpose: each study belongs to one of ``n_classes`` classes; its images
carry a bright block at a class-specific place and its report embedding is the class prototype plus a
little noise, so a few steps of training measurably pull image and text projections together.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cache import write_cache

TEXT_PARAMS = 109_482_240  # recorded in the cache like embed-text does (CXR-BERT-sized)


def class_image(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    img = rng.integers(0, 40, size=(size, size), dtype=np.uint8)
    q = size // 2
    y, x = divmod(cls % 4, 2)
    img[y * q:(y + 1) * q, x * q:(x + 1) * q] += 180
    return img


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_split(shard_dir: Path, split: str, studies: list[tuple[str, int]], per_shard: int, size: int,
                seed: int, corrupt_keys: frozenset = frozenset()) -> dict[str, int]:
    """One image per study; returns {shard name: n samples}. ``corrupt_keys`` get undecodable PNG bytes."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    shard_dir.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(studies), per_shard)):
        name = f"{split}-{s:06d}.tar"
        chunk = studies[start:start + per_shard]
        with wds.TarWriter(str(shard_dir / name)) as tw:
            for study, cls in chunk:
                key = f"d{study}"
                img = png_bytes(class_image(cls, rng, size))
                if key in corrupt_keys:
                    img = b"\x89PNG-not-really" + img[40:80]
                meta = {"dicom_id": key, "subject_id": "1" + study[-4:], "study_id": study, "view": "PA",
                        "split": split, "orig_size": [size, size]}
                tw.write({"__key__": key, "png": img, "json": json.dumps(meta).encode()})
        sizes[name] = len(chunk)
    return sizes


def make_world(root: Path, n_train: int = 16, n_val: int = 8, per_shard: int = 4, size: int = 40,
               dim: int = 16, n_classes: int = 4, seed: int = 0, corrupt: int = 0, missing: int = 0,
               nan_studies: int = 0) -> dict:
    """Write ``root/shards`` (+ sizes.json) and ``root/cache``; returns their paths and the study ids.

    ``corrupt`` training samples get broken PNGs; ``missing`` training studies are left out of the
    cache."""
    rng = np.random.default_rng(seed)
    train = [(f"5{i:07d}", i % n_classes) for i in range(n_train)]
    val = [(f"6{i:07d}", i % n_classes) for i in range(n_val)]
    corrupt_keys = frozenset(f"d{s}" for s, _ in train[1:1 + corrupt])
    shard_dir = root / "shards"
    sizes = write_split(shard_dir, "train", train, per_shard, size, seed, corrupt_keys)
    sizes.update(write_split(shard_dir, "validate", val, per_shard, size, seed + 1))
    (shard_dir / "sizes.json").write_text(json.dumps(sizes))
    protos = rng.normal(size=(n_classes, dim)).astype(np.float32)
    cached = train[len(train) - missing:] if missing else []
    keep = [s for s in train + val if s not in cached]
    emb = np.stack([protos[c] + 0.1 * rng.normal(size=dim).astype(np.float32) for _, c in keep])
    if nan_studies:
        emb[:nan_studies] = np.nan
    cache_dir = write_cache(root / "cache", [s for s, _ in keep], emb,
                            {"model_id": "synthetic/prototypes", "pooling": "cls",
                             "text_encoder_params": TEXT_PARAMS})
    reports = root / "reports.jsonl"
    with open(reports, "w", encoding="utf-8") as fh:
        for s, c in train + val:
            fh.write(json.dumps({"study_id": s, "text": f"finding class {c} in zone {c}."}) + "\n")
    return {"shards": shard_dir, "cache": cache_dir, "reports": reports, "train": train, "val": val,
            "missing": [s for s, _ in cached], "corrupt": sorted(corrupt_keys)}


def tiny_config(world: dict, out: Path, **over):
    """A TrainVisionConfig that runs a real ResNet50 step in well under a second on a CPU core."""
    from stages.train_vision import TrainVisionConfig

    kw = dict(shards=str(world["shards"]), text_cache=str(world["cache"]), out=str(out), batch_size=4,
              image_size=40, crop_size=32, num_workers=0, shuffle_buffer=8, aug="none", hidden_dim=128,
              proj_dim=32, lr=1e-3, max_steps=4, log_every=1, ckpt_every=2, probe_every=2, probe_size=8,
              threads=1, precision="fp32", device="cpu", seed=0)
    kw.update(over)
    return TrainVisionConfig(**kw)


def cli_args(world: dict, out: Path, **over) -> list[str]:
    """The same tiny run as command-line options of ``cli.py train-vision``."""
    kw = {"shards": world["shards"], "text-cache": world["cache"], "out": out, "batch-size": 4,
          "image-size": 40, "crop-size": 32, "num-workers": 0, "shuffle-buffer": 8, "aug": "none",
          "hidden-dim": 128, "proj-dim": 32, "lr": 1e-3, "max-steps": 4, "log-every": 1, "ckpt-every": 2,
          "probe-every": 2, "probe-size": 8, "threads": 1, "precision": "fp32", "device": "cpu", "seed": 0}
    kw.update({k.replace("_", "-"): v for k, v in over.items()})
    args = []
    for k, v in kw.items():
        if v is None:
            continue
        args += [f"--{k}", str(v)]
    return args
