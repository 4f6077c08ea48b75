"""The pre-training data pipeline as webdataset stages.

One readable list (see :func:`train_pipeline`)::

    EpochShards        shards of this (rank, worker), resampled epoch after epoch (never ends)
    ShardSamples       webdataset's tar reader, one shard at a time; a shard that yields fewer samples
                       than sizes.json lists (truncated, damaged) counts every missing one as lost
    Shuffle            a shuffle buffer
    FastForward        numbers the raw samples; on resume drops the ones already trained on, undecoded
    Decode             PNG/JPEG -> uint8 H x W, JSON -> metadata; corrupt samples counted and skipped
    JoinText           the study's cached report embedding (or report text), joined by study_id
    Augment            (CPU path only) the augmentation recipe, per sample
    Batch              fixed-size batches carrying the worker's position and skip counters

Every random choice is a pure function of (seed, epoch, rank, logical worker, sample number), so the
order of batches is reproducible and a resumed run can fast-forward to where it stopped without
decoding the samples it skips. Each stage is a module-level class: the pipeline pickles into
DataLoader workers. The main process takes exactly ``steps_per_epoch`` batches per epoch from the
loader (the stream itself is endless), so the number of steps never depends on shard boundaries.

Logical workers: the DataLoader hands out batches round-robin, batch i coming from worker i % W. A run
resumed at step s of an epoch sets ``rotation = s % W`` so that physical worker p plays logical worker
(p + rotation) % W and batch s again comes from the logical worker it came from before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cache import TextEmbeddingCache
from pipeline.common import (
    MflagError,
    RateLimitedLog,
    file_sha256,
    read_json,
    read_text_utf8,
    replace_surrogates,
    unsafe_id_reason,
)
from pipeline.imaging import resize_u8
from pipeline.preempt import ignore_in_worker

log = logging.getLogger(__name__)

IMAGE_EXTS = ("npy", "png", "jpg", "jpeg")


class DataError(MflagError):
    """Shards or their samples cannot be used (missing, too few, too many bad samples)."""


def _webdataset():
    """The webdataset module, imported where a pipeline is built rather than with this module: the
    stage classes, shard discovery of local folders, ``cli.py train-vision --help`` and the benchmarks
    then work where webdataset is not installed (a GPU machine without network), and a missing
    package is one clear error at the point of use."""
    try:
        import webdataset
    except ImportError as e:
        raise MflagError(
            f"webdataset is not installed ({e}); install it with `pip install webdataset` (it brings "
            "braceexpand), or offline from wheels: `pip install --no-index --find-links .whl webdataset "
            "braceexpand` (README, 'GPU machines')") from e
    return webdataset


# --------------------------------------------------------------------------- stream state
@dataclasses.dataclass
class StreamState:
    """What every stage of one pipeline copy shares. Pickled into each worker, so the counters are
    per-worker; batches carry them back to the main process."""

    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    rotation: int = 0
    # logical worker -> number of raw samples already consumed this epoch (resume fast-forward)
    skip: dict = dataclasses.field(default_factory=dict)
    # counters since the last batch (worker-local after pickling)
    raw: int = 0
    missing: int = 0
    corrupt: int = 0
    lost: int = 0  # samples sizes.json lists that a shard did not yield
    lost_shards: dict = dataclasses.field(default_factory=dict)  # shard name -> samples lost
    first_missing: str | None = None

    def reset_counters(self) -> None:
        self.missing = self.corrupt = self.lost = 0
        self.lost_shards = {}

    def worker(self) -> tuple[int, int]:
        """(logical worker id, number of workers) of the calling process."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.rotation) % info.num_workers, info.num_workers


