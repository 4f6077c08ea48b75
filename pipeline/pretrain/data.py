"""The data side of pre-training: what train-vision reads, how much, and what it has consumed.

``open_train_data`` resolves the training shards, the batch per process and the steps per epoch, and
checks that there are enough shards for every loader process. ``open_targets`` opens what images are
joined to by study_id (the text cache, or the report texts and the text encoder in online mode) and
fails early when they come from another prepare output than the shards. ``DataPos`` is where a rank's
stream stands (per logical worker: raw samples consumed) with its bad-sample counters; it goes into
every checkpoint, so a resumed run skips exactly what it had read; ``stream`` yields the batches from
there on, across epochs. ``load_probe_set`` reads the held-out images the probes embed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from cache import TextEmbeddingCache
from pipeline.common import ConfigError
from pipeline.distributed import DistInfo, all_gather_object, any_rank
from pipeline.pretrain import wds as wdsp
from pipeline.pretrain.step import batch_per_rank
from pipeline.text.models import OnlineTextEncoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training shards and the sizes derived from them (per rank and global)."""

    train: wdsp.ShardSet
    num_samples: int  # training samples per epoch
    local_batch: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training stream's options (``TrainVisionConfig.data_settings``), fields named as the
    train-vision options they come from; ``splits``: the splits of a prepare output trained on (``--pairs``)."""

    shards: str
    splits: tuple[str, ...] = ("train",)
    num_samples: int | None = None
    batch_size: int = 128
    batch_semantics: str = "global"
    max_steps: int | None = None
    epochs: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 1000
    image_size: int = 256
    on_missing: str = "skip"
    max_bad_fraction: float = 0.01
    seed: int = 0


def open_train_data(d: DataSettings, dist: DistInfo) -> TrainData:
    """Resolve ``d.shards`` (the ``d.splits`` of a prepare output) and size the run; raises ConfigError /
    DataError naming the option to change."""
    splits, num_workers = d.splits, d.num_workers
    train = (wdsp.resolve_shards(d.shards, "train") if splits == ("train",)
             else wdsp.resolve_splits(d.shards, splits))
    _check_shard_files(train, dist)
    n = d.num_samples or train.num_samples
    if n is None:
        raise ConfigError("num_samples: the shards have no sizes.json; pass --num-samples "
                          "(training samples per epoch)")
    try:
        local_batch, global_batch = batch_per_rank(d.batch_size, d.batch_semantics, dist.world_size)
    except ValueError as e:
        raise ConfigError(f"batch_size: {e} (or use --batch-semantics per-process)") from e
    if local_batch < 2:
        raise ConfigError(f"batch_size: {local_batch} per rank; BatchNorm in the projector needs at least 2")
    steps_per_epoch = max(1, n // global_batch)
    total_steps = d.max_steps or d.epochs * steps_per_epoch
    slots = dist.world_size * max(1, num_workers)
    if len(train.urls) < slots:
        fix = ("lower --num-workers or re-shard" if num_workers > 1 else
               "use fewer ranks or re-shard") + " with a smaller --shard-size in prepare"
        raise wdsp.DataError(
            f"{len(train.urls)} training shard(s) for {dist.world_size} rank(s) x "
            f"{max(1, num_workers)} loader process(es) each: need at least {slots} so every one reads "
            f"its own shards ({fix})")
    return TrainData(train, n, local_batch, global_batch, steps_per_epoch, total_steps)


def _check_shard_files(train: wdsp.ShardSet, dist: DistInfo) -> None:
    """Every training shard against prepare's record of it (``wds.check_shard_files``), the work split
    over the ranks; the first problem any rank found stops every rank with the same line."""
    if not train.digests:
        if train.manifest is not None and dist.is_main:
            log.warning("%s has no shard digests (written by an older prepare): the shards are not checked "
                        "before training; rerun prepare on its folder to add them (nothing is re-encoded)",
                        train.manifest)
        return
    t0 = time.perf_counter()
    problem, nbytes = wdsp.check_shard_files(train, dist.rank, dist.world_size, threads=min(8, os.cpu_count() or 1))
    found = [p for p in all_gather_object(problem, dist) if p is not None]
    if found:
        raise wdsp.DataError(found[0])
    if dist.is_main:
        log.info("%d training shard(s) checked against %s (%.1f MB hashed on rank 0 in %.1f s)", len(train.urls),
                 train.manifest, nbytes / 1e6, time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class Targets:
    """What images are joined to: ``targets`` (``wds.CacheTargets`` or ``wds.ReportTexts``), the online
    text encoder (``textmodels.OnlineTextEncoder``; None with a cache), the text dimension, the text
    encoder's parameter count if known, and its model id."""

    targets: object
    encoder: object | None
    text_dim: int
    text_params: int | None
    text_model_id: str
    identity: str | None = None  # the text cache's content identity (TextEmbeddingCache.identity)


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """Where the images' targets come from (``TrainVisionConfig.text_settings``), fields named as the
    train-vision options they come from."""

    text_mode: str = "cache"
    text_cache: str | None = None
    reports: str | None = None
    text_model: str | None = None
    text_max_length: int = 512
    text_pooling: str = "cls"
    unfreeze_last: int | str = 0


