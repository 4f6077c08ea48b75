"""train-vision: M-FLAG pre-training of a ResNet50 against frozen report embeddings.

The image stream (``pipeline.wds``) is joined by study_id to embeddings read from the text cache, so
no text model lives in this process (``text_mode="online"`` runs one per step instead: the original
design, kept as the baseline and the freezing ablation). Loss = align_weight x alignment(za, zt) +
orth_weight x orthogonality(zv): as in the original code (``orthogonal_loss(img_emb, img_emb)``) the orthogonality
loss sees the raw 2048-d ResNet features zv, the latent space whose collapse it is meant to prevent
and where the collapse diagnostic is measured. ``orth_on="za"`` applies it to the projected
embedding instead, whose final BatchNorm(affine=False) makes zᵀz/B a correlation-like matrix as in
Barlow Twins (where lam = 0.0051 comes from).
torchrun DDP, AMP, atomic checkpoints and exact resume:

Exact resume. Everything random is either restored from the checkpoint (weights, optimizer, scheduler,
scaler, RNG states) or a pure function of (seed, epoch, rank, logical worker, sample number): the data
order and the CPU augmentation. The checkpoint stores, per rank and logical DataLoader worker, how
many raw samples that worker had consumed; a resumed worker skips those before decoding, and the
worker rotation (see ``pipeline.wds``) makes the batch order continue where it stopped. On CPU a run
killed after step k and resumed ends bit-identical to an uninterrupted run.

Orthogonality scope. The default is ``global``: z is all-gathered with gradients, so the loss does
not depend on how many GPUs share the global batch; ``local`` is the original code's per-GPU loss.
With one process both are the same. Likewise ``sync_bn`` (default on) makes every BatchNorm use
the statistics of the global batch on several CUDA processes (SyncBatchNorm).

Recipes. ``batch_semantics``, ``pairs``, ``decay_norm_bias``, ``restart_period`` and ``min_lr``
express the original run's reading of its settings (512 per process, every MIMIC split, weight decay
on every parameter, its T_0 formula, eta_min); docs/RECIPES.md and configs/mimic-original.yaml.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from pipeline import probes
from pipeline import wds as wdsp
from pipeline.common import (ConfigError, MflagError, atomic_path, config_to_dict, fingerprint, read_json,
                             save_config, write_json)
from pipeline.distributed import (DistInfo, all_gather_object, any_rank, any_rank_flag, barrier, cleanup,
                                  init_distributed, resolve_precision)
from pipeline.locks import output_lock
from pipeline.options import check_fields, option
from pipeline.pretrain import (BATCH_SEMANTICS, NonFiniteWatch, SampleAugmentFactory, StepSettings, TrainModule,
                               batch_per_rank, param_groups, prepare_images, train_step, trunk_probe_params)
from pipeline.schedules import WarmupCosine, WarmupCosineRestarts, original_restart_period
from pipeline.textmodels import OnlineTextEncoder
from pipeline.tracking import REPORT_TO, Tracker, open_tracker
from pipeline.train_state import (load_checkpoint, param_checksum, publish_latest, rng_state, save_checkpoint,
                                  set_rng_state)

log = logging.getLogger(__name__)

CKPT_FORMAT = 1
# --pairs: the prepare splits trained on. "all" is what the original read: MGCA's master.csv holds every
# split (its mimic_cxr.py keeps the split column and writes all rows), and M-FLAG's dataset reads every row.
PAIRS = {"train": ("train",), "all": ("train", "validate", "test")}
# Fields that do not change what is trained: a resumed run may change them.
_NON_SEMANTIC = ("out", "resume", "log_every", "ckpt_every", "probe_every", "probe_size", "final_probe_size",
                 "probe_shards", "keep_checkpoints", "compile", "threads", "report_to")
# Options added after runs were made: at their default they stay out of the fingerprint, so runs made
# before they existed still resume and still count as finished.
_ADDED_WITH_DEFAULT = {"align_weight": 1.0}


class TrainingError(MflagError):
    """Training cannot continue (non-finite loss, too many bad samples, incompatible checkpoint)."""


@dataclasses.dataclass(frozen=True)
class TrainVisionConfig:
    """Resolved options of one train-vision run (each field is the option of the same name,
    pipeline.options; ``cli.py train-vision --help`` and docs/OPTIONS.md list them)."""

    shards: str = option(help="prepare output folder, a folder of .tar shards, or webdataset URLs (brace ranges, "
                              "'::'-separated lists, pipe: commands).")
    out: str = option(help="Output folder: encoder.pt, projector.pt, metrics.jsonl, checkpoints/.")
    text_cache: str | None = option(None, help="Text-embedding cache folder (or its parent) from embed-text; "
                                               "required unless --text-mode online.")
    text_mode: str = option("cache", choices=("cache", "online"),
                            help="online runs the text encoder inside each step (the original design; "
                                 "baseline/ablation).")
    text_model: str | None = option(None, help="online mode: hub id or local folder of the text encoder.")
    reports: str | None = option(None, help="online mode: reports.jsonl (texts by study_id).")
    unfreeze_last: int | str = option(0, help="online mode: train the last K text-encoder layers, or 'all' (every "
                                              "layer and the embeddings).")
    text_pooling: str = option("cls", choices=("cls", "mean"),
                               help="online mode: how the text encoder's output becomes one vector.")
    text_max_length: int = option(512, min=1, help="online mode: tokens per report, padded like the original.")
    probe_shards: str | None = option(None, show_default="validate-*.tar beside the training shards, else test-*.tar",
                                      help="Held-out shards for the probes.")
    pairs: str = option("train", choices=tuple(PAIRS),
                        help="Which splits of a prepare output are trained on: train (validate/test stay held out for "
                             "the probes) or all (train+validate+test, as the original code read MIMIC).")
    batch_size: int = option(128, min=2,
                             help="Images per step: over all ranks, or per process with --batch-semantics "
                                  "per-process (at least 2, for the projector's BatchNorm).")
    batch_semantics: str = option("global", choices=BATCH_SEMANTICS,
                                  help="global: --batch-size is split over the ranks; per-process: each rank takes "
                                       "--batch-size (the original's 512 on 2 processes = 1,024 per step).")
    epochs: int = option(1, min=1, help="Passes over --num-samples training images.")
    max_steps: int | None = option(None, min=1, show_default="epochs x steps per epoch", help="Total optimizer steps.")
    num_samples: int | None = option(None, min=1, show_default="from sizes.json",
                                     help="Training samples per epoch; needed for pipe:/remote shards.")
    num_workers: int = option(2, min=0, names=("--num-workers", "--workers"), help="DataLoader workers per rank.")
    shuffle_buffer: int = option(1000, min=1, help="Samples held per worker for shuffling across shards.")
    image_size: int = option(256, min=1, help="Shard image size (resized if not).")
    crop_size: int = option(224, min=1, help="Training crop (the network input).")
    aug: str = option("original", choices=("original", "light", "none"),
                      help="original: the paper's augmentation (crop, rotation up to 90 degrees, perspective with p "
                           "0.5, autocontrast with p 0.5); light: crop with translation, rotation within +-10 "
                           "degrees, zoom 0.9-1.1, autocontrast with p 0.5 (no perspective, no flip); none: centre "
                           "crop (pipeline/augment.py).")
    aug_device: str = option("cpu", choices=("cpu", "cuda"),
                             help="cuda: workers only decode; the warp runs batched on the GPU.")
    on_missing: str = option("skip", choices=("skip", "error"),
                             help="A sample whose study_id is not in the cache: count and skip, or stop.")
    max_bad_fraction: float = option(0.01, min=0, max=1,
                                     help="Stop when corrupt samples exceed this fraction of those read.")
    init: str = option("random", help="random, imagenet, or a state_dict file.")
    text_head: str = option("mlp", choices=("mlp", "none"),
                            help="mlp: project text too (original code); none: project images into the text space.")
    proj_dim: int | None = option(None, min=1, show_default="1024; the cache dim with --text-head none",
                                  help="Projection size.")
    hidden_dim: int = option(2048, min=1, help="Projector hidden size.")
    orth_weight: float = option(1.0, min=0, help="Weight of the orthogonality loss (0: alignment only).")
    align_weight: float = option(1.0, min=0, help="Weight of the alignment loss (0: orthogonality only, an ablation).")
    orth_lambda: float = option(0.0051, help="Off-diagonal weight.")
    orth_scope: str = option("global", choices=("local", "global"),
                             help="global: gather z over ranks so the loss does not depend on the GPU count.")
    orth_on: str = option("zv", choices=("za", "zv"),
                          help="za: projected image embedding (BN-normalized); zv: ResNet features.")
    orth_standardize: bool = option(False, negatable=False,
                                    help="Standardize z over the batch first (correlation matrix).")
    lr: float = option(2e-5, min=0, min_open=True, help="AdamW peak learning rate.")
    weight_decay: float = option(0.05, min=0, help="AdamW weight decay (not on biases and norm parameters unless "
                                                   "--decay-norm-bias).")
    decay_norm_bias: bool = option(False, help="Weight decay on biases and norm parameters too, as the original code "
                                               "(one AdamW group).")
    schedule: str = option("cosine", choices=("cosine", "restarts", "constant"),
                           help="Learning rate after --warmup-steps: cosine decay to the floor, cosine with warm "
                                "restarts (--restart-every/--restart-period), or constant.")
    warmup_steps: int = option(0, min=0, help="Linear warmup from 0.")
    restart_every: int | None = option(None, min=1, show_default="from --restart-period",
                                       help="restarts: cycle length in steps.")
    restart_period: str = option("fraction", choices=("fraction", "original"),
                                 help="restarts: cycle length as --restart-fraction of the run's steps, or the "
                                      "original code's T_0 = int((epochs-1) x samples per epoch // 4 // batch per "
                                      "process x 0.4).")
    restart_fraction: float = option(0.4, min=0, min_open=True, max=1,
                                     help="restarts with --restart-period fraction: each cycle this fraction of the "
                                          "run's steps.")
    min_lr_ratio: float = option(0.0, min=0, max=1, help="Floor of the cosine schedule, as a fraction of --lr.")
    min_lr: float | None = option(None, min=0, help="Floor of the cosine schedule as a learning rate (the original's "
                                                    "eta_min 1e-8); instead of --min-lr-ratio.")
    grad_clip: float | None = option(None, min=0, min_open=True, help="Clip the global grad norm to this value.")
    precision: str = option("auto", choices=("auto", "bf16", "fp16", "fp32"),
                            help="auto: bf16 on CUDA, fp32 on CPU; losses always in fp32.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N (one process; under torchrun each rank uses its "
                                      "LOCAL_RANK GPU, or its only visible GPU).")
    channels_last: bool = option(True, help="Run the ResNet trunk in the channels-last memory format (faster "
                                            "convolutions on CUDA).")
    sync_bn: bool = option(True, help="With several CUDA processes, BatchNorm statistics over the global batch "
                                      "(SyncBatchNorm).")
    compile: bool = option(False, negatable=False, help="torch.compile the model.")
    seed: int = option(0, min=0, help="Initialisation, data order and augmentation follow from it.")
    log_every: int = option(10, min=1, help="Steps between metrics.jsonl lines.")
    ckpt_every: int = option(500, min=1, help="Steps between checkpoints.")
    probe_every: int = option(500, min=1, help="Steps between collapse probes on held-out images.")
    probe_size: int = option(64, min=0, help="Held-out images in the cheap probe every --probe-every steps.")
    final_probe_size: int = option(512, min=0, help="Held-out images (validate, then test shards) in the collapse "
                                                    "diagnostic at the end.")
    keep_checkpoints: int = option(2, min=0, help="Step checkpoints kept on disk (0: none once the run has finished).")
    resume: str = option("auto", help="auto (OUT/checkpoints/latest.pt when present), never, or a checkpoint path.")
    threads: int | None = option(None, min=1, help="torch CPU threads per process.")
    report_to: str = option("none", choices=REPORT_TO,
                            help="Also send the metrics.jsonl scalars to TensorBoard (OUT/tensorboard) or W&B "
                                 "(OUT/wandb; WANDB_MODE=offline works without network). Needs the 'tracking' extra.")

    def __post_init__(self):
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field}: {msg}")

        if isinstance(self.unfreeze_last, str) and self.unfreeze_last.strip().isdigit():
            object.__setattr__(self, "unfreeze_last", int(self.unfreeze_last))
        check_fields(self)
        need(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                         and self.device[5:].isdigit()),
             "device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.text_mode == "cache":
            need(bool(self.text_cache), "text_cache", "required with text_mode 'cache'")
        else:
            need(bool(self.text_model), "text_model", "required with text_mode 'online'")
            need(bool(self.reports), "reports", "required with text_mode 'online' (report texts by study_id)")
        need(self.unfreeze_last == "all" or (isinstance(self.unfreeze_last, int)
                                             and not isinstance(self.unfreeze_last, bool)),
             "unfreeze_last", f"expected a number of layers or 'all', got {self.unfreeze_last!r}")
        need(self.crop_size <= self.image_size, "crop_size",
             f"must be <= image_size ({self.image_size}), got {self.crop_size}")
        need(self.unfreeze_last == "all" or self.unfreeze_last >= 0, "unfreeze_last",
             f"must be >= 0 or 'all', got {self.unfreeze_last}")
        need(self.align_weight > 0 or self.orth_weight > 0, "align_weight",
             "align_weight and orth_weight are both 0: nothing to train")
        need(self.min_lr is None or self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr:g}]")
        need(self.min_lr is None or self.min_lr_ratio == 0, "min_lr",
             "give either min_lr (an absolute floor) or min_lr_ratio (a fraction of lr), not both")
        need(self.restart_every is None or self.restart_period == "fraction", "restart_every",
             "give either restart_every (steps) or restart_period 'original' (the original's T_0 formula), not both")
        need(self.unfreeze_last == 0 or self.text_mode == "online", "unfreeze_last",
             "only with text_mode 'online' (the cached mode has no text model to train)")


# --------------------------------------------------------------------------- helpers
def semantic_config(cfg: TrainVisionConfig) -> dict:
    """The config fields that define what is trained (a resumed run must match them)."""
    d = config_to_dict(cfg)
    for k in _NON_SEMANTIC:
        d.pop(k, None)
    for k, default in _ADDED_WITH_DEFAULT.items():
        if d.get(k) == default:
            d.pop(k)
    if str(d.get("device", "")).startswith("cuda:"):
        d["device"] = "cuda"  # which GPU does not change what is trained: resume on another one
    return d


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _make_augmenters(cfg: TrainVisionConfig, device: str, rank: int = 0):
    """(per-sample augmentation factory for the CPU workers or None, batched augmenter for the main
    process or None, deterministic centre-crop preprocessor for the probe batch)."""
    from pipeline import augment

    probe_aug = augment.Augmenter("none", device=device, seed=0, out_size=cfg.crop_size)
    if cfg.aug_device == "cuda":
        seed = wdsp.stream_seed(cfg.seed, 0, rank, 0, "batch-augment")
        return None, augment.Augmenter(cfg.aug, device=device, seed=seed, out_size=cfg.crop_size), probe_aug
    return SampleAugmentFactory(cfg.aug, cfg.crop_size), None, probe_aug


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class _DataPos:
    """Where the data stream of this rank stands: ``workers`` maps logical worker -> raw samples
    consumed in the current epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    workers: dict = dataclasses.field(default_factory=dict)
    raw: int = 0
    missing: int = 0
    corrupt: int = 0
    lost: int = 0  # samples damaged shards did not yield (against sizes.json)
    lost_shards: dict = dataclasses.field(default_factory=dict)
    shards_seen: set = dataclasses.field(default_factory=set)


