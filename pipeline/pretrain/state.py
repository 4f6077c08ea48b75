"""What a training checkpoint holds besides weights, and how it is written and read.

Checkpoints are written atomically (temp file + rename) and published as ``latest.pt`` by a hard
link, so a file under its final name is always complete and a kill at any point leaves the last
complete checkpoint in place. RNG states cover everything the training loop draws from: Python's
``random``, NumPy's global generator and torch's CPU generator. They are stored as tensors and plain
numbers, so a checkpoint holds nothing ``torch.load(..., weights_only=True)`` refuses; this tool reads
its own checkpoints with the same restricted loader as anyone else's (``pipeline.safeload``), since
``latest.pt`` or a ``--resume`` file may have been planted.

The CUDA generators are neither saved nor restored: training never draws from them (the GPU
augmentation keeps its own generator, saved with the augmenter), saving every visible device's
state made a resume on fewer visible GPUs fail, and asking for them initialised CUDA in CPU runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.common import ConfigError, MflagError, read_json, write_json
from pipeline.distributed import DistInfo, all_gather_object, barrier
from pipeline.safeload import safe_load, torch_save
from pipeline.vision.models import save_encoder_files

log = logging.getLogger(__name__)


class TrainingError(MflagError):
    """Training cannot continue (non-finite loss, too many bad samples, incompatible checkpoint)."""


def rng_state() -> dict:
    """The CPU generators' states as tensors and numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": str(np_state["bit_generator"]),
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state`'s output (or the tuple form of checkpoints written before it). A
    ``cuda`` entry of an old checkpoint is ignored (see the module docstring)."""
    py = st["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    else:
        random.setstate(py)
    npst = st["numpy"]
    if isinstance(npst, dict):
        np.random.set_state({"bit_generator": npst["bit_generator"],
                             "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                             "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    else:
        np.random.set_state(npst)
    torch.set_rng_state(st["torch"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic ``torch.save`` (temp file + fsync + rename): a checkpoint file is always complete."""
    torch_save(payload, path)


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


def param_checksum(module: nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank when DDP kept them in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in module.parameters()))


def resume_path(resume: str, ckpt_dir: Path, out: Path) -> Path | None:
    """The checkpoint a run resumes from: ``resume`` is "auto" (``ckpt_dir/latest.pt`` if any), "never"
    (refuses an ``out`` that holds one) or a checkpoint file; ConfigError names the fix, also when
    ``ckpt_dir`` holds step checkpoints but no run to resume was found (a fresh start would mix them)."""
    latest = ckpt_dir / "latest.pt"
    if resume == "auto":
        found = latest if latest.is_file() else None
    elif resume == "never":
        if latest.is_file():
            raise ConfigError(f"resume: {out} already holds checkpoints; use --resume auto, "
                              f"another --out, or delete {out} to start over")
        found = None
    else:
        found = Path(resume)
        if not found.is_file():
            raise ConfigError(f"resume: checkpoint {found} not found")
    if found is None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")):
        raise ConfigError(f"resume: {ckpt_dir} holds checkpoints but --resume is {resume!r}")
    return found


def finished_summary(out: Path, fingerprint: str, total_steps: int, text_identity: str | None = None) -> dict | None:
    """``out/summary.json`` when it records a finished run of this configuration (same fingerprint and
    step count) trained on the same text targets (``text_identity``: the cache's content identity; a
    summary written before it was recorded has none and is taken as it is), else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    done = read_json(path)
    same_text = done.get("text_cache_identity", text_identity) == text_identity
    return done if done.get("fingerprint") == fingerprint and done.get("steps") == total_steps and same_text \
        else None


def check_resumable(ck, path: Path, *, fmt: int, fingerprint: str, semantic: dict, world_size: int,
                    text_dim: int | None, out: Path, text_identity: str | None = None) -> None:
    """Refuse a checkpoint ``ck`` (read from ``path``) that this run cannot continue exactly: another
    format, another configuration (the differing fields of ``semantic`` are named), another world size
    or text dimension, or other text targets (``text_identity``: the cache's content, not its path; a
    checkpoint written before it was recorded has none)."""
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise TrainingError(f"{path}: not a train-vision checkpoint")
    if ck.get("fingerprint") != fingerprint:
        old = ck.get("semantic_config", {})
        diff = sorted(k for k in set(old) | set(semantic) if old.get(k) != semantic.get(k))
        raise ConfigError(f"resume: {path} was written by a different configuration (differs in "
                          f"{', '.join(diff) or 'fingerprint'}); use the same options, another --out, or delete "
                          f"{out} to start over")
    if ck.get("world_size") != world_size:
        raise ConfigError(f"resume: {path} was written with {ck.get('world_size')} ranks, this run has "
                          f"{world_size}; exact resume needs the same world size")
    if ck.get("text_cache_identity", text_identity) != text_identity:
        raise ConfigError(f"resume: {path} was trained against another text cache than the one now at "
                          f"{semantic.get('text_cache')} (rebuilt by another model or changed since: its content "
                          f"identity was {ck.get('text_cache_identity')}, now {text_identity}); use the cache it "
                          f"was trained with, another --out, or delete {out} to start over")
    if ck.get("text_dim") != text_dim:
        raise ConfigError(f"resume: {path} has text dimension {ck.get('text_dim')}, the text embeddings "
                          f"now have {text_dim}")


def write_finished_run(out: Path, vision: nn.Module, summary: dict, spectrum: dict | None, *, text_head: str,
                       text_dim: int, hidden_dim: int, drop_checkpoints: bool) -> None:
    """What a finished run leaves in ``out``, each file written atomically: the encoder and projector
    files (``pipeline.vision.models.save_encoder_files``), ``spectrum.json`` (the final probe's centred and
    uncentred singular values of zv and za with N, D and effective ranks; ``pipeline.pretrain.probes.spectrum``)
    and ``summary.json`` last, which marks the run finished (:func:`finished_summary`). With
    ``drop_checkpoints`` the multi-100 MB resume points go."""
    if len(set(summary["param_checksum_per_rank"])) > 1:
        log.error("ranks ended with different weights: %s", summary["param_checksum_per_rank"])
    save_encoder_files(out, vision, text_head, text_dim, hidden_dim)
    if spectrum is not None:
        write_json(out / "spectrum.json", {"step": summary["steps"], "n_images": spectrum["zv"]["n"], **spectrum})
    write_json(out / "summary.json", summary)
    if drop_checkpoints and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``max(1, keep)`` ``step-*.pt`` (``latest.pt`` is a link that survives)."""
    for p in sorted(ckpt_dir.glob("step-*.pt"))[:-max(1, keep)]:
        p.unlink(missing_ok=True)


@dataclasses.dataclass
class Resumable:
    """Everything a checkpoint saves and restores besides the data positions: the weights (the module's
    ``checkpoint_state``: a frozen text model is left out), the optimizer, LR scheduler and gradient
    scaler, the batch augmenter's state (the GPU augmentation keeps its own generator) and, per rank,
    the CPU RNG states. The data positions come from the caller, one state per rank."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    batch_aug: Any | None

    def save(self, path: Path, dist: DistInfo, *, data_state: dict, meta: dict, keep: int) -> Path:
        """Gather every rank's states, write ``path`` (rank 0), publish it as ``latest.pt`` next to it
        and keep the newest ``keep`` step files; every rank returns after the file is complete."""
        all_data = all_gather_object(data_state, dist)
        all_rng = all_gather_object(rng_state(), dist)
        all_aug = all_gather_object(self.batch_aug.state_dict() if self.batch_aug is not None else None, dist)
        if dist.is_main:
            save_checkpoint(path, {
                **meta, "model": self.module.checkpoint_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": all_rng, "data": all_data, "augmenter": all_aug, "world_size": dist.world_size})
            publish_latest(path, path.parent / "latest.pt")
            prune_checkpoints(path.parent, keep)
        barrier(dist)
        return path

    def resume(self, path: Path, rank: int, **expect) -> tuple[int, dict]:
        """Read the checkpoint ``path`` without running anything from it (``pipeline.safeload``), refuse
        it unless this run can continue it exactly (:func:`check_resumable` with ``expect``) and load it
        into the objects; returns its step and this rank's data state."""
        ck = safe_load(path, TrainingError)
        check_resumable(ck, path, **expect)
        missing, unexpected = self.module.load_state_dict(ck["model"], strict=False)
        bad = [k for k in missing if not k.startswith("text.")] + list(unexpected)
        if bad:
            raise TrainingError(f"{path}: model weights do not match ({bad[:5]})")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][rank])
        if self.batch_aug is not None and ck.get("augmenter"):
            self.batch_aug.load_state_dict(ck["augmenter"][rank])
        return int(ck["step"]), ck["data"][rank]