def open_targets(t: TextSettings, urls: list[str], *, is_main: bool) -> Targets:
    """The text cache (``t.text_mode`` "cache"), or the report texts and the text encoder loaded as
    embed-text loads it (``pipeline.text.models``; "online": ``t.text_max_length`` tokens, ``t.text_pooling``,
    the last ``t.unfreeze_last`` layers trainable). Fails before loading a model when the first samples of
    the training shards ``urls`` have no target (:func:`check_targets_cover`)."""
    text_cache, reports, text_model = t.text_cache, t.reports, t.text_model
    if t.text_mode == "cache":

        cache = TextEmbeddingCache(text_cache)
        t0 = time.perf_counter()
        nbytes = cache.check_files()  # every rank: a damaged or foreign shard stops them all alike
        if is_main:
            log.info("text cache %s: %d shard(s), %.1f MB checked against index.json in %.1f s", cache.path,
                     cache.n_shards, nbytes / 1e6, time.perf_counter() - t0)
            log.info("text cache %s: %d reports, dim %d", cache.path, len(cache), cache.dim)
            for k in sorted(cache.attrs):
                log.debug("  cache attr %s = %s", k, cache.attrs[k])
        targets = wdsp.CacheTargets(str(cache.path))
        check_targets_cover(urls, targets, f"text cache {text_cache}", is_main)
        return Targets(targets, None, cache.dim, cache.attrs.get("text_encoder_params"),
                       cache.attrs.get("model_id", "?"), cache.identity)
    targets = wdsp.ReportTexts(wdsp.read_reports(reports))
    check_targets_cover(urls, targets, f"reports {reports}", is_main)
    text = OnlineTextEncoder.from_pretrained(text_model, t.text_max_length, t.text_pooling, t.unfreeze_last)
    return Targets(targets, text, text.dim, sum(p.numel() for p in text.encoder.parameters()), text_model)


def check_targets_cover(urls: list[str], targets, source: str, is_main: bool) -> None:
    """Fail when none of the first samples of ``urls`` has a target in ``source``; warn when some lack one."""
    found, read, missing = wdsp.check_targets_cover(urls, targets)
    if read and not found:
        raise wdsp.DataError(
            f"none of the first {read} samples of {urls[0]} has a report in the {source} "
            f"(study_ids such as {', '.join(missing)}): the targets were built from another prepare "
            "output, or spell study ids differently (prepare writes digits without the 's' prefix)")
    if read and found < read and is_main:
        log.warning("%d of the first %d samples of %s have no report in the %s and will be skipped "
                    "(e.g. study_id %s)", read - found, read, urls[0], source, missing[0])