def stream_seed(seed: int, epoch: int, rank: int, worker: int, salt: str, index: int = 0) -> int:
    """A 63-bit seed that depends on every argument (hash-based, so nearby inputs are uncorrelated)."""
    h = hashlib.sha256(f"{seed}/{epoch}/{rank}/{worker}/{salt}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# --------------------------------------------------------------------------- shard lists
def assign_shards(urls: list[str], rank: int, world_size: int, worker: int, n_workers: int,
                  shuffle_seed: int | None = None) -> list[str]:
    """The shards one (rank, worker) reads: split by node, then by worker (disjoint, all used).

    With ``shuffle_seed`` (the same on every rank) the list is permuted first. Every worker yields
    the same number of samples per epoch, so a worker holding fewer shards repeats its images while
    one holding more leaves some unseen; drawing the assignment afresh each epoch spreads that over
    all shards instead of favouring the same images every epoch.
    """
    if shuffle_seed is not None:
        urls = list(urls)
        random.Random(shuffle_seed).shuffle(urls)
    mine = urls[rank::world_size][worker::n_workers]
    if not mine:
        raise DataError(f"{len(urls)} shards cannot feed {world_size} rank(s) x {n_workers} worker(s); "
                        f"rank {rank} worker {worker} got none")
    return mine


class EpochShards(IterableDataset):
    """First stage: endless ``{"url": ...}`` for this rank and logical worker, a fresh seeded
    permutation of its shards each pass (resampling without replacement within a pass)."""

    def __init__(self, urls: list[str], state: StreamState):
        self.urls = list(urls)
        self.state = state

    def __iter__(self) -> Iterator[dict]:
        st = self.state
        w, nw = st.worker()
        mine = assign_shards(self.urls, st.rank, st.world_size, w, nw,
                             shuffle_seed=stream_seed(st.seed, st.epoch, 0, 0, "assign"))
        rng = random.Random(stream_seed(st.seed, st.epoch, st.rank, w, "shards"))
        while True:
            order = list(mine)
            rng.shuffle(order)
            for url in order:
                yield {"url": url}


class CountingHandler:
    """webdataset error handler: a broken tar (truncated, unreadable) is counted and skipped."""

    def __init__(self, state: StreamState):
        self.state = state
        self._warn = RateLimitedLog("unreadable shard data skipped", logger=log)

    def __call__(self, exn: Exception) -> bool:
        self.state.corrupt += 1
        self._warn(f"{type(exn).__name__}: {str(exn)[:300]}")
        return True


class ShardSamples:
    """Shards -> raw samples with webdataset's tar reader, one shard at a time, so each shard's yield
    is compared with its count in ``sizes.json``. A tar that ends early or holds fewer samples than
    listed loses samples that no decoding error would ever report: each missing one is counted in
    ``state.lost`` under the shard's name. Without a listed size a broken tar counts one corrupt read."""

    def __init__(self, state: StreamState, sizes: dict[str, int] | None = None):
        self.state, self.sizes = state, dict(sizes or {})
        self._warn = RateLimitedLog("shard with missing samples", logger=log)
        self._warn_unsized = RateLimitedLog("unreadable shard data skipped", logger=log)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        st = self.state
        for item in src:
            url = item["url"]
            name = Path(url).name
            errors: list[Exception] = []

            def handler(exn: Exception) -> bool:
                errors.append(exn)  # noqa: B023 (used within this iteration only)
                return True  # skip what cannot be read and go on; the count below says how much

            n = 0
            for sample in tarfile_samples([{"url": url}], handler=handler):
                n += 1
                yield sample
            expected = self.sizes.get(name)
            if expected is not None and n < expected:
                st.lost += expected - n
                st.lost_shards[name] = st.lost_shards.get(name, 0) + expected - n
                why = f" ({type(errors[0]).__name__}: {str(errors[0])[:150]})" if errors else ""
                self._warn(f"{url}: {n} of the {expected} samples sizes.json lists were readable{why}; the shard is "
                           "truncated or damaged (rerun prepare on its output: it rebuilds shards whose size changed)")
            elif errors:
                st.corrupt += len(errors)
                for e in errors:
                    self._warn_unsized(f"{url}: {type(e).__name__}: {str(e)[:300]}")


class Shuffle:
    """Shuffle buffer with a (seed, epoch, rank, worker)-determined RNG."""

    def __init__(self, state: StreamState, bufsize: int = 1000, initial: int = 100):
        self.state, self.bufsize, self.initial = state, int(bufsize), int(min(initial, bufsize))

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        st = self.state
        if self.bufsize <= 1:
            yield from src
            return
        w, _ = st.worker()
        rng = random.Random(stream_seed(st.seed, st.epoch, st.rank, w, "shuffle"))
        buf: list[dict] = []
        for i, sample in enumerate(src):
            buf.append(sample)
            if len(buf) < self.initial:
                continue
            if len(buf) < self.bufsize and i % 2 == 0:
                continue  # below capacity the buffer grows by one sample every two
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
        while buf:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()


class FastForward:
    """Numbers raw samples (1, 2, ...) per logical worker and drops the first ``state.skip[worker]``
    without decoding them. Counters restart once the skip is done: the skipped samples' misses and
    errors were counted by the run that trained on them."""

    def __init__(self, state: StreamState):
        self.state = state

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        st = self.state
        w, _ = st.worker()
        skip = int(st.skip.get(w, st.skip.get(str(w), 0)))
        n = 0
        for sample in src:
            n += 1
            if n <= skip:
                if n == skip:
                    st.reset_counters()
                continue
            if n == 1:
                st.reset_counters()
            st.raw = n
            sample["__raw__"] = n
            yield sample


def decode_image(data: bytes, ext: str = "png", channels: int = 1) -> np.ndarray:
    """PNG/JPEG bytes, or the ``.npy`` bytes of a uint8 array (``prepare --format raw``) -> uint8 H x W,
    or H x W x 3 with ``channels`` 3 (shards of ``prepare pairs --channels 3``).

    With one channel, colour images are converted to grey. ``.npy`` is read without pickle and needs no
    decoding, which is what makes raw shards the cheapest input for the loader.
    """
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8:
            raise ValueError(f"npy image has dtype {arr.dtype}, expected uint8")
        if channels == 3 and arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return np.array(arr)  # writable, owns its memory
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if channels == 3:
            return np.array(im.convert("RGB"))
        if im.mode not in ("L", "I;16", "I"):
            im = im.convert("L")
        arr = np.array(im)  # a writable copy: torch.from_numpy warns on read-only arrays
    if arr.dtype != np.uint8:  # 16-bit PNGs: keep the top 8 bits of the used range
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5).astype(np.uint8)
    return arr


