"""The one training loop of the downstream tasks, and what it needs: settings, loaders, devices, BN.

``fit`` runs the epochs of every head (linear probe, fine-tuned classifier, U-Net, detectors): AdamW on
the trainable parameters, one pass over the training loader per epoch (a task supplies ``step(batch)
-> (loss, n)``), a validation pass (the task's ``validate() -> dict``), early stopping on the
monitored validation value and, at the end, the weights of the best epoch restored.

On CUDA the loaders pin memory, batches move with non-blocking copies and image batches (and the
conv models) use the channels_last layout; on CPU none of this applies.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.common import MflagError, progress
from pipeline.downstream.data import ImageSource, to_input

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """``monitor``: the validation value early stopping follows (a metric name, or ``loss``), maximised
    (``mode="max"``) or minimised. ``grad_clip``: max gradient norm, None for none. ``drop_last``: drop
    the last incomplete training batch (when the training set holds more than one batch)."""

    epochs: int
    batch_size: int
    lr: float
    patience: int
    seed: int
    device: str = "cpu"
    workers: int = 0
    weight_decay: float = 1e-4
    norm: str = "imagenet"  # key of NORMALIZATIONS
    monitor: str = "loss"
    mode: str = "min"
    grad_clip: float | None = None
    drop_last: bool = False
    # called after every epoch with its history row (epoch, train_loss, val_*): eval's --report-to
    on_epoch: Callable[[dict], None] | None = dataclasses.field(default=None, compare=False)

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    history: list[dict]
    selection: str  # the validation value the best epoch was chosen by


# --------------------------------------------------------------------------- devices and loaders
def make_loader(ds, settings: TrainSettings, shuffle: bool, collate=None, train: bool = False) -> DataLoader:
    """A DataLoader with a seeded order; pinned memory on CUDA; the last incomplete batch dropped only
    for training with ``settings.drop_last`` and more than one batch of data."""
    g = torch.Generator().manual_seed(settings.seed)
    drop = train and settings.drop_last and len(ds) > settings.batch_size
    return DataLoader(ds, batch_size=settings.batch_size, shuffle=shuffle, num_workers=settings.workers,
                      collate_fn=collate, generator=g, drop_last=drop, pin_memory=settings.cuda,
                      persistent_workers=False)


def to_device(x: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """``x`` on the settings' device (non-blocking from pinned memory on CUDA)."""
    return x.to(settings.device, non_blocking=settings.cuda)


