"""Classification: linear probe or fine-tuned classifier on the ResNet50's pooled 2048-d features.

Three ways to train, chosen by the recipe's ``features``:
- ``cached`` (this tool's linear probe): the frozen encoder's features are computed once per image
  without augmentation, standardised with the training statistics, and a linear layer trains on them;
- ``per-epoch`` (MGCA's linear probe): every epoch the training images are augmented anew and passed
  through the frozen encoder (in eval mode); raw features go into the linear layer. Validation and
  test images take the fixed centre crop, so their features are computed once;
- ``finetuned``: encoder and linear layer train end to end on augmented images.

Predictions file (``seed-N.predictions.csv``): one row per test image, ``image_id``, then
``label:<class>`` (0/1; one-hot for multi-class) and ``score:<class>`` (sigmoid, or softmax for
multi-class) for each class. ``sklearn.metrics.roc_auc_score`` per class (and the arg-max accuracy for
multi-class) on those columns gives results.json's numbers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.common import MflagError, atomic_open, open_text_utf8, progress
from pipeline.downstream import metrics
from pipeline.downstream.data import ClsDataset, ImageSource
from pipeline.downstream.datasets.base import DatasetSpec
from pipeline.downstream.loop import (
    TrainSettings,
    fit,
    freeze,
    frozen_bn_mode,
    images_in,
    make_loader,
    place,
    to_device,
)
from pipeline.downstream.recipes import MGCA_COMMON, TOOL_COMMON
from pipeline.downstream.task import SeedOutcome, SeedRun, Task

FEATURE_DIM = 2048


def cls_loss(logits: torch.Tensor, y: torch.Tensor, label_kind: str) -> torch.Tensor:
    if label_kind == "multiclass":
        return F.cross_entropy(logits, y.argmax(1))
    return F.binary_cross_entropy_with_logits(logits, y)


def cls_scores(logits: torch.Tensor, label_kind: str) -> torch.Tensor:
    return logits.softmax(1) if label_kind == "multiclass" else logits.sigmoid()


class Classifier(nn.Module):
    """Encoder (pooled 2048-d features) followed by one linear layer. A frozen encoder runs without
    autograd (its activations are not kept for a backward pass that never reaches it)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x):
        if any(p.requires_grad for p in self.encoder.parameters()):
            return self.head(self.encoder(x))
        with torch.no_grad():
            feats = self.encoder(x)
        return self.head(feats)


@torch.no_grad()
def extract_features(encoder: nn.Module, source: ImageSource, indices: Sequence[int], settings: TrainSettings,
                     desc: str = "features", transform=None) -> np.ndarray:
    """len(indices) x 2048 pooled encoder features (eval mode) of those images of ``source``, each
    passed through ``transform`` (e.g. the centre crop) first."""
    encoder.eval()
    place(encoder, settings)
    ds = ClsDataset(source, np.zeros((len(indices), 0), np.float32), indices, transform=transform)
    out = []
    for img, _ in progress(make_loader(ds, settings, shuffle=False), total=math.ceil(len(ds) / settings.batch_size),
                           desc=desc, unit="batch"):
        out.append(encoder(images_in(img, settings)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


def _evaluate_logits(logits: torch.Tensor, y: np.ndarray, spec: DatasetSpec) -> dict:
    res = metrics.classification_metrics(y, cls_scores(logits, spec.label_kind).numpy(), spec.label_kind,
                                         spec.class_names)
    res["loss"] = float(cls_loss(logits, torch.from_numpy(y).float(), spec.label_kind))
    return res


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       spec: DatasetSpec, settings: TrainSettings, standardize: bool = True):
    """Fit a linear layer on precomputed features (standardised with the training statistics unless
    ``standardize=False``). Returns ``(predict(features) -> logits, FitResult)`` from the best epoch."""
    torch.manual_seed(settings.seed)
    mean = train_x.mean(0, keepdims=True) if standardize else np.zeros((1, train_x.shape[1]), np.float32)
    std = train_x.std(0, keepdims=True) + 1e-6 if standardize else np.ones((1, train_x.shape[1]), np.float32)

    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - mean) / std).float()

    head = nn.Linear(train_x.shape[1], train_y.shape[1])
    loader = make_loader(TensorDataset(prep(train_x), torch.from_numpy(train_y).float()), settings, shuffle=True,
                         train=True)
    vx = prep(val_x)

    def step(batch):
        x, y = batch
        return cls_loss(head(x), y, spec.label_kind), len(x)

    @torch.no_grad()
    def validate() -> dict:
        head.eval()
        return _evaluate_logits(head(vx), val_y, spec)

    fitted = fit(head, loader, step, validate, settings, "linear probe")

    @torch.no_grad()
    def predict(x: np.ndarray) -> torch.Tensor:
        return head(prep(x))

    return predict, fitted


