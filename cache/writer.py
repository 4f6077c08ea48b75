"""Writing cache shards and the index: each file appears under its final name only when complete."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from cache.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    STORE_DTYPES,
    CacheError,
    content_hash,
    decode_attr,
    encode_attr,
    shard_name,
)
from pipeline import __version__
from pipeline.common import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)


def write_shard(path: str | os.PathLike, keys: Sequence[str], emb: np.ndarray,
                attrs: Mapping[str, Any]) -> dict:
    """Write one shard atomically; returns its index entry ``{"name", "count", "sha256", "content_hash"}``.

    ``emb`` must already have the store dtype (float16/float32). The bytes depend only on the inputs
    (no timestamps), so rewriting the same shard gives an identical file.
    """
    path = Path(path)
    emb = np.ascontiguousarray(emb)
    if emb.ndim != 2 or emb.shape[0] != len(keys):
        raise ValueError(f"emb shape {emb.shape} does not match {len(keys)} keys")
    if emb.dtype.name not in STORE_DTYPES:
        raise ValueError(f"emb dtype {emb.dtype} is not one of {STORE_DTYPES}")
    with atomic_path(path) as tmp:
        # Fixed libver and no timestamps keep the file bytes a pure function of its content.
        with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as f:
            f.create_dataset("keys", data=np.array(list(keys), dtype=object),
                             dtype=h5py.string_dtype("utf-8"), track_times=False)
            # Contiguous, unchunked, unfiltered: readers memory-map this dataset directly.
            f.create_dataset("emb", data=emb, track_times=False)
            for name, value in sorted(attrs.items()):
                f.attrs[name] = encode_attr(value)
            f.attrs["n_rows"] = len(keys)
        # mkstemp creates 0600 files; caches are shared read-only data, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return {"name": path.name, "count": len(keys), "sha256": file_sha256(path),
            "content_hash": content_hash(keys, emb)}


def read_shard(path: str | os.PathLike, with_emb: bool = True
               ) -> tuple[list[str], np.ndarray | None, dict[str, Any]]:
    """Keys, embeddings (store dtype; None unless ``with_emb``) and decoded root attributes."""
    with h5py.File(path, "r") as f:
        keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
        emb = f["emb"][()] if with_emb else None
        attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    return keys, emb, attrs


def shard_entry(path: str | os.PathLike) -> dict:
    """The index entry of an existing shard (same fields as ``write_shard`` returns)."""
    path = Path(path)
    keys, emb, _ = read_shard(path)
    return {"name": path.name, "count": len(keys), "sha256": file_sha256(path),
            "content_hash": content_hash(keys, emb)}


def write_index(cache_dir: str | os.PathLike, entries: Sequence[dict], dim: int,
                attrs: Mapping[str, Any]) -> Path:
    """Write ``index.json`` (last, atomically): it marks the cache folder as complete."""
    cache_dir = Path(cache_dir)
    path = cache_dir / INDEX_NAME
    write_json(path, {
        "format_version": FORMAT_VERSION,
        "shards": list(entries),
        "count": int(sum(e["count"] for e in entries)),
        "dim": int(dim),
        "attrs": dict(attrs),
    })
    return path


def cache_attrs(emb_dim: int, count: int, store_dtype: str, attrs: Mapping[str, Any]) -> dict:
    """The attributes every shard and the index carry: the caller's plus dim/count/store_dtype/version."""

    out = {"mflag_version": __version__, **attrs}
    out.update({"dim": int(emb_dim), "count": int(count), "store_dtype": store_dtype})
    return out


def write_cache(out_dir: str | os.PathLike, keys: Sequence[str], emb: np.ndarray,
                attrs: Mapping[str, Any] | None = None, shard_size: int = 50_000,
                store_dtype: str | None = None) -> Path:
    """Write a complete cache (shards + index.json) for ``keys`` -> rows of ``emb`` into ``out_dir``.

    Low-level: no model involved (tests of later stages build small caches with it). ``store_dtype``
    defaults to ``emb``'s dtype when it is float16/float32, else float32. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    keys = [str(k) for k in keys]
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != len(keys):
        raise ValueError(f"emb must be (len(keys), D); got {emb.shape} for {len(keys)} keys")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise CacheError(f"duplicate key {dup!r} in write_cache")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if store_dtype is None:
        store_dtype = emb.dtype.name if emb.dtype.name in STORE_DTYPES else "float32"
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    emb = emb.astype(store_dtype, copy=False)
    full = cache_attrs(emb.shape[1], len(keys), store_dtype, attrs or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for s, start in enumerate(range(0, max(len(keys), 1), shard_size)):
        stop = min(start + shard_size, len(keys))
        if stop <= start:
            break
        entries.append(write_shard(out_dir / shard_name(s), keys[start:stop], emb[start:stop],
                                   {**full, "shard": s}))
    write_index(out_dir, entries, emb.shape[1], full)
    return out_dir
