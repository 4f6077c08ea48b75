"""Zero-shot classification through the frozen text space (``eval --task zeroshot``): no training.

Images go trunk -> projector (za), prompts go through the frozen text encoder (the embed-text stage,
with the training cache's tokenizer, pooling, max length and dtype) -> the trained text head (zt); the
score of an image for a prompt is the cosine of za and zt. Two protocols (docs/PROTOCOLS.md):

- ``chexpert5x200`` (GLoRIA's CheXpert 5x200, the images MGCA's preprocessing sets aside): per class,
  ``prompts_per_class`` prompts drawn with the seed from GLoRIA's templates (``pipeline.downstream.prompts``);
  a class's score is the max (GLoRIA) or mean (MedCLIP's ``ensemble``) over its prompts; the predicted
  class is the highest-scoring one. Metrics: accuracy, macro precision/recall/F1, the confusion matrix.
- ``binary`` (CheXzero): per label one positive and one negative prompt set ("{}" / "no {}" by default);
  each set's zt are L2-normalised, averaged and renormalised; the probability of the label is the softmax
  of the two raw cosines. Metrics: AUROC per label and their mean, each with a bootstrap 95% interval
  (1,000 resamples of the test images, seed 0). Images: the dataset's test split under ``--protocol``.

Outputs (``evaluate``): per seed ``seeds/seed-N.json`` and ``seeds/seed-N.predictions.csv`` (``image_id``,
``label:<class>``, ``score:<class>``; the metrics recompute from it), the prompts used, and the
results dict the eval stage writes as results.json. Seeds change the prompt draw (5x200) and, for
``--init random``, the random model.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.common import atomic_open, write_json
from pipeline.downstream import language_metrics as lm
from pipeline.downstream import prompts as pr
from pipeline.downstream.data import labels_matrix
from pipeline.downstream.datasets.chexpert import TASKS as CHEXPERT_TASKS
from pipeline.downstream.datasets.registry import load_dataset
from pipeline.downstream.language import (
    EmbedFile,
    LanguageEvalError,
    cosine,
    embed_prompts,
    jsonable,
    load_images,
    load_pretrained,
    text_model_of,
)
from pipeline.downstream.mgca_splits import chexpert_5x200
from pipeline.downstream.splits import load_split_file, make_split

log = logging.getLogger(__name__)

PROTOCOLS = ("chexpert5x200", "binary")
AGGREGATES = ("max", "mean")
DEFINITIONS = {
    "accuracy": "share of the 5x200 images whose highest-scoring class is their class",
    "precision_macro": "precision per class, unweighted mean over classes (sklearn, zero_division=0)",
    "recall_macro": "recall per class, unweighted mean over classes",
    "f1_macro": "F1 per class, unweighted mean over classes",
    "auroc": "mean over labels of the AUROC of the binary zero-shot probability (softmax of the positive "
             "and negative prompt cosines), labels with both classes present",
}


def default_protocol(dataset: str) -> str:
    return "chexpert5x200" if dataset == "chexpert" else "binary"


def five_by_200(root: str, per_class: int | None, options: dict) -> tuple[list, list[int], str]:
    """(records, class index per record, description) of the CheXpert 5x200 set: MGCA's rule on
    train.csv (frontal, exactly one competition task positive, the 8 other observations 0, blanks 0),
    ``sample(n, random_state=0)`` per class, classes in the competition-task order. ``per_class`` None:
    MGCA's 200 (its share of a smaller train.csv, as ``cli.py splits`` sets aside)."""
    spec = load_dataset("chexpert", root, "cls", protocol="mgca", **options)
    picked, n = chexpert_5x200(spec.label_rows, per_class)
    by_id = {r.image_id: r for r in spec.records}
    missing = [i for i, _ in picked if i not in by_id]
    if missing:
        raise LanguageEvalError(f"chexpert 5x200: {len(missing)} selected images are not readable at {root}, "
                                f"e.g. {missing[:3]}")
    short = [CHEXPERT_TASKS[k] for k in range(5) if sum(1 for _, c in picked if c == k) < n]
    desc = (f"CheXpert 5x{n}: train.csv rows, frontal, one competition task positive and the 8 other "
            f"observations 0 (blanks 0), sample(n={n}, random_state=0) per class (MGCA/GLoRIA)"
            + (f"; fewer than {n} candidates for {', '.join(short)}" if short else ""))
    return [by_id[i] for i, _ in picked], [c for _, c in picked], desc


