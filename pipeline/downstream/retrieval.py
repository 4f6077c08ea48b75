"""Image <-> report retrieval over held-out pairs (``eval --task retrieval``): no training.

The pairs are the images of a prepared shards folder's held-out split (``--split test``, ``validate`` or
``heldout`` for both), each with its own study's report embedding from the text cache; images go trunk ->
projector (za), reports through the trained text head (zt); scores are cosines. Reported, both ways
(``pipeline.downstream.language_metrics``):

- open_clip's ranks (mean rank, median rank, R@1/5/10), strict and with any pair of the same report text
  counting as a hit (identical texts are common: "No acute cardiopulmonary process."), with the number
  of distinct texts and what chance gives;
- the own-vs-other AUROC: each image's score with its own report against its scores with the reports
  whose text differs, averaged over images, with a bootstrap 95% interval;
- the mean true-pair alignment loss (M-FLAG's, 4 - 4 cos) beside the same loss for a constant predictor
  (every image predicts the mean projected report) and for shuffled pairs (its exact expectation), and
  the paired difference true - shuffled with its interval.

R@k is a weak yardstick for this loss (no negatives, both ends batch-normalised: a low-rank shared code
satisfies it), so alignment is judged by the loss against its baselines and the own-vs-other AUROC.
Identical report texts are recognised by identical cached embeddings (embed-text embeds each distinct
text once, so equal texts have equal rows).

Outputs: per seed ``seeds/seed-N.json``, ``seeds/seed-N.scores.npy`` (the N x N cosine matrix, image i's
report is column i) and ``seeds/seed-N.predictions.json`` (keys, study ids, text groups, and per query the
top-100 items and scores in both directions); every metric recomputes from them.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from cache import TextEmbeddingCache
from pipeline.common import atomic_path, write_json
from pipeline.downstream import language_metrics as lm
from pipeline.downstream.language import (
    TEXT_PATH_ATTRS,
    EmbedFile,
    LanguageEvalError,
    cosine,
    jsonable,
    load_pretrained,
)
from pipeline.pretrain.wds import CacheTargets, read_fixed_batch, resolve_shards

log = logging.getLogger(__name__)

SPLITS = ("test", "validate", "heldout")
TOP = 100
DEFINITIONS = {
    "own_vs_other_auroc": "per image, the AUROC of its score with its own report against its scores with the "
                          "reports of other text; mean over images",
    "R@k": "share of queries whose true item ranks < k (open_clip get_clip_metrics; ties: lower index first)",
    "R@k_same_text": "share of queries with any item of the same report text ranked < k",
    "mean_rank": "mean 0-based rank + 1 (open_clip)",
    "median_rank": "floor(median 0-based rank) + 1 (open_clip)",
    "align_true_pair": "mean over pairs of M-FLAG's alignment loss 4 - 4 cos(za, zt)",
    "align_constant": "the same loss when every image predicts the mean projected report",
    "align_shuffled": "its expectation over random pairings (mean over all non-matching pairs)",
    "P@K": "with --retrieval-labels: GLoRIA's class-based Precision@K over the pairs whose study has exactly "
           "one CheXpert competition finding (share of the top K retrieved of the query's class); chance_P is "
           "the mean share of the query's class among those pairs",
}


def _shard_urls(shards: str, split: str) -> list[str]:
    parts = ("validate", "test") if split == "heldout" else (split,)
    urls: list[str] = []
    for part in parts:
        try:
            urls += list(resolve_shards(shards, part).urls)
        except Exception as e:  # resolve_shards names the folder; one line either way
            raise LanguageEvalError(f"--shards {shards}: no {part} shards ({e})") from e
    if not urls:
        raise LanguageEvalError(f"--shards {shards}: no {split} shards")
    return urls


def evaluate(cfg, out: Path, embed_file: EmbedFile) -> dict:
    """Run every seed of ``cfg`` (an EvalConfig with task retrieval) and return the results dict. The
    reports' embeddings come from the training cache, so ``embed_file`` (the embed-text stage) is unused."""
    if not cfg.shards:
        raise LanguageEvalError("retrieval: give --shards (a prepare output folder)")
    per_seed = []
    batch = None
    za_cache = None
    for seed in cfg.seeds:
        t0 = time.monotonic()
        pre = load_pretrained(cfg.init, seed=seed, image_size=cfg.image_size, text_cache=cfg.text_cache)
        cache_path = cfg.text_cache or pre.text_cache
        if not cache_path:
            raise LanguageEvalError(f"{cfg.init}: no text cache known; give --text-cache")
        cache = TextEmbeddingCache(cache_path)
        if pre.cache_attrs and pre.cache_attrs.get("fingerprint") != cache.attrs.get("fingerprint"):
            diffs = [k for k in TEXT_PATH_ATTRS if pre.cache_attrs.get(k) != cache.attrs.get(k)]
            if diffs:
                raise LanguageEvalError(f"--text-cache {cache.path}: made with another text path than the run's "
                                        f"training cache ({', '.join(diffs)} differ)")
        if batch is None:
            urls = _shard_urls(cfg.shards, cfg.split)
            batch = read_fixed_batch(urls, CacheTargets(cache.path), cfg.max_images, pre.image_size)
            if batch is None or len(batch["key"]) < 2:
                raise LanguageEvalError(f"--shards {cfg.shards}: fewer than 2 {cfg.split} images with a report in "
                                        f"{cache.path}")
            log.info("retrieval: %d %s images of %d studies", len(batch["key"]), cfg.split,
                     len(set(batch["study_id"])))
        t = batch["target"].numpy()
        if cfg.init == "random" or za_cache is None:
            za = pre.image_embeddings(batch["image"])
            if cfg.init != "random":
                za_cache = za
        else:
            za = za_cache
        zt = pre.text_embeddings(t)
        groups = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()[:16] for row in t]
        scores = cosine(za, zt)
        test = _metrics(scores, groups, za, zt, cfg.bootstrap)
        if cfg.retrieval_labels:
            test.update(_precision_at_k(scores, list(batch["study_id"]), cfg.retrieval_labels))
        stem = f"seed-{seed}"
        with atomic_path(out / "seeds" / f"{stem}.scores.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, scores.astype(np.float32))
        write_json(out / "seeds" / f"{stem}.predictions.json", _predictions(scores, batch, groups))
        result = {"seed": seed, "test": jsonable(test), "predictions": f"{stem}.predictions.json",
                  "scores": f"{stem}.scores.npy", "pretrained": pre.describe, "text_cache": str(cache.path),
                  "seconds": round(time.monotonic() - t0, 2)}
        write_json(out / "seeds" / f"{stem}.json", result)
        log.info("retrieval seed %d: own-vs-other AUROC %.4f, true-pair loss %.3f (constant %.3f, shuffled %.3f), "
                 "image->text R@1 %.4f", seed, test["own_vs_other_auroc"], test["align_true_pair"],
                 test["align_constant"], test["align_shuffled"], test["image_to_text_R@1"])
        per_seed.append(result)
    return {"primary_metric": "own_vs_other_auroc", "per_seed": per_seed, "n_images": len(batch["key"]),
            "n_studies": len(set(batch["study_id"])), "split": cfg.split, "shards": str(cfg.shards),
            "image_ids_sha256": hashlib.sha256("\n".join(batch["key"]).encode()).hexdigest(),
            "metric_definitions": DEFINITIONS}


def _metrics(scores: np.ndarray, groups: list[str], za: np.ndarray, zt: np.ndarray, n_boot: int) -> dict:
    """Flat metric names (the eval summary's) plus the details."""
    r = lm.retrieval_metrics(scores, groups)
    own = lm.own_vs_other_auroc(scores, groups)
    own_ci = lm.bootstrap_mean_ci([v for v in own["per_query"] if v is not None], n_resamples=n_boot, seed=0)
    align = lm.alignment_baselines(za, zt, n_resamples=n_boot, seed=0)
    test: dict = {"own_vs_other_auroc": own["mean"], "own_vs_other_auroc_ci": [own_ci["low"], own_ci["high"]],
                  "n_pairs": len(groups), "n_distinct_texts": len(set(groups))}
    for direction in ("image_to_text", "text_to_image"):
        for k, v in r[direction].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                test[f"{direction}_{k}"] = v
    for k, v in r["chance"].items():
        test[f"chance_{k}"] = v
    for name in ("true_pair", "constant", "shuffled", "true_minus_shuffled"):
        test[f"align_{name}"] = align[name]["mean"]
        test[f"align_{name}_ci"] = [align[name]["low"], align[name]["high"]]
    test["details"] = {"retrieval": r, "own_vs_other": {k: v for k, v in own.items() if k != "per_query"},
                       "alignment": align}
    return test


COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def read_study_classes(path: str | Path) -> dict[str, int]:
    """study_id -> the CheXpert competition finding (index in ``COMPETITION``) that is its only positive
    (1.0) among the five, from a CSV (or .csv.gz) with ``study_id`` and those columns, e.g. MIMIC-CXR's
    ``mimic-cxr-2.0.0-chexpert.csv.gz``; studies with none or several positives are left out."""
    import csv
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, int] = {}
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("study_id", *COMPETITION) if c not in (reader.fieldnames or [])]
            if missing:
                raise LanguageEvalError(f"--retrieval-labels {path}: no column(s) {', '.join(missing)}")
            for row in reader:
                pos = [k for k, c in enumerate(COMPETITION) if (row[c] or "").strip() in ("1", "1.0")]
                if len(pos) == 1:
                    out[str(row["study_id"]).strip()] = pos[0]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LanguageEvalError(f"--retrieval-labels {path}: cannot read ({e})") from e
    return out


