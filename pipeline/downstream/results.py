"""The eval stage's building blocks: the images and encoders its seeds share, and its results files.

``ImageStore`` decodes the images every seed needs once (val/test serve all seeds); ``Encoders`` hands
each seed its encoder (one shared when the task allows it); ``results`` assembles results.json from
the finished seeds (``seed_summary``: mean ± sample std over seeds) and ``append_markdown`` adds its
row to results.md; ``checkpoint_sha256`` identifies the weights behind ``--init``.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from pipeline.common import atomic_open, config_to_dict, file_sha256, read_text_utf8
from pipeline.downstream import metrics
from pipeline.downstream.data import ImageSource, labels_matrix
from pipeline.downstream.recipes import Recipe
from pipeline.downstream.splits import split_summary
from pipeline.vision.checkpoints import imagenet_weights_path, load_encoder


class ImageStore:
    """The images every seed needs, decoded once into one ``ImageSource`` (val/test serve all seeds),
    with the index of each image id and, for cls, the label matrix."""

    def __init__(self, spec, recipe: Recipe, task, fractions: dict, split, decode: bool):
        by_id = {r.image_id: i for i, r in enumerate(spec.records)}
        need = sorted({by_id[i] for ids in fractions.values() for i in ids} | {by_id[i] for i in split.val}
                      | {by_id[i] for i in split.test})
        self.spec, self.split, self.fractions = spec, split, fractions
        self.records = [spec.records[i] for i in need]
        self.pos = {r.image_id: k for k, r in enumerate(self.records)}
        self.labels = labels_matrix(spec, self.records) if task.name == "cls" else None
        self.source = ImageSource(self.records, recipe.load_size, resize=recipe.resize, resample=recipe.resample,
                                  mask_fn=spec.mask_fn if task.needs_masks() else None,
                                  desc=spec.name, preload=None if decode else False)

    def indices(self, ids) -> list[int]:
        return [self.pos[i] for i in ids]


class Encoders:
    """Encoders for the seeds: one shared when the task allows it (frozen, not random), else a fresh one
    per seed (a random init differs per seed; fine-tuning changes it). Each comes with the cache the
    task keeps for it (e.g. its features), which lives exactly as long as the encoder serves."""

    def __init__(self, init: str, shared: bool):
        self.init, self.shared, self._one = init, shared, None

    def get(self) -> tuple:
        """(encoder, info, cache)"""
        if not self.shared:
            return (*load_encoder(self.init), {})
        if self._one is None:
            self._one = (*load_encoder(self.init), {})
        return self._one


def checkpoint_sha256(init: str) -> str | None:
    """sha256 of the weights file behind ``init`` (None for random, or imagenet weights not cached)."""
    if init == "random":
        return None
    if init == "imagenet":
        p = imagenet_weights_path()
        return file_sha256(p) if p is not None else None
    return file_sha256(Path(init).expanduser())


def seed_summary(values: list[float]) -> dict:
    """mean, sample std (ddof=1; 0 for one value) and n of the finite ``values`` (NaN when none)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def summarise_seeds(per_seed: list[dict]) -> tuple[dict, dict]:
    """(summary of every scalar test metric over the seeds, summary of each class's AUROC), each value a
    :func:`seed_summary`; counts (``n_*``) are left out."""
    scalar_keys = sorted({k for r in per_seed for k, v in r["test"].items()
                          if (v is None or isinstance(v, (int, float))) and not isinstance(v, bool)
                          and not k.startswith("n_")})
    summary = {k: seed_summary([_num(r["test"].get(k)) for r in per_seed]) for k in scalar_keys}
    per_class: dict[str, list] = {}
    for r in per_seed:
        for name, v in (r["test"].get("auroc_per_class") or {}).items():
            per_class.setdefault(name, []).append(_num(v))
    return summary, {k: seed_summary(v) for k, v in per_class.items()}