def evaluate(cfg, out: Path, embed_file: EmbedFile) -> dict:
    """Run every seed of ``cfg`` (an EvalConfig with task zeroshot) and return the results dict; prompts go
    through the embed-text stage (``embed_file``)."""
    protocol = cfg.zeroshot_protocol or default_protocol(cfg.dataset)
    options = dict(cfg.dataset_options)
    if protocol == "chexpert5x200":
        if cfg.dataset != "chexpert":
            raise LanguageEvalError(f"zeroshot_protocol chexpert5x200: CheXpert's 5x200 set, not {cfg.dataset}; "
                                    "use --zeroshot-protocol binary")
        records, cls, selection = five_by_200(cfg.root, cfg.zeroshot_per_class, options)
        class_names = list(CHEXPERT_TASKS)
        labels = np.eye(len(class_names), dtype=np.float32)[cls]
    else:
        spec = load_dataset(cfg.dataset, cfg.root, "cls", protocol=cfg.protocol, **options)
        split = (load_split_file(cfg.split_file, spec=spec, protocol=cfg.protocol) if cfg.split_file
                 else make_split(spec, seed=cfg.split_seed, protocol=cfg.protocol))
        by_id = {r.image_id: r for r in spec.records}
        records = [by_id[i] for i in split.test if i in by_id]
        class_names = list(spec.class_names)
        labels = labels_matrix(spec, records)
        selection = f"the test split of {cfg.dataset} ({cfg.protocol} protocol): {split.protocol}"
    if not records:
        raise LanguageEvalError(f"{cfg.dataset} at {cfg.root}: no images to evaluate")
    file_prompts = pr.load_prompts_file(cfg.prompts, class_names, protocol) if cfg.prompts else None
    ids = [r.image_id for r in records]
    images: dict[int, object] = {}
    za_cache: dict = {}
    per_seed = []
    for seed in cfg.seeds:
        t0 = time.monotonic()
        pre = load_pretrained(cfg.init, seed=seed, image_size=cfg.image_size, text_cache=cfg.text_cache)
        if pre.image_size not in images:
            images[pre.image_size] = load_images([r.path for r in records], pre.image_size)
        key = None if cfg.init == "random" else (pre.image_size, pre.crop_size)
        za = za_cache.get(key) if key is not None else None
        if za is None:
            za = pre.image_embeddings(images[pre.image_size])
            if key is not None:
                za_cache[key] = za
        model = text_model_of(pre, cfg.text_model, cfg.init)
        zt_of = functools.partial(_embed_sets, model=model, pre=pre, out=out, embed_file=embed_file)
        if protocol == "chexpert5x200":
            sets = file_prompts or pr.gloria_class_prompts(cfg.prompts_per_class, seed)
            scores, used = _class_scores(za, sets, class_names, zt_of, cfg)
            test = lm.multiclass_report(np.asarray(cls), scores.argmax(axis=1), class_names)
            test["auroc_per_class"] = {c: _auroc(labels[:, k], scores[:, k]) for k, c in enumerate(class_names)}
        else:
            sets = file_prompts or pr.binary_prompts(class_names)
            scores, used = _binary_scores(za, sets, class_names, zt_of)
            per_label = lm.auroc_per_label(labels, scores, class_names, n_resamples=cfg.bootstrap, seed=0)
            test = {"auroc": per_label["mean"], "auroc_ci": [per_label["mean_low"], per_label["mean_high"]],
                    "auroc_per_class": {c: per_label["per_label"][c]["auroc"] for c in class_names},
                    "auroc_per_class_ci": {c: [per_label["per_label"][c]["low"], per_label["per_label"][c]["high"]]
                                           for c in class_names},
                    "undefined_labels": per_label["undefined"]}
        test["n_images"] = len(records)
        predictions = f"seed-{seed}.predictions.csv"
        _write_predictions(out / "seeds" / predictions, ids, labels, scores, class_names)
        result = {"seed": seed, "test": jsonable(test), "prompts": used, "predictions": predictions,
                  "text_model": model, "pretrained": pre.describe, "seconds": round(time.monotonic() - t0, 2)}
        write_json(out / "seeds" / f"seed-{seed}.json", result)
        log.info("zeroshot %s seed %d: %s", protocol, seed,
                 f"accuracy {test['accuracy']:.4f}" if "accuracy" in test else f"mean AUROC {test['auroc']}")
        per_seed.append(result)
    primary = "accuracy" if protocol == "chexpert5x200" else "auroc"
    return {"zeroshot_protocol": protocol, "selection": selection, "class_names": class_names,
            "label_kind": "multiclass" if protocol == "chexpert5x200" else "multilabel",
            "primary_metric": primary, "per_seed": per_seed, "n_images": len(records),
            "image_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "prompt_aggregate": cfg.prompt_aggregate if protocol == "chexpert5x200" else "mean of normalised zt",
            "metric_definitions": {k: v for k, v in DEFINITIONS.items()
                                   if k in per_seed[0]["test"]}}


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _embed_sets(texts: list[str], model: str, pre, out: Path, embed_file: EmbedFile) -> np.ndarray:
    """zt of ``texts`` (rows in order), unit length."""
    emb = embed_prompts(texts, out / "prompts", model, pre.cache_attrs, embed_file, device="cpu")
    zt = pre.text_embeddings(emb)
    return zt / np.maximum(np.linalg.norm(zt, axis=1, keepdims=True), 1e-12)