@dataclasses.dataclass
class DataPos:
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

    def state(self) -> dict:
        """The checkpoint entry of this rank (plain values)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "workers": dict(self.workers),
                "raw": self.raw, "missing": self.missing, "corrupt": self.corrupt, "lost": self.lost,
                "lost_shards": dict(self.lost_shards), "shards_seen": sorted(self.shards_seen)}

    @classmethod
    def from_state(cls, d: dict) -> DataPos:
        """The inverse of :meth:`state` (checkpoints written before ``lost`` existed have none)."""
        return cls(epoch=d["epoch"], step_in_epoch=d["step_in_epoch"],
                   workers={int(k): int(v) for k, v in d["workers"].items()}, raw=d["raw"],
                   missing=d["missing"], corrupt=d["corrupt"], lost=int(d.get("lost", 0)),
                   lost_shards=dict(d.get("lost_shards", {})), shards_seen=set(d["shards_seen"]))

    def counts(self) -> dict:
        """This rank's sample counters and the shards it read (for the summary)."""
        return {"raw": self.raw, "missing": self.missing, "corrupt": self.corrupt, "lost": self.lost,
                "shards": sorted(self.shards_seen)}

    @staticmethod
    def sum_counts(counts: list[dict]) -> dict:
        """summary.json's counters from every rank's :meth:`counts`."""
        return {"samples_read": sum(c["raw"] for c in counts), "missing": sum(c["missing"] for c in counts),
                "corrupt": sum(c["corrupt"] for c in counts), "lost": sum(c["lost"] for c in counts),
                "shards_per_rank": [c["shards"] for c in counts]}

    def account(self, batch: dict) -> str | None:
        """Fold a batch's position and counters in; returns a fatal data error or None."""
        if "error" in batch:
            return batch["error"]
        meta = batch["meta"]
        self.raw += meta["raw"] - self.workers.get(meta["worker"], 0)
        self.workers[meta["worker"]] = meta["raw"]
        self.missing += meta["missing"]
        self.corrupt += meta["corrupt"]
        self.lost += meta.get("lost", 0)
        for name, n in meta.get("lost_shards", {}).items():
            self.lost_shards[name] = self.lost_shards.get(name, 0) + n
        self.shards_seen.update(Path(u).name for u in batch["urls"])
        return None

    def check_bad(self, final: bool, sized: bool, max_bad_fraction: float, rank: int) -> None:
        """Raise DataError once bad samples exceed ``max_bad_fraction`` of those the shards should have
        yielded (judged over at least 1000 samples, or at the end of an epoch or run). Bad: corrupt
        samples, and every sample a damaged shard lost (``sized``: sizes.json lists more than it yielded)."""
        expected = self.raw + self.lost + (0 if sized else self.corrupt)
        bad = self.corrupt + self.lost
        if not (expected and (final or expected >= 1000) and bad / expected > max_bad_fraction):
            return
        parts = []
        if self.lost:
            worst = sorted(self.lost_shards.items(), key=lambda kv: (-kv[1], kv[0]))
            parts.append(f"{self.lost} samples lost in damaged shard(s) "
                         f"{', '.join(f'{name} ({n} missing)' for name, n in worst[:3])}"
                         f"{' and others' if len(worst) > 3 else ''}: they yield fewer samples than sizes.json lists "
                         f"(truncated or damaged); rerun prepare on their output folder, it rebuilds them")
        if self.corrupt:
            parts.append(f"{self.corrupt} corrupt samples or unreadable shard parts (the warnings above name the "
                         f"shards and keys; rerun prepare or remove them)")
        raise wdsp.DataError(f"{'; '.join(parts)}: {bad} bad of {expected} samples on rank {rank} "
                             f"({100 * bad / expected:.1f}% > {100 * max_bad_fraction:g}%)")


def epoch_loader(train: wdsp.ShardSet, targets, pos: DataPos, d: DataSettings, *, dist: DistInfo, batch: int,
                 sample_aug, pin_memory: bool):
    """The DataLoader of this rank for the epoch ``pos`` stands in, continuing where ``pos`` says: each
    logical worker skips the raw samples it had consumed, and the worker rotation resumes at
    ``pos.step_in_epoch`` (``pipeline.pretrain.wds``). ``batch``: samples per process."""
    nw = max(1, d.num_workers)
    state = wdsp.StreamState(seed=d.seed, epoch=pos.epoch, rank=dist.rank, world_size=dist.world_size,
                             rotation=pos.step_in_epoch % nw, skip=dict(pos.workers))
    pipe = wdsp.train_pipeline(list(train.urls), state, targets, batch, d.image_size, d.on_missing,
                               d.shuffle_buffer, sample_aug, sizes=train.sizes, channels=train.channels)
    return wdsp.make_loader(pipe, d.num_workers, pin_memory=pin_memory)


