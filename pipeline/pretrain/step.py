"""The M-FLAG training step and what it needs, shared by train-vision and the benchmarks.

``TrainModule`` is what DDP wraps (the vision model plus, in online mode, the text encoder) and
``train_step`` runs one optimizer step of the weighted sum of the loss terms registered in
``pipeline.pretrain.losses.LOSS_TERMS`` (align_weight x alignment(za, zt) + orth_weight x
orthogonality(zv or za)), the losses in fp32 under any autocast dtype. Given a parameter group of the
shared trunk it also measures the norm of each term's gradient on that group (``trunk_probe_params``),
so an ablation can show which term drives the trunk. ``SampleAugmentFactory`` builds the per-sample CPU
augmentation the DataLoader workers run, seeded by each sample's position in the stream so that a
resumed run augments every sample exactly as the uninterrupted run did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from pipeline.common import ConfigError
from pipeline.distributed import any_rank_flag
from pipeline.pretrain import augment, losses, probes, schedules
from pipeline.pretrain.losses import LossSettings
from pipeline.pretrain.state import TrainingError
from pipeline.pretrain.wds import stream_seed
from pipeline.text.models import OnlineTextEncoder
from pipeline.vision.models import MFlagVision, unwrap_model

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """What DDP wraps: the vision model (+ the online text encoder). forward -> (zv, za, zt)."""

    def __init__(self, vision: nn.Module, text: OnlineTextEncoder | None = None):
        super().__init__()
        self.vision = vision
        self.text = text

    def forward(self, images: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zv, za = self.vision(images)
        t = self.text(target) if self.text is not None else target
        return zv, za, self.vision.project_text(t)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint needs: a fully frozen text encoder is reloaded from its source."""
        sd = self.state_dict()
        if self.text is not None and not self.text.unfreeze_last:
            sd = {k: v for k, v in sd.items() if not k.startswith("text.")}
        return sd


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What :func:`train_step` needs besides the model and the batch: the loss terms' weights
    (``loss.weights``, term name -> weight) and options, gradient clipping, the autocast dtype."""

    loss: LossSettings = dataclasses.field(default_factory=LossSettings)
    grad_clip: float | None = None
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = True

    @property
    def weights(self):
        return self.loss.weights


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The optimiser and learning-rate schedule options (``TrainVisionConfig.optim_settings``), fields
    named as the train-vision options they come from."""

    lr: float = 2e-5
    weight_decay: float = 0.05
    decay_norm_bias: bool = False
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float | None = None
    min_lr_ratio: float = 0.0
    restart_every: int | None = None
    restart_period: str = "fraction"
    restart_fraction: float = 0.4
    epochs: int = 1


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """How the vision model is built (``TrainVisionConfig.model_settings``), fields named as the
    train-vision options they come from."""

    proj_dim: int | None = None
    text_head: str = "mlp"
    init: str = "random"
    hidden_dim: int = 2048
    seed: int = 0
    sync_bn: bool = True
    channels_last: bool = True


BATCH_SEMANTICS = ("global", "per-process")


def batch_per_rank(batch_size: int, semantics: str, world_size: int) -> tuple[int, int]:
    """``(batch per process, global batch)`` for ``batch_size`` read as ``semantics``.

    "global": ``batch_size`` is shared by all ranks (it must divide evenly); "per-process": each rank
    takes ``batch_size``, as the original code's DataLoader over a DistributedSampler did, so the
    global batch grows with the number of processes. Raises ``ValueError`` naming the numbers."""
    if semantics not in BATCH_SEMANTICS:
        raise ValueError(f"batch semantics must be one of {BATCH_SEMANTICS}, got {semantics!r}")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    if semantics == "per-process":
        return batch_size, batch_size * world_size
    if batch_size % world_size:
        raise ValueError(f"the global batch {batch_size} must be divisible by the world size {world_size}")
    return batch_size // world_size, batch_size


