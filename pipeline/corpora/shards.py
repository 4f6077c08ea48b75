"""Writing prepare's output: planned shards of encoded images, their done-records, the bad-item report.

``plan_shards`` fixes which image goes into which shard from the sorted image list, before any
decoding. ``EncodeResults`` runs ``encode_task`` (one image file -> shard bytes) in a process pool,
in task order; ``write_shard`` writes one webdataset tar (fixed member metadata: byte-identical for
identical inputs) and then its done-record, which ``done_record`` checks on a rerun.
``PrepareReport`` accumulates prepare-report.json (counts, every dropped and bad item).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.common import (
    ConfigError,
    MflagError,
    RateLimitedLog,
    atomic_path,
    file_sha256,
    read_json,
    write_json,
)
from pipeline.corpora.base import IMAGE_FORMATS, BadItem, CorpusImage
from pipeline.imaging import (
    DegenerateImageError,
    ImageError,
    ImageTooLargeError,
    MissingImageError,
    encode_png,
    load_for_shard,
    load_rgb_for_shard,
)
from pipeline.preempt import pool_worker_init

log = logging.getLogger(__name__)

# Fixed tar member mtime: identical inputs and config give byte-identical shards on every run.
TAR_MTIME = 0
# --format -> tar member extension (the webdataset key of the image). "raw" stores the uint8 array
# as np.save bytes: 4x the size of a PNG on disk, but a loader gets it with no image decoding at all.
IMAGE_EXT = {"png": "png", "jpg": "jpg", "raw": "npy"}
assert tuple(IMAGE_EXT) == IMAGE_FORMATS


@dataclass(frozen=True)
class Shard:
    """One planned shard: its file name, split and images, fixed before any decoding."""

    name: str
    split: str
    items: tuple[CorpusImage, ...]


class TooManyBadItems(MflagError):
    """More bad inputs than ``max_bad_fraction`` allows; prepare-report.json lists them."""


def encode_image(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """A prepared uint8 image as shard bytes: ``png``, ``jpg`` (at ``quality``) or ``raw`` (``np.save``)."""
    if fmt == "png" and arr.ndim == 2:
        # Our own writer (pipeline.imaging.encode_png): Pillow's PNG encoder costs a tenth of the
        # reduced-scale decode of a 2048 px JPEG, and its Paeth rows slow every later decode.
        return encode_png(arr)
    buf = io.BytesIO()
    if fmt == "raw":
        np.save(buf, np.ascontiguousarray(arr, dtype=np.uint8), allow_pickle=False)
    elif fmt in ("jpg", "png"):  # png here: colour (prepare pairs --channels 3), written by Pillow
        from PIL import Image

        if fmt == "png":
            Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        else:
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    else:
        raise ConfigError(f"unknown image format {fmt!r}; choose one of {', '.join(IMAGE_EXT)}")
    return buf.getvalue()


def encode_task(task: tuple) -> tuple[str, object]:
    """Worker: one image file -> ("ok", (bytes, (H, W))) or (reason, message). Never raises.

    ``task``: path, size, crop, format, quality, max_pixels, channels (1 grey, 3 RGB) and optionally the
    (rows, columns) the corpus's metadata gives (None where it gives none). The bytes are the image
    encoded as ``fmt`` (``encode_image``): grey, or RGB when ``channels`` is 3."""
    path, size, crop, fmt, quality, max_pixels = task[:6]
    channels = task[6] if len(task) > 6 else 1
    expected = task[7] if len(task) > 7 else None
    try:
        if channels == 3:
            arr, orig = load_rgb_for_shard(path, size, crop_border=crop, max_pixels=max_pixels, expected=expected)
        else:
            arr, orig = load_for_shard(path, size, crop_border=crop, max_pixels=max_pixels, expected=expected)
        return "ok", (encode_image(arr, fmt, quality), orig)
    except MissingImageError as e:
        return "missing_image", str(e)
    except ImageTooLargeError as e:
        return "image_too_large", str(e)
    except DegenerateImageError as e:
        return "degenerate_image", str(e)
    except ImageError as e:
        return "corrupt_image", str(e)
    except Exception as e:  # a decoder bug on one file must not kill a multi-hour run
        return "corrupt_image", f"{path}: {type(e).__name__}: {e}"


def order_key(img: CorpusImage) -> str:
    # A hash order mixes patients and studies within each shard (the CSV order groups them), while
    # staying a pure function of the image key, so the plan does not depend on CSV row order.
    return hashlib.blake2b(img.key.encode(), digest_size=8).hexdigest() + img.key


def write_shard(shard: Shard, results: Iterator, shards_dir: Path, state_dir: Path, fp: str, root: str,
                image_format: str, bar) -> int:
    """Write one shard (tar, then its done-record) from the next ``len(shard.items)`` results of
    :class:`EncodeResults`; a bad image is recorded by its path under ``root``. Returns its number of bad images."""
    keys, bad = [], []
    with atomic_path(shards_dir / shard.name) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as sink:
            for img in shard.items:
                status, payload = next(results)
                bar.update(1)
                if status != "ok":
                    item = BadItem(status, str(Path(root) / img.relpath), str(payload),
                                   {"dicom_id": img.key, "subject_id": img.patient, "study_id": img.study})
                    bad.append(item.to_dict())
                    continue
                data, orig = payload
                # Every corpus writes MIMIC's field names: the loaders join on study_id.
                meta = {"dicom_id": img.key, "subject_id": img.patient, "study_id": img.study,
                        "view": img.view, "split": img.split, "orig_size": [int(orig[0]), int(orig[1])]}
                _add_sample(sink, img.key, {IMAGE_EXT[image_format]: data,
                                            "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                keys.append(img.key)
    # The record follows the tar: a kill between the two only costs rebuilding this one shard.
    write_json(state_dir / f"{shard.name}.json", {
        "fingerprint": fp, "name": shard.name, "split": shard.split, "count": len(keys),
        "bytes": (shards_dir / shard.name).stat().st_size, "sha256": file_sha256(shards_dir / shard.name),
        "keys": keys, "bad": bad,
    })
    return len(bad)


def _add_sample(sink: tarfile.TarFile, key: str, fields: dict[str, bytes]) -> None:
    # webdataset's member naming (``<key>.<ext>``, fields sorted). Plain tarfile instead of
    # wds.TarWriter keeps torch out of the prepare stage; fixed metadata keeps shards byte-identical.
    for ext in sorted(fields):
        data = fields[ext]
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, 0o444
        sink.addfile(ti, io.BytesIO(data))


class EncodeResults:
    """Ordered encode results: a process pool for ``workers`` > 1, inline otherwise."""

    def __init__(self, tasks: list, workers: int):
        self.tasks, self.workers, self.pool = tasks, workers, None

    def __enter__(self) -> Iterator:
        if self.workers <= 1:
            return map(encode_task, self.tasks)
        self.pool = multiprocessing.get_context().Pool(self.workers, initializer=pool_worker_init)
        # Small chunks keep the ordered stream flowing; imap preserves task order.
        return self.pool.imap(encode_task, self.tasks, chunksize=4)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def done_record(state_dir: Path, shards_dir: Path, shard: Shard, fp: str) -> dict | None:
    """The shard's done-record if the shard is complete for this fingerprint, else None."""
    rec_path, tar = state_dir / f"{shard.name}.json", shards_dir / shard.name
    if not rec_path.is_file():
        return None
    try:
        rec = read_json(rec_path)
    except MflagError:
        return None
    if rec.get("fingerprint") != fp or rec.get("count", -1) + len(rec.get("bad", [])) != len(shard.items):
        return None
    if rec["count"] == 0:
        return rec  # every image was bad: the empty tar is removed at the end of a run
    return rec if tar.is_file() and tar.stat().st_size == rec.get("bytes") else None


