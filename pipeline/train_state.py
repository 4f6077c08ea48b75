"""What a training checkpoint holds besides weights, and how it is written and read.

Checkpoints are written atomically (temp file + rename) and published as ``latest.pt`` by a hard
link, so a file under its final name is always complete and a kill at any point leaves the last
complete checkpoint in place. RNG states cover everything the training loop draws from: Python's
``random``, NumPy's global generator and torch's CPU generator.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.common import MflagError, atomic_path


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic ``torch.save`` (temp file + fsync + rename): a checkpoint file is always complete."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def publish_latest(path: Path, latest: Path) -> None:
    """Point ``latest`` at the complete checkpoint ``path`` atomically: a hard link (no copy of a
    multi-100 MB file; it outlives the pruning of ``path``), or a copy where links are unsupported."""
    tmp = latest.with_name(f".{latest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)


def load_checkpoint(path: Path, error: type[MflagError] = MflagError) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; ``error`` names the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign files
        raise error(f"cannot read checkpoint {path}: {e}") from e


def param_checksum(module: nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank when DDP kept them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in module.parameters()))