def param_groups(params: list[nn.Parameter], weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    """AdamW parameter groups. By default biases and norm parameters (every tensor of at most one
    dimension) get no weight decay, the usual practice; ``decay_norm_bias`` decays every parameter,
    as the original code did (``AdamW(model.parameters(), weight_decay=0.05)``, main.py line 73)."""
    params = list(params)
    if decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


class Optimization(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    restart_cycle: int | None  # steps per warm-restart cycle (schedule "restarts"), else None
    autocast_dtype: torch.dtype | None


def build_optimization(module: nn.Module, o: OptimSettings, *, num_samples: int, batch_per_process: int,
                       total_steps: int, precision: str, device: torch.device) -> Optimization:
    """AdamW over the trainable parameters (the original's: betas (0.9, 0.999), eps 1e-8, its main.py
    lines 73-77), the per-step LR schedule (``pipeline.pretrain.schedules``), the fp16 gradient scaler (disabled
    otherwise) and the autocast dtype of ``precision`` (resolved: bf16, fp16 or fp32). ``num_samples``,
    ``batch_per_process`` and ``total_steps`` are the run's sizes (``pipeline.pretrain.data.TrainData``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(params, o.weight_decay, o.decay_norm_bias), lr=o.lr)
    cycle = None
    if o.schedule == "restarts":
        cycle = schedules.restart_cycle(o.restart_every, o.restart_period, o.restart_fraction, epochs=o.epochs,
                                        num_samples=num_samples, batch_per_process=batch_per_process,
                                        total_steps=total_steps)
    fn = schedules.lr_multiplier(o.schedule, warmup_steps=o.warmup_steps, total_steps=total_steps, lr=o.lr,
                                 min_lr=o.min_lr, min_lr_ratio=o.min_lr_ratio, cycle=cycle)
    return Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, fn),
                        torch.amp.GradScaler(device.type, enabled=precision == "fp16"), cycle,
                        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))


def prepare_images(images: torch.Tensor, augmenter, device, channels_last: bool) -> torch.Tensor:
    """A batch from the loader -> float (B, 3, c, c) on ``device``. uint8 batches (GPU path) are
    augmented here; the 3 channels are a stride-0 view of the one grey channel."""
    images = images.to(device, non_blocking=True)
    if augmenter is not None:
        images = augmenter(images)
    elif images.shape[1] == 1:
        images = augment.to_three_channels(images)
    if channels_last and images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def batch_inputs(batch: dict, augmenter, text: OnlineTextEncoder | None, device: torch.device,
                 channels_last: bool) -> tuple[torch.Tensor, object]:
    """A loader batch on ``device``: the images through :func:`prepare_images`, and the targets as cached
    embeddings or, in online mode, the reports tokenized for ``text``."""
    images = prepare_images(batch["image"], augmenter, device, channels_last)
    if text is not None:
        return images, text.tokenize(batch["target"], device)
    return images, batch["target"].to(device, non_blocking=True)


def wrap_for_training(module: nn.Module, dist, device: torch.device, compile: bool) -> nn.Module:
    """``module`` as the step runs it: under DDP with several processes, then ``torch.compile``d if asked;
    the unwrapped module keeps the weights (checkpoints and probes use it)."""
    out = module
    if dist.enabled:
        out = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(out) if compile else out


def trunk_probe_params(vision: nn.Module) -> list[nn.Parameter]:
    """The parameter group on which the loss terms' gradients are compared: the last bottleneck
    block of the ResNet trunk. Both terms reach it (alignment through the projector, orthogonality
    directly on zv or through the projector), and a backward pass that stops there costs a few percent
    of a training step."""
    trunk = unwrap_model(vision.trunk)
    block = trunk.layer4[-1] if hasattr(trunk, "layer4") else trunk
    return [p for p in block.parameters() if p.requires_grad]


def _grad_norm(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    # autograd.grad with explicit inputs writes nothing into .grad and leaves the graph for the real
    # backward (retain_graph), so measuring does not change the step.
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=loss.device)


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, scaler, images: torch.Tensor, target,
               s: StepSettings, grad_params: list[nn.Parameter] | None = None) -> dict[str, torch.Tensor]:
    """Forward, losses (fp32), backward, optional clipping, optimizer step. Returns 0-dim tensors
    ``loss``, one per computed loss term (``losses.active_terms``: ``align``, ``orth``, ...) and
    ``grad_norm`` (not synchronised to the host here); with ``grad_params`` also ``grad_<term>_trunk``,
    the norms of the unweighted terms' gradients on those parameters (this rank's batch; computed before
    the step, not all-reduced)."""
    device_type = images.device.type
    ac = (torch.autocast(device_type, dtype=s.autocast_dtype) if s.autocast_dtype is not None
          else contextlib.nullcontext())
    optimizer.zero_grad(set_to_none=True)
    with ac:
        zv, za, zt = module(images, target)
    values = losses.compute_terms(losses.Embeddings(zv, za, zt), s.loss)
    loss = losses.weighted_total(values, s.loss)
    measured = {}
    if grad_params:
        measured = {f"grad_{name}_trunk": _grad_norm(v, grad_params) for name, v in values.items()}
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), **{name: v.detach() for name, v in values.items()},
            "grad_norm": grad_norm.detach(), **measured}


def term_names(out: dict) -> list[str]:
    """The loss terms in a :func:`train_step` output, in registry order."""
    return [name for name in losses.LOSS_TERMS if name in out]


class NonFiniteWatch:
    """Remembers the first step whose loss was not finite, without a host sync per step.

    ``update`` runs on the device after each step (a few tiny kernels, no ``.item()``); the loop reads
    the result with :meth:`first_bad` where it synchronises anyway (log and checkpoint steps, the
    end), so a NaN is reported within ``log_every`` steps, before any checkpoint is written, and names
    the step where it first appeared. ``terms``: the loss terms the steps compute
    (``losses.active_terms``; by default those of the default weights).
    """

    def __init__(self, device: torch.device | str, start_step: int = 0, terms: list[str] | None = None):
        self.terms = list(terms) if terms is not None else losses.active_terms(LossSettings())
        self.step = torch.full((), float(start_step), dtype=torch.float64, device=device)
        # [seen, step, one value per term]
        self.state = torch.zeros(2 + len(self.terms), dtype=torch.float64, device=device)

    def update(self, out: dict[str, torch.Tensor]) -> None:
        self.step += 1
        first = ~torch.isfinite(out["loss"]) & (self.state[0] == 0)
        seen = torch.ones_like(self.step)
        here = torch.stack([seen, self.step, *(out[name].double() for name in self.terms)])
        self.state = torch.where(first, here, self.state)

    def flag(self) -> torch.Tensor:
        """1-element tensor, nonzero once a non-finite loss was seen (for a cross-rank reduction)."""
        return self.state[:1]

    def first_bad(self) -> tuple[int, dict[str, float]] | None:
        """``(step, {term: value})`` of the first non-finite loss on this process, or None (one sync)."""
        seen, step, *values = self.state.tolist()
        return (int(step), dict(zip(self.terms, values))) if seen else None

    def check(self, dist, last_good: str | None) -> None:
        """Raise TrainingError when any rank has seen a non-finite loss since the start (one host sync),
        naming the step, the last good checkpoint and the fixes. Called at log and checkpoint steps, so a
        checkpoint never holds weights trained through a NaN."""
        if not any_rank_flag(self.flag(), dist):
            return
        bad = self.first_bad()
        terms = ", ".join(f"{name} {v:.4g}" for name, v in bad[1].items()) if bad else ""
        where = f"at step {bad[0]} ({terms}) on rank {dist.rank}" if bad else "on another rank"
        raise TrainingError(
            f"non-finite loss {where}; stopping. The last good checkpoint is "
            f"{last_good or 'none (no checkpoint written yet)'}; lower --lr, set --grad-clip or use "
            f"--precision fp32")


class SampleAugmentFactory:
    """Picklable factory of the worker-side augmentation ``fn(uint8 H x W, seed) -> float (3, c, c)``.

    Each sample's parameters come from a generator seeded by the sample's position in the stream
    (``pipeline.pretrain.wds.Augment``), so a resumed run augments every sample exactly as before."""

    def __init__(self, recipe: str, crop: int):
        self.recipe, self.crop = recipe, crop

    def __call__(self):
        return _SampleAugment(self.recipe, self.crop)


class _SampleAugment:
    """Per-sample CPU augmentation in a DataLoader worker, seeded by the sample's position in the
    stream so that a resumed run augments every sample exactly as the uninterrupted run did."""

    def __init__(self, recipe: str, crop: int):
        self.recipe, self.crop = recipe, crop
        self.generator = torch.Generator()

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        # (1, c, c) normalized float; the 3-channel view is made after collation.
        return augment.augment_one(image, self.generator.manual_seed(seed), self.recipe, self.crop)


def make_augmenters(aug: str, aug_device: str, crop_size: int, seed: int, device: str, rank: int = 0):
    """(per-sample augmentation factory for the CPU workers or None, batched augmenter for the main
    process or None, deterministic centre-crop preprocessor for the probe batch)."""
    probe_aug = augment.Augmenter("none", device=device, seed=0, out_size=crop_size)
    if aug_device == "cuda":
        batch_seed = stream_seed(seed, 0, rank, 0, "batch-augment")
        return None, augment.Augmenter(aug, device=device, seed=batch_seed, out_size=crop_size), probe_aug
    return SampleAugmentFactory(aug, crop_size), None, probe_aug


@torch.no_grad()
def probe_model(module: TrainModule, probe: dict, probe_aug, device: torch.device, channels_last: bool,
                chunk: int = 128) -> tuple[dict, dict]:
    """(metrics, spectra of zv and za) of ``module`` on a probe set (``pipeline.pretrain.data``), in eval
    mode, in chunks of ``chunk`` images (a final probe of several hundred images at full size would not
    fit at once on a small GPU)."""
    was = module.training
    module.eval()
    try:
        text = probe["text"]
        if module.text is not None:
            zt = module.vision.project_text(module.text(module.text.tokenize(text, device)))
        else:
            zt = module.vision.project_text(text.to(device))
        zvs, zas = [], []
        for i in range(0, len(probe["targets"]), chunk):
            images = prepare_images(probe["image"][i:i + chunk], probe_aug, device, channels_last)
            zv, za = module.vision(images)
            zvs.append(zv.float())
            zas.append(za.float())
        spectra: dict = {}
        report = probes.probe_report(torch.cat(zvs), torch.cat(zas), zt.float(), probe["targets"], spectra)
        return report, spectra
    finally:
        module.train(was)


def step_scalars(out: dict[str, torch.Tensor], dist) -> dict[str, float]:
    """The logged numbers of :func:`train_step`'s output, averaged over ranks (one all-reduce):
    ``train/loss``, ``train/<term>`` per loss term, ``train/grad_norm``, ``train/grad_<term>_trunk``.

    grad_<term>_trunk: norms of the unweighted terms' gradients on the trunk's last block (mean over ranks
    of each rank's own batch; 0 when not measured); the weighted ratio orth_weight x g_orth /
    (align_weight x g_align) says which term drives the shared trunk."""
    zero = torch.zeros((), device=out["loss"].device)
    names = term_names(out)
    keys = ["loss", *names, "grad_norm", *(f"grad_{name}_trunk" for name in names)]
    vals = torch.stack([out["loss"], *(out[name] for name in names), out["grad_norm"].float(),
                        *(out.get(f"grad_{name}_trunk", zero) for name in names)]).float()
    if dist.enabled:
        tdist.all_reduce(vals)
        vals /= dist.world_size
    return {f"train/{k}": float(v) for k, v in zip(keys, vals.cpu())}


def log_scalars(out: dict[str, torch.Tensor], dist, optimizer: torch.optim.Optimizer, window: dict,
                global_batch: int, pos) -> dict[str, float]:
    """One metrics.jsonl record's training numbers: :func:`step_scalars`, the learning rate, throughput
    and the share of time spent waiting for data over the ``window`` since the last log (``t0``, ``wait``
    seconds, ``steps``), and the stream's bad-sample counts so far (``pos``: a ``DataPos``)."""
    dt = max(time.perf_counter() - window["t0"], 1e-9)
    return {**step_scalars(out, dist), "train/lr": optimizer.param_groups[0]["lr"],
            "train/images_per_s": window["steps"] * global_batch / dt, "train/data_wait": window["wait"] / dt,
            "train/missing": pos.missing, "train/corrupt": pos.corrupt, "train/lost": pos.lost}


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def parameter_report(trainable: int, text_params: int | None, text_model_id: str, cached_text: bool,
                     is_main: bool) -> dict:
    """summary.json's parameter counts; with a cached (frozen, not loaded) text encoder also how many
    fewer parameters are trained than when image and text encoders train together. Logged on rank 0."""
    out = {"trainable_params": trainable, "text_encoder_params": text_params,
           "text_model": text_model_id, "fewer_trainable_vs_finetuned_text": None}
    if text_params and cached_text:
        both = trainable + int(text_params)
        fewer = 1.0 - trainable / both
        out["fewer_trainable_vs_finetuned_text"] = fewer
        if is_main:
            log.info("trainable parameters: %s (ResNet50 + projectors); frozen text encoder %s: %s, "
                     "not loaded in this process", _format_count(trainable), text_model_id,
                     _format_count(int(text_params)))
            log.info("  -> %.0f%% fewer trainable parameters than training image and text encoders "
                     "together (%s)", 100 * fewer, _format_count(both))
    elif is_main:
        log.info("trainable parameters: %s%s", _format_count(trainable),
                 f"; text encoder {text_model_id}: {_format_count(int(text_params))}"
                 if text_params else "; the cache does not record text_encoder_params")
    return out


def build_train_module(text_dim: int, text, m: ModelSettings, *, dist, device: torch.device,
                       local_batch: int) -> TrainModule:
    """The vision model (seeded by ``m.seed``) with the online text encoder ``text`` or None, on ``device``;
    SyncBatchNorm on several CUDA processes when ``m.sync_bn``. Raises ConfigError when ``m.text_head``
    "none" meets a ``m.proj_dim`` other than ``text_dim``."""
    if m.text_head == "none" and m.proj_dim is not None and m.proj_dim != text_dim:
        raise ConfigError(f"proj_dim: the text embeddings have dimension {text_dim}; with --text-head "
                          f"none images are projected into that space, so --proj-dim must be "
                          f"{text_dim} (got {m.proj_dim})")
    torch.manual_seed(m.seed)
    vision = MFlagVision(text_dim, m.proj_dim, m.text_head, m.init, m.hidden_dim)
    if dist.enabled and m.sync_bn:
        # BatchNorm over the global batch, as on one GPU: otherwise its statistics (and zv, za, zt)
        # come from batch_size / world_size samples and the run depends on the number of GPUs.
        if device.type == "cuda":
            vision = nn.SyncBatchNorm.convert_sync_batchnorm(vision)
        elif dist.is_main:
            log.warning("sync_bn: SyncBatchNorm needs CUDA; on %s each of the %d processes normalises "
                        "over its own %d samples", device.type, dist.world_size, local_batch)
    module = TrainModule(vision, text).to(device)
    if m.channels_last:
        module.vision.trunk.to(memory_format=torch.channels_last)
    return module