class Decode:
    """Raw tar sample -> ``{"key", "study_id", "image" (uint8 H x W at image_size; H x W x 3 with
    ``channels`` 3), "url", "raw"}``.

    A sample without image or JSON, an undecodable image or JSON without study_id is counted as corrupt
    and skipped."""

    def __init__(self, state: StreamState, image_size: int, channels: int = 1):
        self.state, self.image_size, self.channels = state, int(image_size), int(channels)
        self._warn = RateLimitedLog("corrupt sample skipped", logger=log)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            out = self._decode(sample)
            if out is not None:
                yield out

    def _decode(self, sample: dict) -> dict | None:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None or "json" not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"needs an image and a json member, has {members}")
            meta = json.loads(sample["json"])
            study = meta.get("study_id")
            if study is None:
                raise ValueError("json has no study_id")
            img = decode_image(sample[ext], ext, self.channels)
            if img.ndim != (2 if self.channels == 1 else 3):
                raise ValueError(f"image has shape {img.shape}")
            if img.shape[:2] != (self.image_size, self.image_size):
                img = resize_u8(img, self.image_size)  # PIL bilinear, antialiased when shrinking
        except Exception as e:  # any decoding failure is a data problem of this one sample
            self.state.corrupt += 1
            self._warn(f"{url} sample {key}: {type(e).__name__}: {str(e)[:200]}")
            return None
        return {"key": key, "study_id": str(study), "image": img, "url": url, "raw": sample.get("__raw__", 0)}


# --------------------------------------------------------------------------- text side
class CacheTargets:
    """Report embeddings from a text-embedding cache, opened lazily in each process (HDF5 handles do
    not survive fork)."""

    kind = "cache"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._cache = None

    def __getstate__(self):
        return {"path": self.path, "_cache": None}

    @property
    def cache(self):
        if self._cache is None:

            self._cache = TextEmbeddingCache(self.path)
        return self._cache

    def __contains__(self, study_id: str) -> bool:
        return study_id in self.cache

    def fetch(self, study_ids: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.cache.lookup(list(study_ids)), dtype=np.float32))


class ReportTexts:
    """Report texts by study_id (online text mode): ``fetch`` returns the list of strings."""

    kind = "text"

    def __init__(self, texts: dict[str, str]):
        self.texts = dict(texts)

    def __contains__(self, study_id: str) -> bool:
        return study_id in self.texts

    def fetch(self, study_ids: list[str]) -> list[str]:
        return [self.texts[s] for s in study_ids]


