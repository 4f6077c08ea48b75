"""train-vision: M-FLAG pre-training of a ResNet50 against frozen report embeddings.

The image stream (``pipeline.pretrain.wds``) is joined by study_id to embeddings read from the text cache, so
no text model lives in this process (``text_mode="online"`` runs one per step instead: the original
design, kept as the baseline and the freezing ablation). Loss = align_weight x alignment(za, zt) +
orth_weight x orthogonality(zv), on the raw 2048-d ResNet features as in the original code
(``orth_on="za"``: on the projected embedding); the terms and their weight options are those of
``pipeline.pretrain.losses.LOSS_TERMS``. torchrun DDP, AMP, atomic checkpoints and exact resume
(a run killed after step k and resumed ends bit-identical on CPU); docs/DESIGN.md says how, and
docs/RECIPES.md how the options express the original run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.common import ConfigError, config_to_dict, fingerprint, save_config
from pipeline.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed
from pipeline.locks import output_lock
from pipeline.options import check_fields, option, result_config
from pipeline.preempt import Stopped, StopSignals
from pipeline.pretrain import data as pretrain_data
from pipeline.pretrain import state as train_state
from pipeline.pretrain import step as pretrain
from pipeline.pretrain.losses import LOSS_TERMS, LossSettings, active_terms
from pipeline.pretrain.step import BATCH_SEMANTICS, ModelSettings, OptimSettings
from pipeline.tracking import REPORT_TO, Tracker, append_metrics, open_tracker, trim_metrics
from pipeline.vision.models import count_parameters

log = logging.getLogger(__name__)

CKPT_FORMAT = 1
# --pairs: the prepare splits trained on. "all" is what the original read: MGCA's master.csv holds every
# split (its mimic_cxr.py keeps the split column and writes all rows), and M-FLAG's dataset reads every row.
PAIRS = {"train": ("train",), "all": ("train", "validate", "test")}
@dataclasses.dataclass(frozen=True)
class TrainVisionConfig:
    """Resolved options of one train-vision run (each field is the option of the same name,
    pipeline.options; ``cli.py train-vision --help`` and docs/OPTIONS.md list them)."""

    shards: str = option(help="prepare output folder, a folder of .tar shards, or webdataset URLs (brace ranges, "
                              "'::'-separated lists, pipe: commands).")
    out: str = option(affects_result=False,
                      help="Output folder: encoder.pt, projector.pt, metrics.jsonl, checkpoints/.")
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
                                      affects_result=False, help="Held-out shards for the probes.")
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
                           "crop (pipeline/pretrain/augment.py).")
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
    align_weight: float = option(1.0, min=0, added_later=True,
                                 help="Weight of the alignment loss (0: orthogonality only, an ablation).")
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
    device: str = option("auto", device=True, help="auto, cpu, cuda or cuda:N (one process; under torchrun each "
                                                   "rank uses its LOCAL_RANK GPU, or its only visible GPU).")
    channels_last: bool = option(True, help="Run the ResNet trunk in the channels-last memory format (faster "
                                            "convolutions on CUDA).")
    sync_bn: bool = option(True, help="With several CUDA processes, BatchNorm statistics over the global batch "
                                      "(SyncBatchNorm).")
    compile: bool = option(False, negatable=False, affects_result=False, help="torch.compile the model.")
    seed: int = option(0, min=0, help="Initialisation, data order and augmentation follow from it.")
    log_every: int = option(10, min=1, affects_result=False, help="Steps between metrics.jsonl lines.")
    ckpt_every: int = option(500, min=1, affects_result=False, help="Steps between checkpoints.")
    ckpt_every_minutes: float = option(15.0, min=0, affects_result=False,
                                       help="Also checkpoint when this many minutes have passed since the last "
                                            "checkpoint (0: off): bounds the work a kill -9 or a node failure "
                                            "loses. SIGTERM/SIGINT always checkpoint before stopping.")
    probe_every: int = option(500, min=1, affects_result=False,
                              help="Steps between collapse probes on held-out images.")
    probe_size: int = option(64, min=0, affects_result=False,
                             help="Held-out images in the cheap probe every --probe-every steps.")
    final_probe_size: int = option(512, min=0, affects_result=False,
                                   help="Held-out images (validate, then test shards) in the collapse diagnostic at "
                                        "the end.")
    keep_checkpoints: int = option(2, min=0, affects_result=False,
                                   help="Step checkpoints kept on disk (0: none once the run has finished).")
    resume: str = option("auto", affects_result=False,
                         help="auto (OUT/checkpoints/latest.pt when present), never, or a checkpoint path.")
    threads: int | None = option(None, min=1, affects_result=False, help="torch CPU threads per process.")
    report_to: str = option("none", choices=REPORT_TO, affects_result=False,
                            help="Also send the metrics.jsonl scalars to TensorBoard (OUT/tensorboard) or W&B "
                                 "(OUT/wandb; WANDB_MODE=offline works without network). Needs the 'tracking' extra.")

    def __post_init__(self):
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field}: {msg}")

        if isinstance(self.unfreeze_last, str) and self.unfreeze_last.strip().isdigit():
            object.__setattr__(self, "unfreeze_last", int(self.unfreeze_last))
        check_fields(self)
        if self.text_mode == "cache":
            need(bool(self.text_cache), "text_cache", "required with text_mode 'cache'")
        else:
            need(bool(self.text_model), "text_model", "required with text_mode 'online'")
            need(bool(self.reports), "reports", "required with text_mode 'online' (report texts by study_id)")
        need(self.unfreeze_last == "all" or type(self.unfreeze_last) is int, "unfreeze_last",
             f"expected a number of layers or 'all', got {self.unfreeze_last!r}")
        need(self.crop_size <= self.image_size, "crop_size",
             f"must be <= image_size ({self.image_size}), got {self.crop_size}")
        need(self.unfreeze_last == "all" or self.unfreeze_last >= 0, "unfreeze_last",
             f"must be >= 0 or 'all', got {self.unfreeze_last}")
        weights = {t.weight_option: self._weight(t.weight_option) for t in LOSS_TERMS.values()}
        need(any(w > 0 for w in weights.values()), next(iter(weights)),
             f"{' and '.join(weights)} are {'both' if len(weights) == 2 else 'all'} 0: nothing to train")
        need(self.min_lr is None or self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr:g}]")
        need(self.min_lr is None or self.min_lr_ratio == 0, "min_lr",
             "give either min_lr (an absolute floor) or min_lr_ratio (a fraction of lr), not both")
        need(self.restart_every is None or self.restart_period == "fraction", "restart_every",
             "give either restart_every (steps) or restart_period 'original' (the original's T_0 formula), not both")
        need(self.unfreeze_last == 0 or self.text_mode == "online", "unfreeze_last",
             "only with text_mode 'online' (the cached mode has no text model to train)")

    # ------------------------------------------------------------------ grouped settings
    # The config stays flat (its fields are the CLI options and the fingerprint); the helpers take
    # these groups whole, each field named as the option it comes from.
    def _weight(self, option_name: str) -> float:
        try:
            return getattr(self, option_name)
        except AttributeError:
            raise ConfigError(f"{option_name}: a loss term in pipeline.pretrain.losses.LOSS_TERMS names this weight "
                              f"option, but TrainVisionConfig has no such field") from None

    def _group(self, cls, **extra):
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name not in extra}, **extra)

    def loss_settings(self, world_size: int = 1) -> LossSettings:
        """The loss terms' weights ({term name: its weight option's value}) and options."""
        return self._group(LossSettings, weights={n: self._weight(t.weight_option) for n, t in LOSS_TERMS.items()},
                           orth_global=self.orth_scope == "global", world_size=world_size)

    @property
    def optim_settings(self) -> OptimSettings:
        return self._group(OptimSettings)

    @property
    def model_settings(self) -> ModelSettings:
        return self._group(ModelSettings)

    @property
    def text_settings(self) -> pretrain_data.TextSettings:
        return self._group(pretrain_data.TextSettings)

    @property
    def data_settings(self) -> pretrain_data.DataSettings:
        return self._group(pretrain_data.DataSettings, splits=PAIRS[self.pairs])


# --------------------------------------------------------------------------- the run
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
        self.precision = distributed.resolve_precision(cfg.precision, dist.device)
        self.tracker: Tracker = Tracker()
        if self.device.type == "cuda":
            # Every step has the same input shape, so cuDNN's timed algorithm choice pays off after the
            # first step; GPU runs are not bit-reproducible anyway (DESIGN.md, determinism).
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ set-up
    def _setup_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        d = pretrain_data.open_train_data(cfg.data_settings, dist)
        self.train, self.num_samples, self.steps_per_epoch, self.total_steps = (d.train, d.num_samples,
                                                                                d.steps_per_epoch, d.total_steps)
        self.local_batch, self.global_batch = d.local_batch, d.global_batch
        self.text = pretrain_data.open_targets(cfg.text_settings, list(self.train.urls), is_main=dist.is_main)

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.module = pretrain.build_train_module(self.text.text_dim, self.text.encoder, cfg.model_settings,
                                                  dist=self.dist, device=self.device, local_batch=self.local_batch)
        self.trainable = count_parameters(self.module)
        opt = pretrain.build_optimization(self.module, cfg.optim_settings, num_samples=self.num_samples,
                                          batch_per_process=self.local_batch, total_steps=self.total_steps,
                                          precision=self.precision, device=self.device)
        self.optimizer, self.scheduler, self.scaler, self.restart_cycle, autocast = opt
        self.settings = pretrain.StepSettings(loss=cfg.loss_settings(self.dist.world_size), grad_clip=cfg.grad_clip,
                                              autocast_dtype=autocast, channels_last=cfg.channels_last)
        self.grad_params = pretrain.trunk_probe_params(self.module.vision)

    # ------------------------------------------------------------------ resume
    def _restore(self, path: Path) -> int:
        step, data = self.state.resume(path, self.dist.rank, fmt=CKPT_FORMAT, fingerprint=self.fingerprint,
                                       semantic=result_config(self.cfg), world_size=self.dist.world_size,
                                       text_dim=self.text.text_dim, out=self.out,
                                       text_identity=self.text.identity)
        self.pos = pretrain_data.DataPos.from_state(data)
        log.info("resumed from %s at step %d (epoch %d, step %d of %d)", path, step, self.pos.epoch,
                 self.pos.step_in_epoch, self.steps_per_epoch)
        return step

    def _checkpoint(self, step: int, final: bool = False) -> Path:
        meta = {"format": CKPT_FORMAT, "step": step, "epoch": self.pos.epoch, "final": final,
                "config": config_to_dict(self.cfg), "semantic_config": result_config(self.cfg),
                "fingerprint": self.fingerprint, "text_dim": self.text.text_dim,
                "text_cache_identity": self.text.identity}
        return self.state.save(self.ckpt_dir / f"step-{step:08d}.pt", self.dist, data_state=self.pos.state(),
                               meta=meta, keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        cfg, dist = self.cfg, self.dist
        self._setup_data()
        self._setup_model()
        self.fingerprint = fingerprint(result_config(cfg))
        done = None if cfg.resume != "auto" else train_state.finished_summary(self.out, self.fingerprint,
                                                                                self.total_steps, self.text.identity)
        if done is not None:
            log.info("%s already holds a finished run of this configuration; nothing to do", self.out)
            return done
        params_report = pretrain.parameter_report(self.trainable, self.text.text_params, self.text.text_model_id,
                                                  cfg.text_mode == "cache", dist.is_main)
        sample_aug, self.batch_aug, self.probe_aug = pretrain.make_augmenters(
            cfg.aug, cfg.aug_device, cfg.crop_size, cfg.seed, dist.device, dist.rank)
        self.state = train_state.Resumable(self.module, self.optimizer, self.scheduler, self.scaler, self.batch_aug)
        self.pos = pretrain_data.DataPos()
        resume = train_state.resume_path(cfg.resume, self.ckpt_dir, self.out)
        step = self._restore(resume) if resume is not None else 0
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out, stage="train-vision", fingerprint=self.fingerprint,
                        steps_per_epoch=self.steps_per_epoch,
                        total_steps=self.total_steps, world_size=dist.world_size, precision=self.precision,
                        batch_per_process=self.local_batch, global_batch=self.global_batch,
                        restart_cycle=self.restart_cycle)
            trim_metrics(self.out / "metrics.jsonl", step)
            self.tracker = open_tracker(cfg.report_to, self.out, config_to_dict(cfg), key=self.fingerprint,
                                        resume_step=step + 1 if resume is not None else None)
        try:
            with StopSignals() as self.stop:
                return self._fit(step, resume, params_report, sample_aug)
        finally:
            self.tracker.close()

    def _fit(self, step: int, resume: Path | None, params_report: dict, sample_aug) -> dict:
        cfg, dist = self.cfg, self.dist
        train_module = pretrain.wrap_for_training(self.module, dist, self.device, cfg.compile)
        # the first probe_size images every probe_every steps, the first final_probe_size at the end
        probe, self.probe_held_out = pretrain_data.load_probe_set(
            self.train, self.text.targets, probe_shards=cfg.probe_shards, image_size=cfg.image_size, pairs=cfg.pairs,
            want=max(cfg.probe_size, cfg.final_probe_size), probe_size=cfg.probe_size, probe_every=cfg.probe_every,
            is_main=dist.is_main)
        log.info("training %d steps (%d per epoch of %d samples), global batch %d (%d per rank x %d), "
                 "precision %s, device %s%s", self.total_steps, self.steps_per_epoch, self.num_samples,
                 self.global_batch, self.local_batch, dist.world_size, self.precision, dist.device,
                 f", lr cycle {self.restart_cycle} steps" if self.restart_cycle else "")
        last_good = str(resume) if resume else None
        watch = pretrain.NonFiniteWatch(self.device, step, active_terms(self.settings.loss))
        last_ckpt = time.monotonic()
        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        last_probe: dict = {}
        self.module.train()
        batches = pretrain_data.stream(
            self.train, self.text.targets, self.pos, cfg.data_settings, steps=self.total_steps - step, window=window,
            dist=dist, steps_per_epoch=self.steps_per_epoch, batch=self.local_batch, sample_aug=sample_aug,
            pin_memory=self.device.type == "cuda")
        with contextlib.closing(batches):
            for batch in batches:
                images, target = pretrain.batch_inputs(batch, self.batch_aug, self.module.text, self.device,
                                                       cfg.channels_last)
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps
                out = pretrain.train_step(train_module, self.optimizer, self.scaler, images, target,
                                          self.settings, self.grad_params if log_now else None)
                self.scheduler.step()
                watch.update(out)  # no host sync here: read at log and checkpoint steps below
                step += 1
                window["steps"] += 1
                probe_now = probe is not None and cfg.probe_size >= 2 and step % cfg.probe_every == 0
                final = step == self.total_steps
                # A stop request (SIGTERM/SIGINT) or the checkpoint timer of any rank: every rank acts on
                # it at this same step. A signal at the last step lets the run finish instead.
                minutes = cfg.ckpt_every_minutes
                stop, timed = (False, False) if final else distributed.agree(
                    [self.stop.requested, bool(minutes) and time.monotonic() - last_ckpt >= 60 * minutes], dist)
                save_now = step % cfg.ckpt_every == 0 or final or stop or timed
                if log_now or probe_now or save_now:
                    watch.check(dist, last_good)
                if log_now:
                    self._log(step, out, window)
                    window.update(t0=time.perf_counter(), wait=0.0, steps=0)
                if probe_now and not final:
                    last_probe, _ = self._probe(probe, cfg.probe_size, step)
                if save_now:
                    self._check_bad(final=self.pos.step_in_epoch >= self.steps_per_epoch or final)
                    if not (final and cfg.keep_checkpoints == 0):  # nothing left to resume
                        last_good = str(self._checkpoint(step, final=final))
                    last_ckpt = time.monotonic()
                if stop:
                    log.info("stop requested (%s): checkpoint %s written at step %d", self.stop.signum, last_good,
                             step)
                    raise Stopped(self.stop.signum or signal.SIGTERM, step)
        self._check_bad(final=True)
        return self._finish(step, probe, last_probe, params_report)

    def _check_bad(self, final: bool) -> None:
        self.pos.check_bad(final, bool(self.train.sizes), self.cfg.max_bad_fraction, self.dist.rank)

    def _probe(self, probe: dict, size: int, step: int) -> tuple[dict, dict]:
        """Embed the first ``size`` probe images (rank 0) and log the probe's scalars as ``val/...``."""
        scalars, spectrum = pretrain.probe_model(self.module, pretrain_data.probe_subset(probe, size),
                                                 self.probe_aug, self.device, self.cfg.channels_last)
        self._write_metrics({"step": step, "epoch": self.pos.epoch, **{f"val/{k}": v for k, v in scalars.items()}})
        return scalars, spectrum

    def _log(self, step: int, out: dict, window: dict) -> None:
        rec = {"step": step, "epoch": self.pos.epoch,
               **pretrain.log_scalars(out, self.dist, self.optimizer, window, self.global_batch, self.pos)}
        if self.dist.is_main:
            terms = " ".join(f"{name} {rec[f'train/{name}']:.4f}" for name in pretrain.term_names(out))
            log.info("step %d/%d loss %.4f (%s) lr %.3g %.1f img/s data-wait %.0f%%",
                     step, self.total_steps, rec["train/loss"], terms,
                     rec["train/lr"], rec["train/images_per_s"], 100 * rec["train/data_wait"])
        self._write_metrics(rec)

    def _write_metrics(self, rec: dict) -> None:
        if self.dist.is_main:
            append_metrics(self.out / "metrics.jsonl", rec)
            self.tracker.log(rec, rec["step"])

    def _finish(self, step: int, probe: dict | None, last_probe: dict, params_report: dict) -> dict:
        cfg, dist, pos = self.cfg, self.dist, self.pos
        checksums = all_gather_object(train_state.param_checksum(self.module), dist)
        counts = all_gather_object(pos.counts(), dist)
        spectrum = None
        if probe is not None and cfg.final_probe_size >= 2:
            last_probe, spectrum = self._probe(probe, cfg.final_probe_size, step)
        summary = {
            "fingerprint": self.fingerprint, "text_cache_identity": self.text.identity, "steps": step,
            "epochs": pos.epoch + 1,
            "steps_per_epoch": self.steps_per_epoch, "world_size": dist.world_size,
            "global_batch": self.global_batch, "batch_per_process": self.local_batch,
            "restart_cycle": self.restart_cycle, "probe_held_out": self.probe_held_out,
            "precision": self.precision, "final_probe": last_probe, **params_report,
            **pretrain_data.DataPos.sum_counts(counts), "param_checksum_per_rank": checksums,
        }
        if dist.is_main:
            train_state.write_finished_run(
                self.out, self.module.vision, summary, spectrum, text_head=cfg.text_head, text_dim=self.text.text_dim,
                hidden_dim=cfg.hidden_dim, drop_checkpoints=cfg.keep_checkpoints == 0)
            log.info("done: %d steps; encoder %s", step, self.out / "encoder.pt")
        barrier(dist)
        return summary