def run(cfg: TrainVisionConfig) -> dict:
    """Train; returns the summary dict (also written to ``OUT/summary.json``).

    OUT is locked for the run (rank 0 holds the lock for every rank), and temp files that a run killed
    while saving left in OUT and OUT/checkpoints are removed first."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    try:
        with output_lock(cfg.out, "train-vision", dist=dist, clean_temps=("", "checkpoints")):
            return _Trainer(cfg, dist).fit()
    finally:
        cleanup(dist)


class _Trainer:
    def __init__(self, cfg: TrainVisionConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = torch.device(dist.device)
        if cfg.aug_device == "cuda" and self.device.type != "cuda":
            raise ConfigError("aug_device: 'cuda' needs a CUDA device")
        self.precision = resolve_precision(cfg.precision, dist.device)
        self.tracker: Tracker = Tracker()
        if self.device.type == "cuda":
            # Every step has the same input shape, so cuDNN's timed algorithm choice pays off after the
            # first step; GPU runs are not bit-reproducible anyway (DESIGN.md, determinism).
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ set-up
    def _setup_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.train = (wdsp.resolve_shards(cfg.shards, "train") if cfg.pairs == "train"
                      else wdsp.resolve_splits(cfg.shards, PAIRS[cfg.pairs]))
        n = cfg.num_samples or self.train.num_samples
        if n is None:
            raise ConfigError("num_samples: the shards have no sizes.json; pass --num-samples "
                              "(training samples per epoch)")
        self.num_samples = n
        try:
            self.local_batch, self.global_batch = batch_per_rank(cfg.batch_size, cfg.batch_semantics,
                                                                 dist.world_size)
        except ValueError as e:
            raise ConfigError(f"batch_size: {e} (or use --batch-semantics per-process)") from e
        if self.local_batch < 2:
            raise ConfigError(f"batch_size: {self.local_batch} per rank; BatchNorm in the projector needs at least 2")
        self.steps_per_epoch = max(1, n // self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        slots = dist.world_size * max(1, cfg.num_workers)
        if len(self.train.urls) < slots:
            fix = ("lower --num-workers or re-shard" if cfg.num_workers > 1 else
                   "use fewer ranks or re-shard") + " with a smaller --shard-size in prepare"
            raise wdsp.DataError(
                f"{len(self.train.urls)} training shard(s) for {dist.world_size} rank(s) x "
                f"{max(1, cfg.num_workers)} loader process(es) each: need at least {slots} so every one reads "
                f"its own shards ({fix})")
        if cfg.text_mode == "cache":
            from cache import TextEmbeddingCache

            self.cache = TextEmbeddingCache(cfg.text_cache)
            self.targets = wdsp.CacheTargets(str(self.cache.path))
            self.text_dim = self.cache.dim
            self.text_params = self.cache.attrs.get("text_encoder_params")
            self.text_model_id = self.cache.attrs.get("model_id", "?")
            if dist.is_main:
                log.info("text cache %s: %d reports, dim %d", self.cache.path, len(self.cache), self.cache.dim)
                for k in sorted(self.cache.attrs):
                    log.debug("  cache attr %s = %s", k, self.cache.attrs[k])
        else:
            self.cache = None
            self.targets = wdsp.ReportTexts(wdsp.read_reports(cfg.reports))
            self.text_dim = None  # known once the text model is loaded
            self.text_params = None
            self.text_model_id = cfg.text_model
        found, read, missing = wdsp.check_targets_cover(list(self.train.urls), self.targets)
        source = f"text cache {cfg.text_cache}" if cfg.text_mode == "cache" else f"reports {cfg.reports}"
        if read and not found:
            raise wdsp.DataError(
                f"none of the first {read} samples of {self.train.urls[0]} has a report in the {source} "
                f"(study_ids such as {', '.join(missing)}): the targets were built from another prepare "
                "output, or spell study ids differently (prepare writes digits without the 's' prefix)")
        if read and found < read and dist.is_main:
            log.warning("%d of the first %d samples of %s have no report in the %s and will be skipped "
                        "(e.g. study_id %s)", read - found, read, self.train.urls[0], source, missing[0])

    def _setup_model(self) -> None:
        cfg = self.cfg
        from pipeline.models import MFlagVision, count_parameters

        text = None
        if cfg.text_mode == "online":
            text = OnlineTextEncoder.from_pretrained(cfg.text_model, cfg.text_max_length, cfg.text_pooling,
                                                     cfg.unfreeze_last)
            self.text_dim = text.dim
            self.text_params = sum(p.numel() for p in text.encoder.parameters())
        if cfg.text_head == "none" and cfg.proj_dim is not None and cfg.proj_dim != self.text_dim:
            raise ConfigError(f"proj_dim: the text embeddings have dimension {self.text_dim}; with --text-head "
                              f"none images are projected into that space, so --proj-dim must be "
                              f"{self.text_dim} (got {cfg.proj_dim})")
        torch.manual_seed(cfg.seed)
        vision = MFlagVision(self.text_dim, cfg.proj_dim, cfg.text_head, cfg.init, cfg.hidden_dim)
        if self.dist.enabled and cfg.sync_bn:
            # BatchNorm over the global batch, as on one GPU: otherwise its statistics (and zv, za, zt)
            # come from batch_size / world_size samples and the run depends on the number of GPUs.
            if self.device.type == "cuda":
                vision = nn.SyncBatchNorm.convert_sync_batchnorm(vision)
            elif self.dist.is_main:
                log.warning("sync_bn: SyncBatchNorm needs CUDA; on %s each of the %d processes normalises "
                            "over its own %d samples", self.device.type, self.dist.world_size,
                            self.local_batch)
        self.module = TrainModule(vision, text).to(self.device)
        if cfg.channels_last:
            self.module.vision.trunk.to(memory_format=torch.channels_last)
        self.trainable = count_parameters(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad]
        # The original's AdamW: betas (0.9, 0.999), eps 1e-8 (torch's defaults), main.py lines 73-77.
        self.optimizer = torch.optim.AdamW(param_groups(params, cfg.weight_decay, cfg.decay_norm_bias), lr=cfg.lr)
        warm = min(cfg.warmup_steps, self.total_steps)
        # An absolute floor (the original's eta_min) as a multiplier of lr: LambdaLR then gives
        # eta_min + (lr - eta_min) x cosine, the formula of torch's CosineAnnealingWarmRestarts.
        floor = cfg.min_lr / cfg.lr if cfg.min_lr is not None else cfg.min_lr_ratio
        self.restart_cycle = None
        if cfg.schedule == "cosine":
            fn = WarmupCosine(warm, self.total_steps, floor)
        elif cfg.schedule == "restarts":
            self.restart_cycle = self._restart_cycle()
            fn = WarmupCosineRestarts(warm, self.restart_cycle, 1, floor)
        else:
            fn = WarmupCosine(warm, self.total_steps, 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.settings = StepSettings(orth_weight=cfg.orth_weight, align_weight=cfg.align_weight,
                                     orth_lambda=cfg.orth_lambda, orth_standardize=cfg.orth_standardize,
                                     orth_on=cfg.orth_on, orth_global=cfg.orth_scope == "global",
                                     world_size=self.dist.world_size, grad_clip=cfg.grad_clip,
                                     autocast_dtype=autocast, channels_last=cfg.channels_last)
        self.grad_params = trunk_probe_params(self.module.vision)

    def _restart_cycle(self) -> int:
        """Steps per cosine cycle: ``restart_every``, the original's T_0, or a fraction of the run."""
        cfg = self.cfg
        if cfg.restart_every:
            return cfg.restart_every
        if cfg.restart_period == "original":
            # The original's max_epochs is epochs - 1: its loop range(start, max_epochs + 1) trains one
            # epoch more than the formula counts (utils_trainer.py lines 102 and 112).
            t0 = original_restart_period(cfg.epochs - 1, self.num_samples, self.local_batch)
            if t0 < 1:
                raise ConfigError(
                    f"restart_period: the original's T_0 = int({cfg.epochs - 1} x {self.num_samples} // 4 // "
                    f"{self.local_batch} x 0.4) is {t0} steps (max_epochs = epochs - 1, samples per epoch, batch "
                    "per process); torch's CosineAnnealingWarmRestarts needs T_0 >= 1: use more epochs or "
                    "data, restart_every, or restart_period fraction")
            return t0
        return max(1, round(cfg.restart_fraction * self.total_steps))

    def _report_parameters(self) -> dict:
        out = {"trainable_params": self.trainable, "text_encoder_params": self.text_params,
               "text_model": self.text_model_id, "fewer_trainable_vs_finetuned_text": None}
        if self.text_params and self.cfg.text_mode == "cache":
            both = self.trainable + int(self.text_params)
            fewer = 1.0 - self.trainable / both
            out["fewer_trainable_vs_finetuned_text"] = fewer
            if self.dist.is_main:
                log.info("trainable parameters: %s (ResNet50 + projectors); frozen text encoder %s: %s, "
                         "not loaded in this process", _format_count(self.trainable), self.text_model_id,
                         _format_count(int(self.text_params)))
                log.info("  -> %.0f%% fewer trainable parameters than training image and text encoders "
                         "together (%s)", 100 * fewer, _format_count(both))
        elif self.dist.is_main:
            log.info("trainable parameters: %s%s", _format_count(self.trainable),
                     f"; text encoder {self.text_model_id}: {_format_count(int(self.text_params))}"
                     if self.text_params else "; the cache does not record text_encoder_params")
        return out

    # ------------------------------------------------------------------ resume
    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        latest = self.ckpt_dir / "latest.pt"
        if cfg.resume == "auto":
            return latest if latest.is_file() else None
        if cfg.resume == "never":
            if latest.is_file():
                raise ConfigError(f"resume: {self.out} already holds checkpoints; use --resume auto, "
                                  f"another --out, or delete {self.out} to start over")
            return None
        p = Path(cfg.resume)
        if not p.is_file():
            raise ConfigError(f"resume: checkpoint {p} not found")
        return p

    def _restore(self, path: Path) -> dict:
        ck = load_checkpoint(path, TrainingError)
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise TrainingError(f"{path}: not a train-vision checkpoint")
        if ck.get("fingerprint") != self.fingerprint:
            old = ck.get("semantic_config", {})
            new = semantic_config(self.cfg)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"resume: {path} was written by a different configuration (differs in "
                              f"{', '.join(diff) or 'fingerprint'}); use the same options, another --out, or delete "
                              f"{self.out} to start over")
        if ck.get("world_size") != self.dist.world_size:
            raise ConfigError(f"resume: {path} was written with {ck.get('world_size')} ranks, this run has "
                              f"{self.dist.world_size}; exact resume needs the same world size")
        if ck.get("text_dim") != self.text_dim:
            raise ConfigError(f"resume: {path} has text dimension {ck.get('text_dim')}, the text embeddings "
                              f"now have {self.text_dim}")
        missing, unexpected = self.module.load_state_dict(ck["model"], strict=False)
        bad = [k for k in missing if not k.startswith("text.")] + list(unexpected)
        if bad:
            raise TrainingError(f"{path}: model weights do not match ({bad[:5]})")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][self.dist.rank])
        if self.batch_aug is not None and ck.get("augmenter"):
            self.batch_aug.load_state_dict(ck["augmenter"][self.dist.rank])
        d = ck["data"][self.dist.rank]
        self.pos = _DataPos(epoch=d["epoch"], step_in_epoch=d["step_in_epoch"],
                            workers={int(k): int(v) for k, v in d["workers"].items()}, raw=d["raw"],
                            missing=d["missing"], corrupt=d["corrupt"], lost=int(d.get("lost", 0)),
                            lost_shards=dict(d.get("lost_shards", {})), shards_seen=set(d["shards_seen"]))
        log.info("resumed from %s at step %d (epoch %d, step %d of %d)", path, ck["step"], self.pos.epoch,
                 self.pos.step_in_epoch, self.steps_per_epoch)
        return ck

    def _checkpoint(self, step: int, final: bool = False) -> Path | None:
        pos = self.pos
        data = {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "workers": dict(pos.workers),
                "raw": pos.raw, "missing": pos.missing, "corrupt": pos.corrupt, "lost": pos.lost,
                "lost_shards": dict(pos.lost_shards), "shards_seen": sorted(pos.shards_seen)}
        all_data = all_gather_object(data, self.dist)
        all_rng = all_gather_object(rng_state(), self.dist)
        all_aug = all_gather_object(self.batch_aug.state_dict() if self.batch_aug is not None else None,
                                     self.dist)
        path = self.ckpt_dir / f"step-{step:08d}.pt"
        if self.dist.is_main:
            payload = {
                "format": CKPT_FORMAT, "step": step, "epoch": pos.epoch, "final": final,
                "model": self.module.checkpoint_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": all_rng, "data": all_data, "augmenter": all_aug, "world_size": self.dist.world_size,
                "config": config_to_dict(self.cfg), "semantic_config": semantic_config(self.cfg),
                "fingerprint": self.fingerprint, "text_dim": self.text_dim,
            }
            save_checkpoint(path, payload)
            publish_latest(path, self.ckpt_dir / "latest.pt")
            for p in sorted(self.ckpt_dir.glob("step-*.pt"))[:-max(1, self.cfg.keep_checkpoints)]:
                p.unlink(missing_ok=True)
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ probes
    def _load_probe(self) -> dict | None:
        """The held-out probe set: the first ``max(probe_size, final_probe_size)`` usable images of the
        validate shards, then the test shards (pre-training never reads either). The cheap probe during
        training uses its first ``probe_size`` images, the collapse diagnostic at the end the first
        ``final_probe_size``; a size below 2 turns that probe off."""
        cfg = self.cfg
        want = max(cfg.probe_size, cfg.final_probe_size)
        self.probe_held_out = None
        if not self.dist.is_main or want < 2:
            return None
        if cfg.probe_shards:
            urls = list(wdsp.resolve_shards(cfg.probe_shards, "validate").urls)
        else:
            urls = wdsp.heldout_shards(self.train, "validate") + wdsp.heldout_shards(self.train, "test")
        if not urls:
            log.warning("no held-out (validate-*/test-*) shards beside the training shards and no "
                        "--probe-shards: probes disabled")
            return None
        self.probe_held_out = not set(urls) & set(self.train.urls)
        if not self.probe_held_out:
            # --pairs all trains on validate/test too: the probes then measure training images, which
            # still shows collapse (effective rank, spectrum) but flatters retrieval.
            log.warning("the probe images (%s ...) are also training images (--pairs %s); pass --probe-shards "
                        "with other images to probe held-out data", Path(urls[0]).name, cfg.pairs)
        batch = wdsp.read_fixed_batch(urls, self.targets, want, cfg.image_size)
        if batch is None or len(batch["key"]) < 2:
            log.warning("the held-out shards %s have fewer than 2 usable samples: probes disabled", urls[:2])
            return None
        n = len(batch["key"])
        if n < want:
            log.warning("the held-out shards hold only %d usable images; the probes use %d instead of %d "
                        "(ranks are bounded by N - 1)", n, n, want)
        studies = sorted(set(batch["study_id"]))
        index = {s: i for i, s in enumerate(studies)}
        log.info("probe set: %d held-out images of %d studies from %d shard(s); %d in the probe every %d "
                 "steps", n, len(studies), len(urls), min(n, cfg.probe_size), cfg.probe_every)
        # one report per held-out study; each image is matched to its own study's report
        return {"image": batch["image"], "text": self.targets.fetch(studies),
                "targets": [index[s] for s in batch["study_id"]], "study_id": list(batch["study_id"]),
                "studies": studies}

    @staticmethod
    def _probe_subset(probe: dict, n: int) -> dict:
        """The first ``n`` images of the probe set with the reports of their studies."""
        if n >= len(probe["targets"]):
            return probe
        studies = sorted(set(probe["study_id"][:n]))
        index = {s: i for i, s in enumerate(studies)}
        rows = [probe["studies"].index(s) for s in studies]
        text = probe["text"]
        text = [text[r] for r in rows] if isinstance(text, list) else text[rows]
        return {"image": probe["image"][:n], "text": text, "targets": [index[s] for s in probe["study_id"][:n]],
                "study_id": probe["study_id"][:n], "studies": studies}

    @torch.no_grad()
    def _probe(self, probe: dict, chunk: int = 128) -> tuple[dict, dict]:
        """(metrics, spectra of zv and za) on ``probe``, in eval mode, in chunks of ``chunk`` images
        (a final probe of several hundred images at full size would not fit at once on a small GPU)."""
        module = self.module
        was = module.training
        module.eval()
        try:
            text = probe["text"]
            if module.text is not None:
                zt = module.vision.project_text(module.text(module.text.tokenize(text, self.device)))
            else:
                zt = module.vision.project_text(text.to(self.device))
            zvs, zas = [], []
            for i in range(0, len(probe["targets"]), chunk):
                images = prepare_images(probe["image"][i:i + chunk], self.probe_aug, self.device,
                                        self.cfg.channels_last)
                zv, za = module.vision(images)
                zvs.append(zv.float())
                zas.append(za.float())
            spectra: dict = {}
            report = probes.probe_report(torch.cat(zvs), torch.cat(zas), zt.float(), probe["targets"], spectra)
            return report, spectra
        finally:
            module.train(was)

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        cfg, dist = self.cfg, self.dist
        self._setup_data()
        self._setup_model()
        self.fingerprint = fingerprint(semantic_config(cfg))
        summary_path = self.out / "summary.json"
        if summary_path.is_file() and cfg.resume == "auto":
            done = read_json(summary_path)
            if done.get("fingerprint") == self.fingerprint and done.get("steps") == self.total_steps:
                log.info("%s already holds a finished run of this configuration; nothing to do", self.out)
                return done
        params_report = self._report_parameters()
        sample_aug, self.batch_aug, self.probe_aug = _make_augmenters(cfg, dist.device, dist.rank)
        self.pos = _DataPos()
        step = 0
        resume = self._resume_path()
        if resume is None and self.ckpt_dir.is_dir() and any(self.ckpt_dir.glob("*.pt")):
            raise ConfigError(f"resume: {self.ckpt_dir} holds checkpoints but --resume is {cfg.resume!r}")
        if resume is not None:
            step = int(self._restore(resume)["step"])
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out, fingerprint=self.fingerprint, steps_per_epoch=self.steps_per_epoch,
                        total_steps=self.total_steps, world_size=dist.world_size, precision=self.precision,
                        batch_per_process=self.local_batch, global_batch=self.global_batch,
                        restart_cycle=self.restart_cycle)
            self._trim_metrics(step)
            self.tracker = open_tracker(cfg.report_to, self.out, config_to_dict(cfg), key=self.fingerprint,
                                        resume_step=step + 1 if resume is not None else None)
        try:
            return self._fit(step, resume, params_report, sample_aug)
        finally:
            self.tracker.close()

    def _fit(self, step: int, resume: Path | None, params_report: dict, sample_aug) -> dict:
        cfg, dist = self.cfg, self.dist
        train_module: nn.Module = self.module
        if dist.enabled:
            train_module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            train_module = torch.compile(train_module)
        probe = self._load_probe()
        log.info("training %d steps (%d per epoch of %d samples), global batch %d (%d per rank x %d), "
                 "precision %s, device %s%s", self.total_steps, self.steps_per_epoch, self.num_samples,
                 self.global_batch, self.local_batch, dist.world_size, self.precision, dist.device,
                 f", lr cycle {self.restart_cycle} steps" if self.restart_cycle else "")
        last_good = str(resume) if resume else None
        watch = NonFiniteWatch(self.device, step)
        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        last_probe: dict = {}
        self.module.train()
        while step < self.total_steps:
            if self.pos.step_in_epoch >= self.steps_per_epoch:
                self._check_bad(final=True)
                self.pos = dataclasses.replace(self.pos, epoch=self.pos.epoch + 1, step_in_epoch=0, workers={})
            nw = max(1, cfg.num_workers)
            state = wdsp.StreamState(seed=cfg.seed, epoch=self.pos.epoch, rank=dist.rank,
                                     world_size=dist.world_size, rotation=self.pos.step_in_epoch % nw,
                                     skip=dict(self.pos.workers))
            pipe = wdsp.train_pipeline(list(self.train.urls), state, self.targets, self.local_batch,
                                       cfg.image_size, cfg.on_missing, cfg.shuffle_buffer, sample_aug,
                                       sizes=self.train.sizes)
            loader = wdsp.make_loader(pipe, cfg.num_workers, pin_memory=self.device.type == "cuda")
            it = iter(loader)
            try:
                while self.pos.step_in_epoch < self.steps_per_epoch and step < self.total_steps:
                    t0 = time.perf_counter()
                    batch = next(it)
                    window["wait"] += time.perf_counter() - t0
                    error = self._account(batch)
                    if any_rank(error is not None, dist):
                        raise wdsp.DataError(error or "another rank stopped on a data error")
                    images = prepare_images(batch["image"], self.batch_aug, self.device, cfg.channels_last)
                    target = batch["target"]
                    if self.module.text is not None:
                        target = self.module.text.tokenize(target, self.device)
                    else:
                        target = target.to(self.device, non_blocking=True)
                    log_now = (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps
                    out = train_step(train_module, self.optimizer, self.scaler, images, target, self.settings,
                                     self.grad_params if log_now else None)
                    self.scheduler.step()
                    watch.update(out)  # no host sync here: read at log and checkpoint steps below
                    step += 1
                    self.pos.step_in_epoch += 1
                    window["steps"] += 1
                    if (log_now or step % cfg.ckpt_every == 0
                            or (probe is not None and step % cfg.probe_every == 0)):
                        self._check_finite(watch, last_good)
                    if log_now:
                        self._log(step, out, window)
                        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
                    if (probe is not None and cfg.probe_size >= 2 and step % cfg.probe_every == 0
                            and step != self.total_steps):
                        last_probe, _ = self._probe(self._probe_subset(probe, cfg.probe_size))
                        self._write_metrics({"step": step, "epoch": self.pos.epoch,
                                             **{f"val/{k}": v for k, v in last_probe.items()}})
                    final = step == self.total_steps
                    if step % cfg.ckpt_every == 0 or final:
                        self._check_bad(final=self.pos.step_in_epoch >= self.steps_per_epoch or final)
                        if not (final and cfg.keep_checkpoints == 0):  # nothing left to resume
                            last_good = str(self._checkpoint(step, final=final))
            finally:
                del it
        self._check_bad(final=True)
        return self._finish(step, probe, last_probe, params_report)

    def _check_finite(self, watch: NonFiniteWatch, last_good: str | None) -> None:
        """Stop when any rank has seen a non-finite loss since the start (one host sync). Called at
        log and checkpoint steps, so a checkpoint never holds weights trained through a NaN."""
        if not any_rank_flag(watch.flag(), self.dist):
            return
        bad = watch.first_bad()
        where = (f"at step {bad[0]} (align {bad[1]:.4g}, orth {bad[2]:.4g}) on rank {self.dist.rank}" if bad
                 else "on another rank")
        raise TrainingError(
            f"non-finite loss {where}; stopping. The last good checkpoint is "
            f"{last_good or 'none (no checkpoint written yet)'}; lower --lr, set --grad-clip or use "
            f"--precision fp32")

    def _account(self, batch: dict) -> str | None:
        """Fold a batch's position and counters into ``self.pos``; returns a fatal data error or None."""
        if "error" in batch:
            return batch["error"]
        meta, pos = batch["meta"], self.pos
        pos.raw += meta["raw"] - pos.workers.get(meta["worker"], 0)
        pos.workers[meta["worker"]] = meta["raw"]
        pos.missing += meta["missing"]
        pos.corrupt += meta["corrupt"]
        pos.lost += meta.get("lost", 0)
        for name, n in meta.get("lost_shards", {}).items():
            pos.lost_shards[name] = pos.lost_shards.get(name, 0) + n
        pos.shards_seen.update(Path(u).name for u in batch["urls"])
        return None

    def _check_bad(self, final: bool) -> None:
        """Fail once bad samples exceed ``max_bad_fraction`` of those the shards should have yielded
        (judged over at least 1000 samples, or at the end of an epoch or run). Bad: corrupt samples, and
        every sample a damaged shard lost (sizes.json lists more than it yielded)."""
        pos = self.pos
        expected = pos.raw + pos.lost + (0 if self.train.sizes else pos.corrupt)
        bad = pos.corrupt + pos.lost
        if not (expected and (final or expected >= 1000) and bad / expected > self.cfg.max_bad_fraction):
            return
        parts = []
        if pos.lost:
            worst = sorted(pos.lost_shards.items(), key=lambda kv: (-kv[1], kv[0]))
            parts.append(f"{pos.lost} samples lost in damaged shard(s) "
                         f"{', '.join(f'{name} ({n} missing)' for name, n in worst[:3])}"
                         f"{' and others' if len(worst) > 3 else ''}: they yield fewer samples than sizes.json lists "
                         f"(truncated or damaged); rerun prepare on their output folder, it rebuilds them")
        if pos.corrupt:
            parts.append(f"{pos.corrupt} corrupt samples or unreadable shard parts (the warnings above name the "
                         f"shards and keys; rerun prepare or remove them)")
        raise wdsp.DataError(f"{'; '.join(parts)}: {bad} bad of {expected} samples on rank {self.dist.rank} "
                             f"({100 * bad / expected:.1f}% > {100 * self.cfg.max_bad_fraction:g}%)")

    def _log(self, step: int, out: dict, window: dict) -> None:
        dt = max(time.perf_counter() - window["t0"], 1e-9)
        zero = torch.zeros((), device=out["loss"].device)
        vals = torch.stack([out["loss"], out["align"], out["orth"], out["grad_norm"].float(),
                            out.get("grad_align_trunk", zero), out.get("grad_orth_trunk", zero)]).float()
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(vals)
            vals /= self.dist.world_size
        loss, align, orth, gnorm, g_align, g_orth = (float(v) for v in vals.cpu())
        # grad_*_trunk: norms of the unweighted terms' gradients on the trunk's last block (mean over
        # ranks of each rank's own batch); the weighted ratio orth_weight x g_orth / (align_weight x
        # g_align) says which term drives the shared trunk.
        rec = {"step": step, "epoch": self.pos.epoch, "train/loss": loss, "train/align": align,
               "train/orth": orth, "train/lr": self.optimizer.param_groups[0]["lr"],
               "train/grad_norm": gnorm, "train/grad_align_trunk": g_align, "train/grad_orth_trunk": g_orth,
               "train/images_per_s": window["steps"] * self.global_batch / dt,
               "train/data_wait": window["wait"] / dt, "train/missing": self.pos.missing,
               "train/corrupt": self.pos.corrupt, "train/lost": self.pos.lost}
        if self.dist.is_main:
            log.info("step %d/%d loss %.4f (align %.4f orth %.4f) lr %.3g %.1f img/s data-wait %.0f%%",
                     step, self.total_steps, loss, align, orth, rec["train/lr"], rec["train/images_per_s"],
                     100 * rec["train/data_wait"])
        self._write_metrics(rec)

    def _write_metrics(self, rec: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self.tracker.log(rec, rec["step"])

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop metric lines past the checkpoint (those steps run again)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for ln in path.read_text(encoding="utf-8").splitlines():
            try:
                if ln.strip() and json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _finish(self, step: int, probe: dict | None, last_probe: dict, params_report: dict) -> dict:
        dist = self.dist
        checksums = all_gather_object(param_checksum(self.module), dist)
        pos = self.pos
        counts = all_gather_object({"raw": pos.raw, "missing": pos.missing, "corrupt": pos.corrupt,
                                     "lost": pos.lost, "shards": sorted(pos.shards_seen)}, dist)
        spectrum = None
        if probe is not None and self.cfg.final_probe_size >= 2:
            last_probe, spectrum = self._probe(self._probe_subset(probe, self.cfg.final_probe_size))
            self._write_metrics({"step": step, "epoch": pos.epoch, **{f"val/{k}": v for k, v in last_probe.items()}})
        summary = {
            "fingerprint": self.fingerprint, "steps": step, "epochs": pos.epoch + 1,
            "steps_per_epoch": self.steps_per_epoch, "world_size": dist.world_size,
            "global_batch": self.global_batch, "batch_per_process": self.local_batch,
            "restart_cycle": self.restart_cycle, "probe_held_out": self.probe_held_out,
            "precision": self.precision,
            "final_probe": last_probe, **params_report,
            "samples_read": sum(c["raw"] for c in counts), "missing": sum(c["missing"] for c in counts),
            "corrupt": sum(c["corrupt"] for c in counts), "lost": sum(c["lost"] for c in counts),
            "shards_per_rank": [c["shards"] for c in counts],
            "param_checksum_per_rank": checksums,
        }
        if dist.is_main:
            from pipeline.models import encoder_state_dict

            if len(set(checksums)) > 1:
                log.error("ranks ended with different weights: %s", checksums)
            vision = self.module.vision
            encoder = encoder_state_dict(vision)
            with atomic_path(self.out / "encoder.pt") as tmp:
                torch.save(encoder, tmp)
            # The same weights as safetensors: loadable anywhere without unpickling anything.
            from safetensors.torch import save_file

            with atomic_path(self.out / "encoder.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp),
                          metadata={"format": "pt", "layout": "torchvision resnet50 state_dict without fc.*"})
            proj = {"projector": {k: v.cpu() for k, v in vision.projector.state_dict().items()},
                    "text_head": {k: v.cpu() for k, v in vision.text_head.state_dict().items()},
                    "text_head_kind": self.cfg.text_head, "text_dim": self.text_dim,
                    "proj_dim": vision.proj_dim, "hidden_dim": self.cfg.hidden_dim}
            with atomic_path(self.out / "projector.pt") as tmp:
                torch.save(proj, tmp)
            if spectrum is not None:
                # centred (the primary diagnostic) and uncentred singular values of zv and za, each with
                # N and D and their effective ranks (pipeline.probes.spectrum)
                write_json(self.out / "spectrum.json", {"step": step, "n_images": spectrum["zv"]["n"],
                                                         **spectrum})
            write_json(self.out / "summary.json", summary)
            if self.cfg.keep_checkpoints == 0 and self.ckpt_dir.is_dir():
                # the finished run is summary.json + encoder.pt: the multi-100 MB resume points go
                shutil.rmtree(self.ckpt_dir)
            log.info("done: %d steps; encoder %s", step, self.out / "encoder.pt")
        barrier(dist)
        return summary