def read_reports(path: str | os.PathLike) -> dict[str, str]:
    """``reports.jsonl`` (prepare's output) -> {study_id: text}; a bad line is an error naming it."""

    path = Path(path)
    out: dict[str, str] = {}
    try:
        text = read_text_utf8(path)
    except OSError as e:
        raise DataError(f"cannot read reports {path}: {e}") from e
    replaced: list[int] = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            clean, n = replace_surrogates(str(row["text"]))
            out[str(row["study_id"])] = clean
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} line {i}: expected JSON with study_id and text ({e})") from e
        if n:
            replaced.append(i)
    if replaced:
        log.warning("%s: %d report(s) held lone UTF-16 surrogates (e.g. line %d), replaced by U+FFFD",
                    path, len(replaced), replaced[0])
    return out


class JoinText:
    """Keeps samples whose study_id has a report target; others are counted and skipped with a
    rate-limited warning, or (``on_missing="error"``) end the stream with an error item.

    Skipping never runs forever: ``max_missing_run`` samples in a row without a target (the text
    cache belongs to other shards, or the keys are spelled differently) end the stream with an error.
    """

    def __init__(self, state: StreamState, targets, on_missing: str = "skip", max_missing_run: int = 2000):
        if on_missing not in ("skip", "error"):
            raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
        self.state, self.targets, self.on_missing = state, targets, on_missing
        self.max_missing_run = max_missing_run
        self._warn = RateLimitedLog("sample without a cached report skipped", logger=log)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        run = 0
        for sample in src:
            if sample["study_id"] in self.targets:
                run = 0
                yield sample
                continue
            self.state.missing += 1
            run += 1
            msg = (f"study_id {sample['study_id']} of sample {sample['key']} ({sample['url']}) "
                   f"is not in the text cache")
            if self.on_missing == "error":
                yield {"__error__": msg + " (--on-missing error)"}
                return
            if run >= self.max_missing_run:
                yield {"__error__": f"{run} samples in a row have no report target, the last: {msg}; the text "
                                    "cache does not belong to these shards (rebuild it with embed-text from this "
                                    "prepare output's reports.jsonl) or its keys are spelled differently"}
                return
            if self.state.first_missing is None:
                self.state.first_missing = sample["study_id"]
            self._warn(msg)


def check_targets_cover(urls: list[str], targets, n: int = 256) -> tuple[int, int, list[str]]:
    """Study ids of up to ``n`` samples at the start of the first local shard, against ``targets``:
    ``(found, read, missing examples)``. Reads only json members; remote shards give ``(0, 0, [])``."""
    import tarfile

    local = [u for u in urls if "://" not in u and not u.startswith("pipe:") and Path(u).is_file()]
    if not local:
        return 0, 0, []
    found = read = 0
    missing: list[str] = []
    try:
        with tarfile.open(local[0]) as tar:
            for member in tar:
                if read >= n:
                    break
                if not member.name.endswith(".json") or not member.isfile():
                    continue
                fh = tar.extractfile(member)
                try:
                    study = str(json.loads(fh.read()).get("study_id", "")) if fh else ""
                except (ValueError, AttributeError):  # a corrupt member: the stream counts and skips it
                    continue
                read += 1
                if study in targets:
                    found += 1
                elif len(missing) < 3:
                    missing.append(study)
    except (tarfile.TarError, OSError):
        return 0, 0, []  # unreadable: the stream's own error handling names the shard
    return found, read, missing


class Augment:
    """CPU-side augmentation of single samples; the RNG of each sample is seeded by its position
    in the stream, so the result does not depend on which process computes it."""

    def __init__(self, state: StreamState, make_fn: Callable[[], Callable[[np.ndarray, int], torch.Tensor]]):
        self.state, self.make_fn = state, make_fn

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        st = self.state
        w, _ = st.worker()
        fn = self.make_fn()
        for sample in src:
            if "__error__" not in sample:
                sample["image"] = fn(sample["image"], stream_seed(st.seed, st.epoch, st.rank, w, "aug",
                                                                  sample["raw"]))
            yield sample