def clean_json(obj):
    """``obj`` with NaN/inf as null (JSON has none; the metric definitions say when one is undefined)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def results(cfg, recipe: Recipe, spec, split, fractions, fraction_files, per_seed, fp, ckpt_hash) -> dict:
    """results.json of an eval run: ``cfg`` is its EvalConfig, ``per_seed`` the finished seeds' records;
    summaries over seeds, the split, the fractions and how the protocol was applied."""
    primary = recipe.primary
    summary, summary_per_class = summarise_seeds(per_seed)
    scalar_keys = list(summary)
    random_bn = cfg.init == "random"
    images = (f"{recipe.resize} to {recipe.load_size}x{recipe.load_size} ({recipe.resample} resampling)"
              + (f", {recipe.image_size}x{recipe.image_size} crops" if recipe.load_size != recipe.image_size else "")
              + f", grey replicated to 3 channels, normalised with {recipe.normalize} mean/std")
    return clean_json({
        "task": cfg.task, "dataset": cfg.dataset, "protocol": cfg.protocol, "init": cfg.init,
        "checkpoint_sha256": ckpt_hash,
        "checkpoint_layout": next((r.get("checkpoint_layout") for r in per_seed if r.get("checkpoint_layout")), None),
        "finetune": cfg.finetune, "fraction": cfg.fraction, "seeds": list(cfg.seeds), "fingerprint": fp,
        "primary_metric": primary,
        "metric_definitions": {k: metrics.METRIC_DEFINITIONS[k] for k in scalar_keys
                               if k in metrics.METRIC_DEFINITIONS},
        "summary": summary, "summary_auroc_per_class": summary_per_class,
        "per_seed": [{k: v for k, v in r.items() if k != "history"} for r in per_seed],
        "predictions": {str(r["seed"]): f"seeds/{r['predictions']}" for r in per_seed},
        "split": split_summary(split, spec, {f"seed {s}": fractions[s] for s in cfg.seeds}),
        # patients / image ids two lists share (MGCA's splits can; this tool's never do), also in "split"
        "leaks": split_summary(split, spec)["leaks"],
        "fraction_sizes": {str(s): len(fractions[s]) for s in cfg.seeds},
        "fraction_files": {str(s): fraction_files[s] for s in cfg.seeds},
        "class_names": list(spec.class_names), "label_kind": spec.label_kind,
        "dataset_counts": dict(spec.counts), "hyperparameters": recipe.as_dict(),
        "protocol_details": {
            "split": "one split shared by all seeds; the training fraction is drawn from the training split "
                     + ("once, as MGCA draws it, and shared by all seeds" if cfg.protocol == "mgca" else
                        "per seed"),
            "selection": f"early stopping on validation {recipe.monitor} ({recipe.mode}, patience "
                         f"{recipe.patience}); test metrics from the best-validation epoch",
            "std": "sample standard deviation over seeds (ddof=1; 0 for one seed)",
            "random_init": "the random encoder's BatchNorm running statistics are estimated on the seed's "
                           "training images before training (its weights stay random)" if random_bn else None,
            "images": images,
            "cls_features": {"cached": "linear probe on frozen features computed once, no augmentation, "
                                       "standardised with the training statistics",
                             "per-epoch": "linear probe on raw frozen features of images augmented anew every "
                                          "epoch"}.get(recipe.features) if cfg.task == "cls" else None},
        "config": config_to_dict(cfg),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _num(v) -> float:
    return float("nan") if v is None else float(v)


_MD_HEADER = ("| finished | task | dataset | protocol | init | ckpt sha256 | frac | finetune | seeds | metric "
              "| mean ± std | other metrics | n_train | fingerprint |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def _fmt(s: dict) -> str:
    return "n/a" if s.get("mean") is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def append_markdown(path: Path, res: dict) -> None:
    """Append one row (rewriting the file atomically so a crash never leaves half a row)."""
    old = read_text_utf8(path) if path.is_file() else _MD_HEADER
    p = res["primary_metric"]
    # the tasks without training report dozens of numbers (results.json has them): the row shows a few
    keep = None if res["fraction_sizes"] else ("auroc", "f1_macro", "align_true_pair", "align_constant",
                                               "align_shuffled", "image_to_text_R@1")
    others = ", ".join(f"{k} {_fmt(v)}" for k, v in res["summary"].items() if k != p and (keep is None or k in keep))
    init = Path(res["init"]).name if res["init"] not in ("random", "imagenet") else res["init"]
    sha = (res["checkpoint_sha256"] or "-")[:12]
    n_train = "/".join(str(v) for v in res["fraction_sizes"].values()) or f"{res.get('n_images', '-')} (no training)"
    frac = "-" if res["fraction"] is None else res["fraction"]
    row = (f"| {res['finished']} | {res['task']} | {res['dataset']} | {res['protocol']} | {init} | {sha} | "
           f"{frac} | {'yes' if res['finetune'] else 'no'} | {','.join(map(str, res['seeds']))} | {p} | "
           f"{_fmt(res['summary'].get(p, {}))} | {others} | {n_train} | {res['fingerprint']} |\n")
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(old + row)