def check_bad(max_bad_fraction: float, report: PrepareReport, n_bad: int, n_total: int, stage: str) -> None:
    """Raise TooManyBadItems (after writing the report) when ``n_bad / n_total`` exceeds ``max_bad_fraction``."""
    frac = n_bad / max(n_total, 1)
    report.counts["bad_images"] = n_bad
    if frac > max_bad_fraction:
        msg = (f"too many bad inputs while {stage}: {n_bad} of {n_total} images ({frac:.2%}) > "
               f"max_bad_fraction {max_bad_fraction:.2%}; every item is listed in "
               f"{report.path} (reasons: {dict(report.reason_counts())})")
        report.write(status="failed", error=msg)
        raise TooManyBadItems(msg)


class PrepareReport:
    """Accumulates prepare-report.json: counts, filtered counts, every dropped and bad item."""

    def __init__(self, out: Path, writable: bool = True):
        self.path = out / "prepare-report.json"
        self.writable = writable
        self.counts: Counter = Counter()
        self.filtered: dict = {}
        self.bad: list[BadItem] = []
        self.dropped: list[dict] = []
        self.notes: list[str] = []  # what a reader of the report should know (e.g. views not filtered)
        self._seen: set = set()
        self._warn: dict[str, RateLimitedLog] = {}

    def add_bad(self, item: BadItem) -> None:
        key = (item.reason, item.where)
        if key in self._seen:
            return
        self._seen.add(key)
        # Every item goes to the report; the log gets the first few of each reason, then a sample.
        if item.reason not in self._warn:
            self._warn[item.reason] = RateLimitedLog(f"bad input ({item.reason})", logger=log)
        self._warn[item.reason](f"{item.where}: {item.detail}")
        self.bad.append(item)

    def add_dropped(self, reason: str, where: str, detail: str, ids: dict) -> None:
        log.debug("dropped (%s): %s", reason, where)
        self.dropped.append({"reason": reason, "where": where, "detail": detail, **ids})

    def reason_counts(self) -> Counter:
        return Counter(b.reason for b in self.bad)

    def write(self, status: str, error: str | None = None) -> None:
        if not self.writable:  # read-only OUT: the error itself still reaches the user
            return
        dropped_counts = Counter(d["reason"] for d in self.dropped)
        write_json(self.path, {
            "status": status, "error": error,
            "counts": dict(self.counts),
            "bad_counts": dict(self.reason_counts()),
            "dropped_counts": dict(dropped_counts),
            "filtered": self.filtered,
            "bad": [b.to_dict() for b in self.bad],
            "dropped": self.dropped,
            **({"notes": self.notes} if self.notes else {}),
        })


def plan_shards(images, has_text, splits, shard_size: int) -> list[Shard]:
    """Shards of at most ``shard_size`` images per split (named ``<split>-NNNNNN.tar``), from the images
    for which ``has_text(image)`` holds, in :func:`order_key` order."""
    plan: list[Shard] = []
    for split in splits:
        items = sorted((i for i in images if i.split == split and has_text(i)), key=order_key)
        for k in range(0, len(items), shard_size):
            plan.append(Shard(f"{split}-{k // shard_size:06d}.tar", split, tuple(items[k:k + shard_size])))
    return plan