class Batch:
    """Groups ``batch_size`` samples into ``{"image", "target", "key", "study_id", "urls", "meta"}``.

    ``image``: uint8 (B, C, H, W) (C: 1, or 3 for colour shards) when not augmented in the worker, else the
    stacked augmented tensors.
    ``target``: (B, D) float32 embeddings, or a list of report texts in online mode.
    ``meta``: logical worker, its raw-sample position after this batch, and the missing/corrupt counts
    since its previous batch."""

    def __init__(self, state: StreamState, targets, batch_size: int):
        self.state, self.targets, self.batch_size = state, targets, int(batch_size)

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        st = self.state
        w, _ = st.worker()
        buf: list[dict] = []
        for sample in src:
            if "__error__" in sample:
                yield {"error": sample["__error__"], "meta": {"worker": w}}
                return
            buf.append(sample)
            if len(buf) == self.batch_size:
                batch = self._collate(buf, w)
                error = non_finite_targets(batch, self.targets)
                if error is not None:
                    yield {"error": error, "meta": {"worker": w}}
                    return
                yield batch
                buf = []

    def _collate(self, buf: list[dict], w: int) -> dict:
        st = self.state
        imgs = [s["image"] for s in buf]
        if isinstance(imgs[0], np.ndarray) and imgs[0].ndim == 3:  # colour: (B, H, W, 3) -> (B, 3, H, W)
            image = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        elif isinstance(imgs[0], np.ndarray):
            image = torch.from_numpy(np.stack(imgs))[:, None]
        else:
            image = torch.stack(imgs)
        study = [s["study_id"] for s in buf]
        meta = {"worker": w, "raw": st.raw, "missing": st.missing, "corrupt": st.corrupt, "lost": st.lost,
                "lost_shards": dict(st.lost_shards), "first_missing": st.first_missing}
        st.reset_counters()
        st.first_missing = None
        return {"image": image, "target": self.targets.fetch(study), "key": [s["key"] for s in buf],
                "study_id": study, "urls": sorted({s["url"] for s in buf}), "meta": meta}


def non_finite_targets(batch: dict, targets) -> str | None:
    """An error naming the studies whose cached embedding holds NaN/inf, or None. Such a target makes
    the loss non-finite, and that must be blamed on the cache, not on the learning rate."""
    t = batch.get("target")
    if not isinstance(t, torch.Tensor):
        return None
    bad = ~torch.isfinite(t).all(dim=1)
    if not bool(bad.any()):
        return None
    studies = [batch["study_id"][i] for i in torch.nonzero(bad).flatten().tolist()]
    where = getattr(targets, "path", "the text targets")
    return (f"the text cache {where} holds NaN or inf embeddings for {len(studies)} study_id(s) of this batch "
            f"(e.g. {', '.join(studies[:3])}); the cache is damaged: rebuild it with embed-text (check it with "
            f"`cli.py cache verify`)")


def train_pipeline(urls: list[str], state: StreamState, targets, batch_size: int, image_size: int,
                   on_missing: str = "skip", shuffle_buffer: int = 1000,
                   augment: Callable | None = None, sizes: dict[str, int] | None = None, channels: int = 1):
    """The endless training stream of one rank (see the module docstring): a ``webdataset.DataPipeline``.
    ``sizes``: samples per shard file name (``sizes.json``), to count the samples a damaged shard loses;
    ``channels``: 3 for colour shards (the manifest says so, ``ShardSet.channels``)."""
    wds = _webdataset()
    stages: list[Any] = [
        EpochShards(urls, state),
        ShardSamples(state, sizes),
        Shuffle(state, bufsize=shuffle_buffer, initial=min(100, shuffle_buffer)),
        FastForward(state),
        Decode(state, image_size, channels),
        JoinText(state, targets, on_missing),
    ]
    if augment is not None:
        stages.append(Augment(state, augment))
    stages.append(Batch(state, targets, batch_size))
    return wds.DataPipeline(*stages)


