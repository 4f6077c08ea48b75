"""Building a cache folder shard by shard: resume checks, shard writing and the final index.

A shard already on disk must come from the same configuration (``check_existing``, over
``RESUME_ATTRS``) and is then skipped; ``write_shards`` writes each embedded shard atomically as it
arrives, refusing non-finite embeddings; ``finalize_index`` writes ``index.json`` once every shard
exists (and leaves an index that already says exactly that untouched).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from cache import writer
from cache.format import INDEX_NAME, SHARD_RE, CacheError, CacheMismatchError, content_hash, shard_name
from pipeline.common import canonical_json, file_sha256

log = logging.getLogger(__name__)

# Attributes a resumed run must share with the shards already on disk.
# Not model_id: the same weights in a moved or copied folder (another mount) are the same model, which
# revision, config_hash and tokenizer_hash already pin.
RESUME_ATTRS = ("fingerprint", "revision", "dim", "pooling", "max_length", "dtype",
                "store_dtype", "config_hash", "tokenizer_hash")


def is_cache_dir(path: Path) -> bool:
    """``path`` already is a cache folder (an index or a shard in it)."""
    return path.is_dir() and ((path / INDEX_NAME).is_file()
                              or any(SHARD_RE.match(p.name) for p in path.iterdir()))


def check_existing(path: Path, attrs: dict, keys: Sequence[str]) -> None:
    """An existing shard must come from this very configuration; otherwise stop, touching nothing."""
    try:
        have_keys, _, have = writer.read_shard(path, with_emb=False)
    except Exception as e:
        raise CacheError(f"{path}: existing shard is unreadable ({e}); delete it and rerun") from e
    diffs = [f"{n}={have.get(n)!r} (this run: {attrs[n]!r})" for n in RESUME_ATTRS
             if have.get(n) != attrs[n]]
    if diffs:
        raise CacheMismatchError(f"{path}: written by a different configuration: " + ", ".join(diffs)
                                 + "; nothing was overwritten; choose another --out or delete "
                                 + str(path.parent))
    if have_keys != list(keys):
        raise CacheMismatchError(f"{path}: holds other keys than this run plans for it; nothing was "
                                 f"overwritten; choose another --out or delete {path.parent}")


def _remove_stale_temps(cache_dir: Path, name: str) -> None:
    # Left by a killed run; only this part ever writes shard ``name``, so they are ours to remove.
    for tmp in cache_dir.glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def finalize_index(cache_dir: Path, n_shards: int, attrs: dict, extra: dict,
                   writable: bool = True) -> bool:
    """Make index.json describe the ``n_shards`` shards once all exist; returns whether the cache is
    complete. Every shard is read back and hashed; an index.json that already says exactly that is left
    as it is (a rerun of a finished cache only re-checks it, also on read-only storage)."""
    paths = [cache_dir / shard_name(i) for i in range(n_shards)]
    if not all(p.is_file() for p in paths):
        return False
    entries, n_trunc = [], 0
    for p in paths:
        keys, emb, shard_attrs = writer.read_shard(p)
        entries.append({"name": p.name, "count": len(keys), "sha256": file_sha256(p),
                        "content_hash": content_hash(keys, emb)})
        n_trunc += int(shard_attrs.get("n_truncated", 0))
    index_attrs = {**attrs, "n_truncated": n_trunc,
                   "truncation": {"max_length": attrs["max_length"], "n_truncated": n_trunc,
                                  "fraction": n_trunc / max(attrs["count"], 1)},
                   **extra}
    if _index_matches(cache_dir, entries, attrs["dim"], index_attrs):
        log.info("embed-text: %s is complete and its index matches every shard; nothing rewritten", cache_dir)
        return True
    if not writable:
        raise CacheError(f"{cache_dir / INDEX_NAME}: missing or out of date, and {cache_dir} is not writable; "
                         "run embed-text where the cache can be written")
    writer.write_index(cache_dir, entries, attrs["dim"], index_attrs)
    return True


def _index_matches(cache_dir: Path, entries: list[dict], dim: int, index_attrs: dict) -> bool:
    """index.json exists and lists exactly ``entries`` with these attributes (JSON-normalised)."""
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        return False
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = json.loads(canonical_json({"shards": entries, "dim": dim, "attrs": index_attrs}))
    return (have.get("shards") == want["shards"] and have.get("dim") == want["dim"]
            and all(have.get("attrs", {}).get(k) == v for k, v in want["attrs"].items()))


def write_shards(stream, todo, spans, keys: Sequence[str], cache_dir: Path, attrs: dict, store_dtype: str, bar):
    """Write each embedded shard of ``stream`` (``pipeline.text.embedding.embed_many``) as it arrives: shard
    ``todo[n]`` holds ``keys[a:b]`` for ``(a, b) = spans[todo[n]]``. Yields ``(n_distinct, n_truncated)`` per shard."""
    for i, (emb, truncated, n_distinct) in zip(todo, stream):
        a, b = spans[i]
        name = cache_dir / shard_name(i)
        _remove_stale_temps(cache_dir, name.name)
        shard_attrs = {**attrs, "shard": i, "n_truncated": int(truncated.sum())}
        with np.errstate(over="ignore"):  # overflow is checked for right below, by key
            stored = emb.astype(store_dtype)
        bad = ~(np.isfinite(emb).all(axis=1) & np.isfinite(stored).all(axis=1))
        if bad.any():
            keys = [keys[a + j] for j in np.flatnonzero(bad)[:5]]
            raise CacheError(
                f"{name}: {int(bad.sum())} embedding(s) are not finite after the {attrs['dtype']} forward and "
                f"the {store_dtype} store (keys {', '.join(keys)}); nothing was written for this shard. "
                "Use --dtype fp32 (and --store-dtype float32 if values exceed 65504), then rerun to resume")
        try:
            writer.write_shard(name, keys[a:b], stored, shard_attrs)
        except OSError as e:
            fix = "free space and rerun" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that and rerun"
            raise CacheError(f"{name}: cannot write shard ({e}); no partial shard was left; {fix} to "
                             "resume") from e
        bar.update(b - a)
        yield n_distinct, int(truncated.sum())
