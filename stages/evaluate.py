"""eval stage: train a cls/seg/det head on a downstream dataset over an encoder, report test metrics.

Protocol (written into every results.json):
- One split (train/val/test ids) per run, shared by all seeds: ``make_split(spec, seed=split_seed)``
  or ``--split-file``. Seeds vary the training fraction sample (drawn from the training split only),
  the head's initialisation, the data order and augmentation (and, for ``--init random``, the
  random encoder).
- Early stopping on the validation split; test metrics come from the best-validation epoch only.
- cls without ``--finetune`` is a linear probe: the frozen encoder's pooled features are computed
  once per image (no augmentation) and a linear layer is trained on them.

Outputs in OUT: ``config.json``; ``split/`` (id lists and split.json via ``pipeline.splits.write_split``,
and each seed's training subset ``train-frac<f>-seed<s>.txt``); ``seeds/seed-<n>.json`` (one finished
seed each, so an interrupted run resumes); ``results.json``; ``results.md`` (one appended table row
per finished run; rerunning a finished configuration adds nothing).
A folder holds one configuration: a rerun with another config (other than seeds, device, workers)
is refused rather than mixing results.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import (ConfigError, MflagError, atomic_open, config_to_dict, file_sha256, fingerprint,
                             read_json, save_config, write_json)
from pipeline.locks import hold_output_lock
from pipeline.tracking import REPORT_TO

log = logging.getLogger(__name__)

TASKS = ("cls", "seg", "det")
DATASETS = ("chexpert", "rsna", "covidx", "siim", "object-cxr")
DET_MODELS = ("fasterrcnn", "retinanet")
NORMALIZE = ("auto", "imagenet", "half")
# Settings that change neither the numbers a seed produces nor which seeds are valid to reuse.
_NOT_FINGERPRINTED = ("seeds", "out", "device", "workers", "report_to")

# (epochs, patience, lr) when not given; the linear probe runs on cached features, so epochs are cheap.
DEFAULTS = {
    ("cls", False): (100, 10, 1e-3),
    ("cls", True): (10, 3, 1e-4),
    ("seg", False): (10, 3, 3e-4),
    ("seg", True): (10, 3, 1e-4),
    ("det", False): (10, 3, 1e-4),
    ("det", True): (10, 3, 1e-4),
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``epochs``/``patience``/``lr`` None mean the task default (``DEFAULTS``); ``dataset_options``
    are (name, value) pairs passed to the dataset reader."""

    task: str
    dataset: str
    root: str
    out: str
    init: str
    fraction: float = 1.0
    seeds: tuple[int, ...] = (0,)
    finetune: bool = False
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    image_size: int = 224
    patience: int | None = None
    split_file: str | None = None
    split_seed: int = 0
    device: str = "auto"
    workers: int = 0
    det_model: str = "fasterrcnn"
    weight_decay: float = 1e-4
    normalize: str = "auto"
    dataset_options: tuple[tuple[str, Any], ...] = ()
    report_to: str = "none"  # none | tensorboard | wandb (pipeline.tracking.open_tracker)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task: {self.task!r} is not one of {', '.join(TASKS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: {self.dataset!r} is not one of {', '.join(DATASETS)}")
        from pipeline.datasets.registry import TASKS_BY_DATASET, check_options

        if self.task not in TASKS_BY_DATASET[self.dataset]:
            raise ConfigError(f"task: {self.dataset} supports {', '.join(TASKS_BY_DATASET[self.dataset])}, "
                              f"not {self.task!r}")
        try:  # reader options are checked here, before any data is read (names and types only)
            check_options(self.dataset, dict(self.dataset_options))
        except MflagError as e:
            raise ConfigError(f"dataset_options: {e}") from e
        if not self.init:
            raise ConfigError("init: give 'random', 'imagenet' or a checkpoint path")
        if not (0 < self.fraction <= 1):
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: must be distinct non-negative integers, got {list(self.seeds)}")
        for name in ("epochs", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: must be >= 1, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"image_size: must be in 32..2048, got {self.image_size}")
        if self.task == "seg" and self.image_size % 32:
            raise ConfigError(f"image_size: the U-Net needs a multiple of 32 for seg, got {self.image_size}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize: {self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        if self.det_model not in DET_MODELS:
            raise ConfigError(f"det_model: {self.det_model!r} is not one of {', '.join(DET_MODELS)}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to: {self.report_to!r} is not one of {', '.join(REPORT_TO)}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if self.split_file is not None and not Path(self.split_file).exists():
            raise ConfigError(f"split_file: {self.split_file} does not exist")
        if self.init not in ("random", "imagenet") and not Path(self.init).expanduser().is_file():
            raise ConfigError(f"init: expected 'random', 'imagenet' or a checkpoint file; {self.init!r} is neither")

    def norm(self) -> str:
        """Input normalisation: ImageNet statistics for ImageNet weights; otherwise mean 0.5 / std 0.5,
        what M-FLAG (original and train-vision), MGCA and GLoRIA pre-trained with."""
        if self.normalize != "auto":
            return self.normalize
        return "imagenet" if self.init == "imagenet" else "half"

    def effective(self) -> dict:
        """Training hyper-parameters with task defaults filled in."""
        epochs, patience, lr = DEFAULTS[(self.task, self.finetune)]
        return {
            "epochs": self.epochs if self.epochs is not None else epochs,
            "patience": self.patience if self.patience is not None else patience,
            "lr": self.lr if self.lr is not None else lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "image_size": self.image_size,
            "normalize": self.norm(),
            "frozen_encoder": not self.finetune,
            "head": {"cls": "linear" if not self.finetune else "linear (encoder fine-tuned)",
                     "seg": "smp Unet(resnet50)", "det": self.det_model}[self.task],
        }


# --------------------------------------------------------------------------- helpers
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MflagError(f"--device {name}: CUDA is not available on this machine")
    return name


def checkpoint_sha256(init: str) -> str | None:
    """sha256 of the weights file behind ``init`` (None for random, or imagenet weights not cached)."""
    if init == "random":
        return None
    if init == "imagenet":
        from pipeline.checkpoints import imagenet_weights_path

        p = imagenet_weights_path()
        return file_sha256(p) if p is not None else None
    return file_sha256(Path(init).expanduser())


def _build_encoder(init: str):
    """(encoder module, info dict with init/layout/path/sha256) via ``pipeline.checkpoints``."""
    from pipeline.checkpoints import load_encoder

    return load_encoder(init)


def protocol_version(task: str, init: str, finetune: bool) -> int:
    """Bumped for the configurations whose computation changed, so their old per-seed results are never
    reused (and ``cli.py run`` reruns them) while every other result stays valid. 2: a fine-tuned
    random detection body gets BatchNorm statistics estimated (before, it ran un-normalised)."""
    return 2 if (task == "det" and init == "random" and finetune) else 1


def _run_fingerprint(cfg: EvalConfig, ckpt_hash: str | None, split_hash: str) -> str:
    d = config_to_dict(cfg)
    for k in _NOT_FINGERPRINTED:
        d.pop(k, None)
    if cfg.init not in ("random", "imagenet"):
        d["init"] = "file"  # the same weights under another path are the same run
    d["split_file"] = None  # the split's content hash below stands for it
    d["checkpoint_sha256"] = ckpt_hash
    d["split_sha256"] = split_hash
    d["protocol"] = protocol_version(cfg.task, cfg.init, cfg.finetune)
    return fingerprint(d)


def _summary(values: list[float]) -> dict:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def _clean_json(obj):
    # JSON has no NaN: write null (the definitions say when a metric is undefined)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def _check_folder(out: Path, fp: str) -> None:
    """Refuse a folder holding results of another configuration; a run of another configuration that
    stopped before finishing any seed left no results, so its leftovers are cleared instead."""
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = read_json(cfg_path).get("fingerprint")
        if old is not None and old != fp:
            seeds = out / "seeds"
            if (out / "results.json").exists() or (seeds.is_dir() and any(seeds.iterdir())):
                raise MflagError(
                    f"{out} holds eval results of another configuration (fingerprint {old}, this one {fp}); "
                    f"use another --out, or delete {out} to start over, so results of different "
                    "configurations are never mixed")
            log.info("%s: clearing what a run of another configuration left before its first seed", out)
            cfg_path.unlink()
            shutil.rmtree(out / "split", ignore_errors=True)
            shutil.rmtree(seeds, ignore_errors=True)


# --------------------------------------------------------------------------- the stage
def run(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.init`` on ``cfg.task``/``cfg.dataset`` for every seed; returns the results dict
    also written to ``OUT/results.json``."""
    hold_output_lock(cfg.out, "eval", clean_temps=("", "seeds", "split"))
    import torch

    from pipeline import downstream as ds
    from pipeline import metrics
    from pipeline.datasets.registry import load_dataset
    from pipeline.splits import (load_split_file, make_split, sample_fraction, split_summary, write_fraction,
                                 write_split)

    out = Path(cfg.out)
    hp = cfg.effective()
    device = _device(cfg.device)
    spec = load_dataset(cfg.dataset, cfg.root, cfg.task, **dict(cfg.dataset_options))
    if cfg.task not in spec.tasks:
        raise MflagError(f"dataset {cfg.dataset} does not support task {cfg.task} (it supports "
                         f"{', '.join(spec.tasks)})")
    if cfg.task == "cls" and not spec.class_names:
        raise MflagError(f"dataset {cfg.dataset} has no class names for classification")
    if cfg.task == "seg" and spec.mask_fn is None:
        raise MflagError(f"dataset {cfg.dataset} has no segmentation masks")
    by_id = {r.image_id: i for i, r in enumerate(spec.records)}
    if cfg.split_file:
        split = load_split_file(cfg.split_file, spec=spec)
    else:
        split = make_split(spec, seed=cfg.split_seed)
    for part in ("train", "val", "test"):
        ids = split.ids(part)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise MflagError(f"split {part}: {len(missing)} ids are not in dataset {cfg.dataset} at "
                             f"{cfg.root}, e.g. {missing[:3]}")
        if not ids:
            raise MflagError(f"split {part} is empty ({len(spec.records)} images in {cfg.dataset} at "
                             f"{cfg.root}); the dataset is too small to split")

    ckpt_hash = checkpoint_sha256(cfg.init)
    fp = _run_fingerprint(cfg, ckpt_hash, split.hashes()["all"])
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, fp)
    if (out / "results.json").is_file():
        prev = read_json(out / "results.json")
        if prev.get("fingerprint") == fp and prev.get("seeds") == list(cfg.seeds):
            log.info("%s: this configuration is already complete; nothing to do", out / "results.json")
            return prev
    save_config(cfg, out, fingerprint=fp, effective=hp, checkpoint_sha256=ckpt_hash)
    write_split(split, out / "split")
    fractions = {s: list(sample_fraction(split, cfg.fraction, s, spec=spec)) for s in cfg.seeds}
    fraction_files = {s: write_fraction(ids, out / "split", cfg.fraction, s) for s, ids in fractions.items()}

    # One decoded store for every image any seed needs: val/test are decoded once for all seeds.
    need = sorted({by_id[i] for ids in fractions.values() for i in ids}
                  | {by_id[i] for i in split.val} | {by_id[i] for i in split.test})
    records = [spec.records[i] for i in need]
    pos = {r.image_id: k for k, r in enumerate(records)}
    seeds_todo = [s for s in cfg.seeds if _load_seed(out, s, fp) is None]
    source = None
    if seeds_todo:
        source = ds.ImageSource(records, cfg.image_size, mask_fn=spec.mask_fn if cfg.task == "seg" else None,
                                desc=cfg.dataset)
    labels = ds.labels_matrix(spec, records) if cfg.task == "cls" else None
    val_idx = [pos[i] for i in split.val]
    test_idx = [pos[i] for i in split.test]
    primary = metrics.primary_metric(cfg.task, spec.label_kind)

    shared_encoder, encoder_info = None, {"init": cfg.init, "layout": None}
    feature_cache: dict[int, np.ndarray] = {}
    per_seed = []
    for seed in cfg.seeds:
        done = _load_seed(out, seed, fp)
        if done is not None:
            log.info("seed %d: already done (%s), reusing", seed, out / "seeds" / f"seed-{seed}.json")
            per_seed.append(done)
            continue
        t0 = time.monotonic()
        settings = ds.TrainSettings(epochs=hp["epochs"], batch_size=cfg.batch_size, lr=hp["lr"],
                                    patience=hp["patience"], seed=seed, device=device, workers=cfg.workers,
                                    weight_decay=cfg.weight_decay, norm=hp["normalize"])
        train_idx = [pos[i] for i in fractions[seed]]
        torch.manual_seed(seed)
        if cfg.init != "random" and not cfg.finetune and cfg.task == "cls":
            if shared_encoder is None:
                shared_encoder, encoder_info = _build_encoder(cfg.init)
            encoder = shared_encoder
        else:
            # a fresh encoder per seed: random init differs per seed, fine-tuning changes it
            encoder, encoder_info = _build_encoder(cfg.init)
            feature_cache = {}
        log.info("seed %d: %s on %s, %d train / %d val / %d test images", seed, cfg.task, cfg.dataset,
                 len(train_idx), len(val_idx), len(test_idx))
        n_bn = 0
        # A random encoder's BN statistics describe no data. Frozen encoders, and the detection body
        # (torchvision's frozen BN, which never learns statistics even when fine-tuned), get them
        # estimated on training images; trainable BN (cls/seg fine-tuning) learns its own.
        if cfg.init == "random" and (not cfg.finetune or cfg.task == "det"):
            n_bn = ds.calibrate_bn(encoder, source, train_idx, settings)

        if cfg.task == "cls" and not cfg.finetune:
            todo = sorted(set(train_idx + val_idx + test_idx) - set(feature_cache))
            if todo:
                feats = ds.extract_features(encoder, source, todo, settings, desc=f"features seed {seed}")
                feature_cache.update(zip(todo, feats))
            def fx(idx):
                return np.stack([feature_cache[i] for i in idx]) if idx else np.zeros((0, ds.FEATURE_DIM), np.float32)
            predict, fitted = ds.train_linear_probe(fx(train_idx), labels[train_idx], fx(val_idx), labels[val_idx],
                                                    spec.label_kind, spec.class_names, settings)
            test = metrics.classification_metrics(labels[test_idx], predict(fx(test_idx)), spec.label_kind,
                                                  spec.class_names)
        elif cfg.task == "cls":
            model = ds.Classifier(encoder, len(spec.class_names))
            tr = ds.ClsDataset(source, labels[train_idx], train_idx, augment=True, seed=seed)
            va = ds.ClsDataset(source, labels[val_idx], val_idx)
            te = ds.ClsDataset(source, labels[test_idx], test_idx)
            fitted = ds.train_classifier(model, tr, va, spec.label_kind, spec.class_names, settings)
            logits = torch.from_numpy(ds.predict_classifier(model, te, settings))
            test = metrics.classification_metrics(te.labels, ds.cls_scores(logits, spec.label_kind).numpy(),
                                                  spec.label_kind, spec.class_names)
        elif cfg.task == "seg":
            model = ds.build_unet(encoder.state_dict(), cfg.finetune)
            tr = ds.SegDataset(source, train_idx, augment=True, seed=seed)
            fitted = ds.train_segmenter(model, tr, ds.SegDataset(source, val_idx), settings)
            test = ds.evaluate_segmenter(model, ds.SegDataset(source, test_idx), settings)
            test.pop("loss", None)
        else:
            model = ds.build_detector(cfg.det_model, encoder.state_dict(), cfg.image_size, cfg.finetune,
                                      norm=hp["normalize"])
            tr = ds.DetDataset(source, train_idx, augment=True, seed=seed)
            fitted = ds.train_detector(model, tr, ds.DetDataset(source, val_idx), settings)
            test = ds.evaluate_detector(model, ds.DetDataset(source, test_idx), settings)

        best_val = fitted.history[fitted.best_epoch] if fitted.best_epoch >= 0 else {}
        result = {
            "seed": seed, "fingerprint": fp, "n_train": len(train_idx), "best_epoch": fitted.best_epoch,
            "epochs_run": len(fitted.history), "selected_by": fitted.selection, "val": best_val,
            "checkpoint_layout": encoder_info.get("layout"), "bn_calibration_images": n_bn,
            "test": test, "history": fitted.history, "seconds": round(time.monotonic() - t0, 2),
        }
        write_json(out / "seeds" / f"seed-{seed}.json", _clean_json(result))
        log.info("seed %d: test %s = %s (best epoch %d)", seed, primary, test.get(primary), fitted.best_epoch)
        per_seed.append(result)

    scalar_keys = sorted({k for r in per_seed for k, v in r["test"].items()
                          if (v is None or isinstance(v, (int, float))) and not isinstance(v, bool)
                          and not k.startswith("n_")})
    summary = {k: _summary([_num(r["test"].get(k)) for r in per_seed]) for k in scalar_keys}
    per_class = {}
    for r in per_seed:
        for name, v in (r["test"].get("auroc_per_class") or {}).items():
            per_class.setdefault(name, []).append(_num(v))
    definitions = {k: metrics.METRIC_DEFINITIONS[k] for k in scalar_keys if k in metrics.METRIC_DEFINITIONS}
    results = {
        "task": cfg.task, "dataset": cfg.dataset, "init": cfg.init, "checkpoint_sha256": ckpt_hash,
        "checkpoint_layout": next((r.get("checkpoint_layout") for r in per_seed if r.get("checkpoint_layout")),
                                  None),
        "finetune": cfg.finetune, "fraction": cfg.fraction, "seeds": list(cfg.seeds), "fingerprint": fp,
        "primary_metric": primary, "metric_definitions": definitions,
        "summary": summary, "summary_auroc_per_class": {k: _summary(v) for k, v in per_class.items()},
        "per_seed": [{k: v for k, v in r.items() if k != "history"} for r in per_seed],
        "split": split_summary(split, spec, {f"seed {s}": fractions[s] for s in cfg.seeds}),
        "fraction_sizes": {str(s): len(fractions[s]) for s in cfg.seeds},
        "fraction_files": {str(s): fraction_files[s] for s in cfg.seeds},
        "class_names": list(spec.class_names), "label_kind": spec.label_kind,
        "dataset_counts": dict(spec.counts), "hyperparameters": hp,
        "protocol": {"split": "one split shared by all seeds; the training fraction is sampled per seed "
                              "from the training split",
                     "selection": f"early stopping on validation {primary} (patience {hp['patience']}); "
                                  "test metrics from the best-validation epoch",
                     "std": "sample standard deviation over seeds (ddof=1; 0 for one seed)",
                     "random_init": "the random encoder's BatchNorm running statistics are re-estimated "
                                    "on the seed's training images (weights stay random)"
                     if cfg.init == "random" and (not cfg.finetune or cfg.task == "det") else None,
                     "images": f"resized to {cfg.image_size}x{cfg.image_size}, grey replicated to 3 "
                               f"channels, normalised with {hp['normalize']} mean/std",
                     "cls_features": "linear probe on frozen features computed once, no augmentation"
                     if cfg.task == "cls" and not cfg.finetune else None},
        "config": config_to_dict(cfg),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results = _clean_json(results)
    write_json(out / "results.json", results)
    _append_markdown(out / "results.md", results)
    return results


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _load_seed(out: Path, seed: int, fp: str) -> dict | None:
    path = out / "seeds" / f"seed-{seed}.json"
    if not path.is_file():
        return None
    data = read_json(path)
    return data if data.get("fingerprint") == fp else None


_MD_HEADER = ("| finished | task | dataset | init | ckpt sha256 | frac | finetune | seeds | metric | mean ± std "
              "| other metrics | n_train | fingerprint |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def _fmt(s: dict) -> str:
    return "n/a" if s.get("mean") is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def _append_markdown(path: Path, res: dict) -> None:
    """Append one row (rewriting the file atomically so a crash never leaves half a row)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else _MD_HEADER
    p = res["primary_metric"]
    others = ", ".join(f"{k} {_fmt(v)}" for k, v in res["summary"].items() if k != p)
    init = Path(res["init"]).name if res["init"] not in ("random", "imagenet") else res["init"]
    sha = (res["checkpoint_sha256"] or "-")[:12]
    n_train = "/".join(str(v) for v in res["fraction_sizes"].values())
    row = (f"| {res['finished']} | {res['task']} | {res['dataset']} | {init} | {sha} | {res['fraction']} | "
           f"{'yes' if res['finetune'] else 'no'} | {','.join(map(str, res['seeds']))} | {p} | "
           f"{_fmt(res['summary'].get(p, {}))} | {others} | {n_train} | {res['fingerprint']} |\n")
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(old + row)