def make_loader(pipeline, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over an already-batched pipeline (workers re-pickle it at each ``iter``)."""

    kw: dict[str, Any] = {}
    if num_workers > 0:
        # workers ignore SIGTERM/SIGINT: the main process finishes the step and checkpoints (preempt.py)
        kw.update(prefetch_factor=2, persistent_workers=False, worker_init_fn=ignore_in_worker)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, **kw)


def read_fixed_batch(urls: list[str], targets, n: int, image_size: int, channels: int = 1) -> dict | None:
    """The first ``n`` usable samples of ``urls`` in file order (no shuffle, no augmentation), as one
    batch; ``None`` when there are none. Used for the held-out probe batch."""
    wds = _webdataset()
    state = StreamState()
    pipe = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(handler=CountingHandler(state)),
        Decode(state, image_size, channels),
        JoinText(state, targets, "skip"),
    )
    buf = []
    for s in pipe:
        if "__error__" in s:  # a long run of samples without a target: use what was found so far
            log.warning("held-out samples: %s", s["__error__"])
            break
        buf.append(s)
        if len(buf) >= n:
            break
    if not buf:
        return None
    return Batch(state, targets, len(buf))._collate(buf, 0)


# --------------------------------------------------------------------------- shard discovery
@dataclasses.dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    num_samples: int | None  # None when no sizes.json covers the shards
    root: Path | None  # local folder of the shards, when there is one
    sizes: dict = dataclasses.field(default_factory=dict)  # shard file name -> samples (sizes.json)
    # shard file name -> {"count", "bytes", "sha256"} as prepare wrote it (manifest.json "shard_files")
    digests: dict = dataclasses.field(default_factory=dict)
    manifest: Path | None = None
    channels: int = 1  # 3: colour images (the manifest's "channels", prepare pairs --channels 3)


def _manifest_names(manifest: Path, folder: Path, names) -> list[str]:
    """Shard names a manifest lists, each a plain file name inside ``folder``: a manifest that names
    ``/etc/passwd`` or ``../../outside/x.tar`` is refused, not read."""

    out = []
    for n in names:
        why = unsafe_id_reason(n) if isinstance(n, str) else "is not a file name"
        if why is None and not n.endswith(".tar"):
            why = "is not a .tar file name"
        if why is not None:
            raise DataError(f"{manifest}: lists shard {n!r}, which {why}; a manifest names shards inside {folder} "
                            "only (rerun prepare to rewrite it)")
        out.append(n)
    return out


def _manifest_digests(manifest: Path, man: dict) -> dict:
    files = man.get("shard_files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DataError(f"{manifest}: shard_files must map shard names to {{count, bytes, sha256}}")
    return files


def check_shard_files(shards: ShardSet, rank: int = 0, world_size: int = 1, threads: int = 4) -> tuple[str | None, int]:
    """Read-time integrity of local shards against what prepare recorded (manifest.json ``shard_files``):
    byte size, sha256, and the sample count against sizes.json. This rank checks every ``world_size``-th
    shard from ``rank`` (hashing in ``threads`` threads: hashlib releases the GIL), so the ranks share the
    work. Returns ``(the first problem, or None; bytes hashed)``."""
    from concurrent.futures import ThreadPoolExecutor


    if not shards.digests:
        return None, 0
    todo = [Path(u) for u in shards.urls[rank::world_size] if Path(u).name in shards.digests]

    def check(path: Path) -> tuple[str | None, int]:
        want = shards.digests[path.name]
        fix = (f"it was replaced, modified or damaged since prepare wrote it: delete it and rerun prepare on "
               f"{shards.manifest.parent if shards.manifest else path.parent} (only missing shards are rebuilt)")
        if shards.sizes.get(path.name, want.get("count")) != want.get("count"):
            return (f"{path}: sizes.json lists {shards.sizes.get(path.name)} samples, {shards.manifest} "
                    f"{want.get('count')}; {fix}"), 0
        try:
            size = path.stat().st_size
            if size != want.get("bytes"):
                return f"{path}: {size} bytes, prepare wrote {want.get('bytes')}; {fix}", 0
            if file_sha256(path) != want.get("sha256"):
                return f"{path}: content differs from the sha256 in {shards.manifest}; {fix}", size
        except OSError as e:
            return f"{path}: cannot read ({e.strerror})", 0
        return None, size

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(check, todo))
    problems = [r for r, _ in results if r is not None]
    return (problems[0] if problems else None), sum(n for _, n in results)


def _load_sizes(folder: Path) -> dict[str, int]:
    p = folder / "sizes.json"
    if not p.is_file():
        return {}
    sizes = read_json(p)
    if not isinstance(sizes, dict):
        raise DataError(f"{p}: expected an object {{shard name: count}}")
    try:
        return {str(k): int(v) for k, v in sizes.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{p}: every count must be a whole number ({e})") from e


def resolve_shards(spec: str, split: str = "train") -> ShardSet:
    """``spec`` -> the shard URLs of ``split`` and their sample count.

    ``spec``: a prepare output folder (manifest.json + shards/), a folder of .tar shards (those named
    ``<split>-*.tar`` if any, else all), or webdataset URLs (brace ranges, ``::``-separated lists,
    ``pipe:`` commands). Sample counts come from ``sizes.json`` beside local shards."""
    p = Path(spec)
    if p.is_dir():
        if (p / "manifest.json").is_file() and (p / "shards").is_dir():
            man = read_json(p / "manifest.json")
            names = ((man.get("splits") or {}).get(split) or {}).get("shards")
            folder = p / "shards"
            if not names:
                raise DataError(f"{p / 'manifest.json'} lists no shards for split {split!r}")
            names = _manifest_names(p / "manifest.json", folder, names)
            return _local_shards(folder, names, _manifest_digests(p / "manifest.json", man), p / "manifest.json",
                                 channels=_channels(man, p))
        else:
            folder = p
            tars = sorted(x.name for x in folder.glob("*.tar"))
            names = [n for n in tars if n.startswith(f"{split}-")] or tars
            if not names:
                raise DataError(f"no .tar shards in {folder}")
        return _local_shards(folder, names)
    if p.is_file() and not p.name.endswith((".tar", ".tgz", ".tar.gz")):
        raise DataError(f"{p}: a file, not a shard (.tar), a folder of shards or a prepare output folder")
    urls = _webdataset().shardlists.expand_urls(spec)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    local = [Path(u) for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) == len(urls):
        missing = [u for u in local if not u.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such folder, shard or URL (give a prepare output folder, a folder "
                            "of .tar shards, or webdataset URLs such as train-{000000..000099}.tar)")
        folder = local[0].parent
        sizes = _load_sizes(folder)
        names = [u.name for u in local]
        count = sum(sizes[n] for n in names) if sizes and all(n in sizes for n in names) else None
        return ShardSet(tuple(urls), count, folder, {n: sizes[n] for n in names if n in sizes})
    return ShardSet(tuple(urls), None, None)


def _channels(manifest: dict, where: Path) -> int:
    channels = manifest.get("channels", 1)
    if channels not in (1, 3):
        raise DataError(f"{where / 'manifest.json'}: channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _local_shards(folder: Path, names: list[str], digests: dict | None = None,
                  manifest: Path | None = None, channels: int = 1) -> ShardSet:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"shard {folder / missing[0]} is listed but does not exist")
    sizes = _load_sizes(folder)
    count = sum(sizes[n] for n in names) if sizes and all(n in sizes for n in names) else None
    return ShardSet(tuple(str(folder / n) for n in names), count, folder,
                    {n: sizes[n] for n in names if n in sizes},
                    digests={n: digests[n] for n in names if n in (digests or {})}, manifest=manifest,
                    channels=channels)


def resolve_splits(spec: str, splits: tuple[str, ...]) -> ShardSet:
    """The shards of several splits together (in the order of ``splits``) and their sample count.

    ``spec``: a prepare output folder (splits the manifest does not list are skipped) or a folder of
    ``<split>-*.tar`` shards (all its .tar files when none is named by split). Explicit URLs name their
    shards themselves, so they are refused here."""
    p = Path(spec)
    if not p.is_dir():
        raise DataError(f"{spec}: training pairs from several splits need a prepare output folder or a "
                        "folder of <split>-NNNNNN.tar shards; with URLs or single files, list the shards")
    if (p / "manifest.json").is_file() and (p / "shards").is_dir():
        man = read_json(p / "manifest.json")
        listed = man.get("splits") or {}
        names = [n for s in splits for n in ((listed.get(s) or {}).get("shards") or [])]
        if not names:
            raise DataError(f"{p / 'manifest.json'} lists no shards for the splits {', '.join(splits)}")
        names = _manifest_names(p / "manifest.json", p / "shards", names)
        return _local_shards(p / "shards", names, _manifest_digests(p / "manifest.json", man), p / "manifest.json",
                             channels=_channels(man, p))
    tars = sorted(x.name for x in p.glob("*.tar"))
    if not tars:
        raise DataError(f"no .tar shards in {p}")
    names = [n for s in splits for n in tars if n.startswith(f"{s}-")] or tars
    return _local_shards(p, names)


def heldout_shards(train: ShardSet, split: str = "validate") -> list[str]:
    """Shards of ``split`` beside local training shards (prepare writes train-/validate-/test-*.tar)."""
    if train.root is None:
        return []
    return [str(x) for x in sorted(train.root.glob(f"{split}-*.tar"))]