def _precision_at_k(scores: np.ndarray, studies: list[str], labels: str) -> dict:
    """GLoRIA's class-based Precision@K over the pairs whose study has exactly one competition finding:
    queries and items are those pairs, and a retrieved report counts when its class is the query's."""
    classes = read_study_classes(labels)
    keep = [i for i, s in enumerate(studies) if s in classes]
    if len(keep) < 2:
        return {"precision_at_k_note": f"fewer than 2 held-out pairs with a single competition finding in {labels}"}
    cls = np.array([classes[studies[i]] for i in keep])
    sub = scores[np.ix_(keep, keep)]
    p = lm.class_precision_at_k(sub, cls, cls, ks=(5, 10, 100))
    share = np.bincount(cls, minlength=len(COMPETITION)) / len(cls)
    out = {f"image_to_text_{k}": v for k, v in p.items() if k.startswith("P@")}
    out.update({f"text_to_image_{k}": v for k, v in lm.class_precision_at_k(sub.T, cls, cls, ks=(5, 10, 100)).items()
                if k.startswith("P@")})
    out.update(n_pairs_with_class=len(keep), chance_P=float((share[cls]).mean()))
    return out


def _predictions(scores: np.ndarray, batch: dict, groups: list[str]) -> dict:
    def top(m: np.ndarray) -> list[dict]:
        k = min(TOP, m.shape[1])
        order = np.argsort(-m, axis=1, kind="stable")[:, :k]
        return [{"query": i, "top": order[i].tolist(), "scores": [float(m[i, j]) for j in order[i]]}
                for i in range(m.shape[0])]

    return {"keys": list(batch["key"]), "study_ids": list(batch["study_id"]), "text_groups": groups,
            "scores_file": "the .scores.npy beside this file: image i (row) against report j (column)",
            "image_to_text": top(scores), "text_to_image": top(scores.T)}


class RetrievalTask:
    """The registry's ``retrieval`` entry: no training; :func:`evaluate` does the whole run."""

    name = "retrieval"
    trains = False
    evaluate = staticmethod(evaluate)


TASK = RetrievalTask()
