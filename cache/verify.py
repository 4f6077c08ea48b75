"""``cache info`` and ``cache verify``: summaries and full integrity checks of a cache folder."""
from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from cache.format import (
    INDEX_NAME,
    INDEX_ONLY_ATTRS,
    PER_SHARD_ATTRS,
    SHARD_RE,
    CacheError,
    content_hash,
    decode_attr,
)
from cache.reader import TextEmbeddingCache, _open_shard, resolve_cache_dir
from pipeline.common import file_sha256, read_json


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """Index-level summary (no shard is opened): path, count, dim, shards, attributes."""
    c = TextEmbeddingCache(path)
    index = read_json(c.path / INDEX_NAME)
    size = sum((c.path / e["name"]).stat().st_size for e in index["shards"]
               if (c.path / e["name"]).is_file())
    return {"path": str(c.path), "count": len(c), "dim": c.dim,
            "shards": [{"name": e["name"], "count": e["count"]} for e in index["shards"]],
            "bytes": size, "attrs": c.attrs}


def verify_cache(path: str | os.PathLike) -> dict[str, Any]:
    """Check every shard against the index: present, readable, counts, dims, dtype, attributes,
    file and content hashes, no duplicate or stray keys. Returns a summary; raises CacheError that
    names the first bad file."""
    cache_dir = resolve_cache_dir(path)
    index = read_json(cache_dir / INDEX_NAME)
    dim, attrs = int(index["dim"]), dict(index["attrs"])
    dtype = np.dtype(attrs.get("store_dtype", "float32"))
    listed = {e["name"] for e in index["shards"]}
    fp = attrs.get("fingerprint")
    if fp is not None and cache_dir.name != fp:
        raise CacheError(f"{cache_dir}: folder name differs from the cache's fingerprint {fp!r} (embed-text names "
                         f"the folder by it): renamed, or another cache copied in; rename it back to {fp} or "
                         "rebuild it with embed-text")
    strays = sorted(p.name for p in cache_dir.iterdir() if SHARD_RE.match(p.name) and p.name not in listed)
    if strays:
        raise CacheError(f"{cache_dir / strays[0]}: shard not listed in {INDEX_NAME}")
    seen: dict[str, str] = {}
    total = 0
    for entry in index["shards"]:
        shard = cache_dir / entry["name"]
        mm, keys = _open_shard(shard, int(entry["count"]), dim, dtype)
        if "sha256" in entry and file_sha256(shard) != entry["sha256"]:
            raise CacheError(f"{shard}: file hash differs from {INDEX_NAME} (modified or corrupt)")
        emb = np.asarray(mm)
        if "content_hash" in entry and content_hash(keys, emb) != entry["content_hash"]:
            raise CacheError(f"{shard}: content hash differs from {INDEX_NAME}")
        if not np.isfinite(emb).all():
            raise CacheError(f"{shard}: embeddings contain NaN or inf")
        with h5py.File(shard, "r") as f:
            shard_attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
        for name, want in attrs.items():
            if name in PER_SHARD_ATTRS or name in INDEX_ONLY_ATTRS:
                continue
            if shard_attrs.get(name) != want:
                raise CacheError(f"{shard}: attribute {name}={shard_attrs.get(name)!r}, "
                                 f"{INDEX_NAME} says {want!r}")
        for k in keys:
            if k in seen:
                raise CacheError(f"{shard}: key {k!r} also in {seen[k]}")
            seen[k] = entry["name"]
        total += len(keys)
    if total != int(index["count"]) or total != int(attrs.get("count", total)):
        raise CacheError(f"{cache_dir / INDEX_NAME}: lists {index['count']} embeddings, shards hold {total}")
    return {"path": str(cache_dir), "count": total, "dim": dim, "shards": len(index["shards"]), "ok": True}