def stream(train: wdsp.ShardSet, targets, pos: DataPos, d: DataSettings, *, steps: int, steps_per_epoch: int,
           window: dict, dist: DistInfo, **loader) -> Iterator[dict]:
    """The next ``steps`` batches of this rank from where ``pos`` stands, each folded into ``pos`` (its
    counters, and one more ``step_in_epoch``) before it is yielded. At an epoch's end the bad samples
    are judged (:meth:`DataPos.check_bad`) and the next epoch's loader starts (:func:`epoch_loader`, with
    ``loader`` its other arguments); seconds spent waiting for a batch add to ``window["wait"]``, and a data error
    on any rank stops every rank. Close the generator (``contextlib.closing``) to stop the loader's workers early."""
    while steps > 0:
        if pos.step_in_epoch >= steps_per_epoch:
            pos.check_bad(True, bool(train.sizes), d.max_bad_fraction, dist.rank)
            pos.epoch, pos.step_in_epoch, pos.workers = pos.epoch + 1, 0, {}
        it = iter(epoch_loader(train, targets, pos, d, dist=dist, **loader))
        try:
            while pos.step_in_epoch < steps_per_epoch and steps > 0:
                t0 = time.perf_counter()
                batch = next(it)
                window["wait"] += time.perf_counter() - t0
                error = pos.account(batch)
                if any_rank(error is not None, dist):
                    raise wdsp.DataError(error or "another rank stopped on a data error")
                pos.step_in_epoch += 1
                steps -= 1
                yield batch
        finally:
            del it  # the loader's worker processes stop with it


def load_probe_set(train: wdsp.ShardSet, targets, *, probe_shards: str | None, want: int, image_size: int,
                   pairs: str, probe_size: int, probe_every: int, is_main: bool) -> tuple[dict | None, bool | None]:
    """``(probe set or None, whether it is held out)``: the first ``want`` usable images of
    ``probe_shards``, else of the validate then test shards beside ``train`` (pre-training never reads
    either), with one report per study; each image is matched to its own study's report. Rank 0 alone
    probes: elsewhere, and when ``want`` < 2, ``(None, None)``."""
    if not is_main or want < 2:
        return None, None
    channels = train.channels
    if probe_shards:
        probe = wdsp.resolve_shards(probe_shards, "validate")
        urls, channels = list(probe.urls), probe.channels
    else:
        urls = wdsp.heldout_shards(train, "validate") + wdsp.heldout_shards(train, "test")
    if not urls:
        log.warning("no held-out (validate-*/test-*) shards beside the training shards and no "
                    "--probe-shards: probes disabled")
        return None, None
    held_out = not set(urls) & set(train.urls)
    if not held_out:
        # --pairs all trains on validate/test too: the probes then measure training images, which
        # still shows collapse (effective rank, spectrum) but flatters retrieval.
        log.warning("the probe images (%s ...) are also training images (--pairs %s); pass --probe-shards "
                    "with other images to probe held-out data", Path(urls[0]).name, pairs)
    batch = wdsp.read_fixed_batch(urls, targets, want, image_size, channels)
    if batch is None or len(batch["key"]) < 2:
        log.warning("the held-out shards %s have fewer than 2 usable samples: probes disabled", urls[:2])
        return None, held_out
    n = len(batch["key"])
    if n < want:
        log.warning("the held-out shards hold only %d usable images; the probes use %d instead of %d "
                    "(ranks are bounded by N - 1)", n, n, want)
    studies = sorted(set(batch["study_id"]))
    index = {s: i for i, s in enumerate(studies)}
    log.info("probe set: %d held-out images of %d studies from %d shard(s); %d in the probe every %d "
             "steps", n, len(studies), len(urls), min(n, probe_size), probe_every)
    return ({"image": batch["image"], "text": targets.fetch(studies),
             "targets": [index[s] for s in batch["study_id"]], "study_id": list(batch["study_id"]),
             "studies": studies}, held_out)


def probe_subset(probe: dict, n: int) -> dict:
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