def _class_scores(za, sets: dict, class_names: list[str], zt_of, cfg):
    texts = [t for c in class_names for t in sets[c]]
    zt = zt_of(texts)
    sim = cosine(za, zt)
    scores = np.empty((len(za), len(class_names)))
    k = 0
    for j, c in enumerate(class_names):
        block = sim[:, k:k + len(sets[c])]
        scores[:, j] = block.max(axis=1) if cfg.prompt_aggregate == "max" else block.mean(axis=1)
        k += len(sets[c])
    return scores, {c: list(sets[c]) for c in class_names}


def _binary_scores(za, sets: dict, class_names: list[str], zt_of):
    texts = [t for c in class_names for side in ("positive", "negative") for t in sets[c][side]]
    zt = zt_of(texts)
    probs = np.empty((len(za), len(class_names)))
    k = 0
    for j, c in enumerate(class_names):
        means = []
        for side in ("positive", "negative"):
            n = len(sets[c][side])
            m = zt[k:k + n].mean(axis=0)
            means.append(m / max(np.linalg.norm(m), 1e-12))
            k += n
        sim = cosine(za, np.stack(means))
        probs[:, j] = lm.binary_prompt_probability(sim[:, 0], sim[:, 1])
    return probs, {c: {s: list(sets[c][s]) for s in ("positive", "negative")} for c in class_names}


def _write_predictions(path: Path, ids: list[str], labels: np.ndarray, scores: np.ndarray,
                       class_names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", *(f"label:{c}" for c in class_names), *(f"score:{c}" for c in class_names)])
        for i, image_id in enumerate(ids):
            w.writerow([image_id, *(f"{v:g}" for v in labels[i]), *(repr(float(v)) for v in scores[i])])


class ZeroShotTask:
    """The registry's ``zeroshot`` entry: no training; :func:`evaluate` does the whole run."""

    name = "zeroshot"
    trains = False
    evaluate = staticmethod(evaluate)


TASK = ZeroShotTask()