class ClsTask(Task):
    name = "cls"
    predictions_suffix = ".csv"
    predictions_format = ("CSV, one row per test image: image_id, label:<class> (0/1, one-hot for multi-class) "
                          "and score:<class> (sigmoid; softmax for multi-class)")

    def recipe(self, protocol: str, finetune: bool, dataset: str, fraction: float) -> dict:
        if protocol == "mgca":  # mgca_finetuner.py, ssl_finetuner.py, transforms.py, utils.py (recipes.py)
            return dict(MGCA_COMMON, batch_size=48, lr=5e-4, weight_decay=1e-6, resize="pad", resample="area",
                        train_transform="moco2" if dataset == "chexpert" else "crop", eval_transform="center-crop",
                        features="finetuned" if finetune else "per-epoch",
                        head="linear (encoder fine-tuned)" if finetune else "linear",
                        loss="bce (multi-label) / cross-entropy (multi-class)")
        if not finetune:
            # the linear probe trains on features computed once, so many cheap epochs
            return dict(TOOL_COMMON, epochs=100, patience=10, lr=1e-3, train_transform="none", features="cached",
                        head="linear", loss="bce (multi-label) / cross-entropy (multi-class)")
        return dict(TOOL_COMMON, epochs=10, patience=3, lr=1e-4, train_transform="mild", features="finetuned",
                    head="linear (encoder fine-tuned)", loss="bce (multi-label) / cross-entropy (multi-class)")

    def primary(self, protocol: str, label_kind: str) -> str:
        return "accuracy" if label_kind == "multiclass" else "auroc"

    def check(self, spec: DatasetSpec) -> None:
        super().check(spec)
        if not spec.class_names:
            raise MflagError(f"dataset {spec.name} has no class names for classification")

    def shares_encoder(self, recipe, init: str) -> bool:
        # cached features of one frozen, non-random encoder serve every seed
        return recipe.features == "cached" and init != "random"

    def run(self, r: SeedRun) -> SeedOutcome:
        if r.recipe.features == "cached":
            return self._cached_probe(r)
        return self._on_images(r)

    def _cached_probe(self, r: SeedRun) -> SeedOutcome:
        feats = r.cache.setdefault("features", {})
        todo = sorted(set(r.train_idx + r.val_idx + r.test_idx) - set(feats))
        if todo:
            feats.update(zip(todo, extract_features(r.encoder, r.source, todo, r.settings,
                                                    desc=f"features seed {r.seed}")))

        def fx(idx):
            return np.stack([feats[i] for i in idx]) if idx else np.zeros((0, FEATURE_DIM), np.float32)

        predict, fitted = train_linear_probe(fx(r.train_idx), r.labels[r.train_idx], fx(r.val_idx),
                                             r.labels[r.val_idx], r.spec, r.settings)
        return self._outcome(r, fitted, predict(fx(r.test_idx)))

    def _on_images(self, r: SeedRun) -> SeedOutcome:
        s = r.settings
        train_t, eval_t = r.transforms()
        torch.manual_seed(s.seed)
        model = place(Classifier(r.encoder, len(r.spec.class_names)), s)
        train = ClsDataset(r.source, r.labels[r.train_idx], r.train_idx, transform=train_t, seed=r.seed)
        if r.recipe.frozen_encoder:
            # MGCA's probe keeps the backbone in eval mode; its validation/test inputs are fixed crops,
            # so their features are computed once
            freeze(r.encoder)
            mode = frozen_bn_mode(model, [r.encoder])
            vf = torch.from_numpy(extract_features(r.encoder, r.source, r.val_idx, s, "val features", eval_t))
            tf = torch.from_numpy(extract_features(r.encoder, r.source, r.test_idx, s, "test features", eval_t))

            @torch.no_grad()
            def logits_of(which: str) -> torch.Tensor:
                model.head.eval()
                return model.head(to_device(vf if which == "val" else tf, s)).float().cpu()
        else:
            mode = model.train
            sets = {"val": ClsDataset(r.source, r.labels[r.val_idx], r.val_idx, transform=eval_t),
                    "test": ClsDataset(r.source, r.labels[r.test_idx], r.test_idx, transform=eval_t)}

            @torch.no_grad()
            def logits_of(which: str) -> torch.Tensor:
                model.eval()
                out = [model(images_in(img, s)).float().cpu() for img, _ in make_loader(sets[which], s, False)]
                return torch.cat(out) if out else torch.zeros((0, len(r.spec.class_names)))

        def step(batch):
            img, y = batch
            return cls_loss(model(images_in(img, s)), to_device(y, s), r.spec.label_kind), len(img)

        desc = "linear probe" if r.recipe.frozen_encoder else "cls finetune"
        fitted = fit(model, make_loader(train, s, shuffle=True, train=True), step,
                     lambda: _evaluate_logits(logits_of("val"), r.labels[r.val_idx], r.spec), s, desc, mode)
        return self._outcome(r, fitted, logits_of("test"))

    def _outcome(self, r: SeedRun, fitted, test_logits: torch.Tensor) -> SeedOutcome:
        y = r.labels[r.test_idx]
        scores = cls_scores(test_logits, r.spec.label_kind).numpy()
        test = metrics.classification_metrics(y, scores, r.spec.label_kind, r.spec.class_names)
        return SeedOutcome(fitted, test, {"ids": r.ids(r.test_idx), "labels": y, "scores": scores})

    def write_predictions(self, path: Path, outcome: SeedOutcome, run: SeedRun) -> None:
        write_cls_predictions(path, outcome.predictions["ids"], run.spec.class_names,
                              outcome.predictions["labels"], outcome.predictions["scores"])


def write_cls_predictions(path: Path, ids: Sequence[str], class_names: Sequence[str], labels: np.ndarray,
                          scores: np.ndarray) -> None:
    """The predictions CSV (module docstring); scores with 9 significant digits (float32 round-trips)."""
    import csv

    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", *(f"label:{c}" for c in class_names), *(f"score:{c}" for c in class_names)])
        for i, y, p in zip(ids, labels, scores):
            w.writerow([i, *(f"{v:g}" for v in y), *(f"{float(v):.9g}" for v in p)])


def read_cls_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(image ids, class names, N x C labels, N x C scores) of a predictions CSV."""
    import csv

    with open_text_utf8(path) as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    names = [h.split(":", 1)[1] for h in head if h.startswith("label:")]
    c = len(names)
    data = np.array([[float(v) for v in row[1:]] for row in body], np.float64).reshape(len(body), 2 * c)
    return [row[0] for row in body], names, data[:, :c], data[:, c:]


TASK = ClsTask()
