"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files or a Weights & Biases run.

``open_tracker(kind, out, config) -> Tracker``; ``tracker.log(scalars, step)`` takes the same
numbers a stage writes to its JSON log, ``tracker.close()`` flushes. ``kind`` is ``none``,
``tensorboard`` (``OUT/tensorboard/``, via ``torch.utils.tensorboard``) or ``wandb`` (files under
``OUT/wandb/``; ``WANDB_MODE=offline`` works without network, ``wandb sync`` uploads later). The
packages are the optional extra ``mflag[tracking]`` and are imported only when asked for.

A resumed run continues the same record: TensorBoard drops the events after the resume step
(``purge_step``), and the W&B run id is derived from the output folder's fingerprint, so the same
run continues (``resume="allow"``) instead of a new one starting.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.common import ConfigError, MflagError, atomic_path, fingerprint, read_text_utf8

log = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb")
_EXTRA = "pip install 'mflag[tracking]'"


class Tracker:
    """No tracking: the interface every tracker has."""

    kind = "none"

    def log(self, scalars: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (step/epoch bookkeeping and non-numbers left out)."""
    out = {}
    for k, v in values.items():
        if k in ("step",) or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, out: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise MflagError(f"--report-to tensorboard needs the tensorboard package ({e}); {_EXTRA}") from e
        self.dir = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=resume_step)

    def log(self, scalars: Mapping[str, Any], step: int) -> None:
        for k, v in _scalars(scalars).items():
            self.writer.add_scalar(k, v, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, out: Path, config: Mapping[str, Any], name: str, run_id: str):
        try:
            import wandb
        except ImportError as e:
            raise MflagError(f"--report-to wandb needs the wandb package ({e}); {_EXTRA}") from e
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mflag"), dir=str(out), id=run_id,
                                  name=name, config=dict(config), resume="allow", reinit="create_new")
        except Exception as e:  # no login, no network in online mode: say how to run offline
            raise MflagError(f"--report-to wandb: cannot start a W&B run ({type(e).__name__}: {e}); log in with "
                             "`wandb login`, or set WANDB_MODE=offline and `wandb sync` later") from e

    def log(self, scalars: Mapping[str, Any], step: int) -> None:
        self.run.log(_scalars(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, out: str | os.PathLike, config: Mapping[str, Any], *, name: str | None = None,
                 resume_step: int | None = None, key: str | None = None) -> Tracker:
    """A tracker for ``kind`` writing under ``out``. ``config``: the run's options (W&B shows them).
    ``key`` (default: the config's fingerprint) and the folder name the W&B run, so a resumed run
    continues it. ``resume_step``: the step a resumed run restarts after (later TensorBoard events of
    the interrupted run are dropped)."""
    if kind not in REPORT_TO:
        raise ConfigError(f"report_to: expected one of {', '.join(REPORT_TO)}, got {kind!r}")
    out = Path(out)
    if kind == "tensorboard":
        return TensorBoardTracker(out, resume_step)
    if kind == "wandb":
        run_id = fingerprint({"out": str(out.resolve()), "key": key or fingerprint(dict(config))}, length=16)
        return WandbTracker(out, config, name or out.name, run_id)
    return Tracker()


def append_metrics(path: str | os.PathLike, rec: Mapping[str, Any]) -> None:
    """Append one record to a ``metrics.jsonl`` (sorted keys, one line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, sort_keys=True) + "\n")


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """On resume, drop the lines of ``metrics.jsonl`` past ``step`` (those steps run again) and a line
    cut by the kill; the file is replaced atomically."""

    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for ln in read_text_utf8(path).splitlines():
        try:
            if ln.strip() and json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