def images_in(img_u8: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """A uint8 B x H x W batch as the normalised B x 3 x H x W network input on the device
    (channels_last on CUDA, where cuDNN's convolutions are fastest in that layout)."""
    x = to_input(to_device(img_u8, settings), settings.norm)
    return x.contiguous(memory_format=torch.channels_last) if settings.cuda else x


def place(model: nn.Module, settings: TrainSettings, conv: bool = True) -> nn.Module:
    """Move ``model`` to the device; conv models take channels_last on CUDA."""
    model.to(settings.device)
    if conv and settings.cuda:
        model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------- the loop
def fit(model: nn.Module, loader: DataLoader, step: Callable, validate: Callable[[], dict],
        settings: TrainSettings, desc: str, train_mode: Callable[[], None] | None = None,
        params: Sequence[nn.Parameter] | None = None) -> FitResult:
    """Train ``params`` (default: the trainable parameters of ``model``) for up to ``settings.epochs``
    epochs with early stopping on ``validate()[settings.monitor]``.

    ``step(batch) -> (loss tensor, number of items)``; ``train_mode()`` puts the model in training mode
    (default ``model.train()``; a task with frozen BatchNorm sets those layers back to eval there).
    ``validate() -> dict`` of metrics (and ``loss``). A monitored value must improve strictly to count.
    When a maximised metric is undefined on the validation split (NaN, e.g. no positive), the
    validation loss (or, failing that, the training loss) selects the epoch instead, and ties on a
    maximised metric go to the lower validation loss. On return ``model`` holds the best epoch's state.
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise MflagError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sign = 1.0 if settings.mode == "max" else -1.0
    best_key, best_state, best_epoch, bad = (-math.inf, -math.inf), None, -1, 0
    history: list[dict] = []
    selection = f"val {settings.monitor} ({settings.mode})"
    for epoch in range(settings.epochs):
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        (train_mode or model.train)()
        total, n = 0.0, 0
        for batch in progress(loader, total=len(loader), desc=f"{desc} epoch {epoch}", unit="batch"):
            loss, count = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            total, n = total + loss.item() * count, n + count
        train_loss = total / max(n, 1)
        val = validate()
        history.append({"epoch": epoch, "train_loss": train_loss,
                        **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))}})
        if settings.on_epoch is not None:
            settings.on_epoch(history[-1])
        value = val.get(settings.monitor, float("nan"))
        score = sign * value if _finite(value) else float("nan")
        if not _finite(score):
            if _finite(val.get("loss")):
                selection, score = "val loss (monitored value undefined on val)", -val["loss"]
            else:
                selection, score = "train loss (monitored value undefined on val)", -train_loss
        log.info("%s epoch %d: train loss %.4f, val %s %.4f", desc, epoch, train_loss, settings.monitor, value)
        # ties on a maximised metric (common on small validation sets, e.g. mAP 0 early in detection) go
        # to the lower validation loss, or the lower training loss where there is none
        tie = 0.0 if settings.mode == "min" else -val["loss"] if _finite(val.get("loss")) else -train_loss
        key = (score, tie)
        if key > best_key:
            best_key, best_epoch, bad = key, epoch, 0
            best_state = trainable_state(model)
        else:
            bad += 1
            if bad >= settings.patience:
                log.info("%s: early stop at epoch %d (best %d)", desc, epoch, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return FitResult(best_epoch=best_epoch, history=history, selection=selection)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def trainable_state(model: nn.Module) -> dict:
    """A copy of the state that training can change: every entry but the frozen parameters (buffers
    such as BatchNorm statistics are kept: they adapt where BN runs in training mode)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def frozen_bn_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> Callable[[], None]:
    """A ``train_mode`` that trains ``model`` but keeps the modules in ``frozen`` (and so their BN
    statistics) in eval mode."""
    def mode() -> None:
        model.train()
        for m in frozen:
            m.eval()
    return mode


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


# --------------------------------------------------------------------------- random encoders
@torch.no_grad()
def calibrate_bn(encoder: nn.Module, source: ImageSource, indices: Sequence[int], settings: TrainSettings,
                 max_images: int = 512, transform=None) -> int:
    """Re-estimate the BatchNorm running statistics of ``encoder`` on (up to ``max_images`` of) the
    images at ``indices`` (each passed through ``transform``, e.g. the evaluation crop); weights are
    untouched. Returns the number of images used.

    A randomly initialised ResNet's running statistics (mean 0, variance 1) describe no data, so a
    frozen random encoder would run un-normalised (features grow about 50x through the four stages)
    and heads on it train unstably. Train-mode BN would use batch statistics; this gives the frozen
    random baseline the same normalisation without training anything.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    idx = list(indices)[:max_images]
    if not bns or not idx:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    encoder.to(settings.device).train()
    bs = max(2, settings.batch_size)
    # no batch of one image: BN cannot take batch statistics of a single 1x1 feature map
    starts = [s for s in range(0, len(idx), bs) if len(idx) - s > 1 or s == 0]
    rng = np.random.default_rng(0)
    for s in starts:
        imgs = [source.get(i)[0] for i in idx[s:s + bs]]
        if transform is not None:
            imgs = [transform(im, None, rng)[0] for im in imgs]
        encoder(images_in(torch.from_numpy(np.stack(imgs)), settings))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    encoder.eval()
    return len(idx)
