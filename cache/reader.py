"""Read-only access to a text-embedding cache: memory-mapped shards, opened lazily in each process."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from cache.format import INDEX_NAME, SHARD_RE, CacheError, CacheMismatchError, decode_attr
from pipeline.common import file_sha256, fingerprint, read_json


def resolve_cache_dir(path: str | os.PathLike) -> Path:
    """``path`` itself when it holds ``index.json``, else its one child folder that does."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: text cache not found")
    if (path / INDEX_NAME).is_file():
        return path
    if not path.is_dir():
        raise CacheError(f"{path}: not a text-cache folder")
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / INDEX_NAME).is_file())
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CacheError(f"{path}: holds {len(found)} text caches ({names}); pass one of them")
    unfinished = [p for p in [path, *(c for c in path.iterdir() if c.is_dir())]
                  if any(SHARD_RE.match(f.name) for f in p.iterdir())]
    if unfinished:
        raise CacheError(f"{unfinished[0]}: unfinished text cache (no {INDEX_NAME}); "
                         "rerun embed-text to complete it")
    raise CacheError(f"{path}: no text cache here (no {INDEX_NAME})")


def check_expected(attrs: Mapping[str, Any], expect: Mapping[str, Any] | None, where: Path) -> None:
    """Raise CacheMismatchError listing every attribute that differs from ``expect``."""
    if not expect:
        return
    diffs = []
    for name, want in expect.items():
        have = attrs.get(name, "<missing>")
        if have != want:
            diffs.append(f"{name}: cache has {have!r}, expected {want!r}")
    if diffs:
        raise CacheMismatchError(f"{where}: text cache does not match: " + "; ".join(diffs))


class TextEmbeddingCache:
    """Embeddings by key from a cache folder written by ``embed-text`` or ``write_cache``.

    Construction reads only ``index.json``. Shards are opened on first use in each process (the key
    map is read with h5py, which is then closed; rows come from ``np.memmap`` views of the contiguous
    ``emb`` datasets), so DataLoader workers share page-cache pages under both fork and spawn.
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None):
        self.path = resolve_cache_dir(path)
        index = read_json(self.path / INDEX_NAME)
        try:
            self._shards: list[dict] = list(index["shards"])
            self._count = int(index["count"])
            self.dim = int(index["dim"])
            self.attrs: dict[str, Any] = dict(index["attrs"])
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{self.path / INDEX_NAME}: malformed index ({e!r})") from e
        check_expected(self.attrs, expect, self.path)
        self._store_dtype = np.dtype(self.attrs.get("store_dtype", "float32"))
        self._reset()

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def identity(self) -> str:
        """What this cache holds, not where it is: its configuration fingerprint and every shard's
        sha256 from ``index.json``. A cache rebuilt at the same path by another model has another
        identity, so a resumed or finished run can tell (:mod:`stages.train_vision`)."""
        return fingerprint({"fingerprint": self.attrs.get("fingerprint"),
                            "shards": [[e.get("name"), e.get("sha256")] for e in self._shards]}, length=32)

    def check_files(self) -> int:
        """Read-time integrity: every shard listed in ``index.json`` is present, carries the cache's
        configuration fingerprint (a shard of another cache copied in is named as such) and has the
        sha256 the index records (one flipped bit is found). Reads every byte once (see README,
        Troubleshooting, for the cost); returns the bytes hashed. CacheError names the first bad shard
        and the fix."""
        want_fp = self.attrs.get("fingerprint")
        total = 0
        for entry in self._shards:
            shard = self.path / entry["name"]
            if not shard.is_file():
                raise CacheError(f"{shard}: shard listed in {INDEX_NAME} is missing; rebuild the cache with "
                                 "embed-text (check it with `cli.py cache verify`)")
            if want_fp is not None:
                have_fp = _shard_attr(shard, "fingerprint")
                if have_fp != want_fp:
                    raise CacheError(f"{shard}: shard of another text cache (fingerprint {have_fp!r}, "
                                     f"{INDEX_NAME} says {want_fp!r}): embeddings of two configurations must "
                                     "not be mixed; rebuild the cache with embed-text into an empty --out")
            if "sha256" in entry:
                if file_sha256(shard) != entry["sha256"]:
                    raise CacheError(f"{shard}: file hash differs from {INDEX_NAME} (modified, corrupt or "
                                     "replaced since embed-text wrote it); rebuild the cache with embed-text "
                                     "(`cli.py cache verify` checks a cache)")
                total += shard.stat().st_size
        return total

    # -- per-process state -------------------------------------------------------------------
    def _reset(self) -> None:
        self._pid: int | None = None
        self._maps: list[np.memmap] | None = None
        self._where: dict[str, tuple[int, int]] | None = None
        self._keys: list[str] | None = None

    def __getstate__(self) -> dict:
        # Workers get the index only; each opens the shards itself on first use.
        state = self.__dict__.copy()
        state.update(_pid=None, _maps=None, _where=None, _keys=None)
        return state

    def _open(self) -> None:
        if self._maps is not None and self._pid == os.getpid():
            return
        maps, where, keys = [], {}, []
        for s, entry in enumerate(self._shards):
            mm, shard_keys = _open_shard(self.path / entry["name"], int(entry["count"]), self.dim,
                                         self._store_dtype)
            maps.append(mm)
            for row, k in enumerate(shard_keys):
                if k in where:
                    raise CacheError(f"{self.path / entry['name']}: key {k!r} also in "
                                     f"{self._shards[where[k][0]]['name']}")
                where[k] = (s, row)
            keys.extend(shard_keys)
        self._maps, self._where, self._keys, self._pid = maps, where, keys, os.getpid()

    # -- public API --------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        """All keys, in shard order."""
        self._open()
        return list(self._keys)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        self._open()
        return key in self._where

    def __repr__(self) -> str:
        return f"TextEmbeddingCache({str(self.path)!r}, count={self._count}, dim={self.dim})"

    def lookup(self, keys: Iterable[str] | str) -> np.ndarray:
        """float32 array (len(keys), dim), rows in the order asked; KeyError names a missing key."""
        if isinstance(keys, str):
            keys = [keys]
        keys = list(keys)
        self._open()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for i, k in enumerate(keys):
            try:
                s, row = self._where[k]
            except KeyError:
                raise KeyError(f"key {k!r} not in text cache {self.path}") from None
            pos, rows = by_shard.setdefault(s, ([], []))
            pos.append(i)
            rows.append(row)
        for s, (pos, rows) in by_shard.items():
            out[pos] = self._maps[s][rows]
        return out

    def get(self, key: str) -> np.ndarray:
        """One key's embedding as a float32 vector (dim,)."""
        return self.lookup([key])[0]


def _open_shard(path: Path, count: int, dim: int, dtype: np.dtype) -> tuple[np.memmap, list[str]]:
    """Keys and a read-only memmap of ``emb``; CacheError names the file when it is unusable."""
    if not path.is_file():
        raise CacheError(f"{path}: shard listed in {INDEX_NAME} is missing")
    try:
        with h5py.File(path, "r") as f:
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            ds = f["emb"]
            shape, ds_dtype, offset = ds.shape, ds.dtype, ds.id.get_offset()
            contiguous = ds.chunks is None and not ds.compression
    except CacheError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/ValueError for damaged files
        raise CacheError(f"{path}: unreadable or corrupt shard ({e})") from e
    if len(keys) != count or tuple(shape) != (count, dim):
        raise CacheError(f"{path}: has {len(keys)} keys and emb {tuple(shape)}, "
                         f"index expects {count} x {dim}")
    if ds_dtype != dtype:
        raise CacheError(f"{path}: emb dtype {ds_dtype}, index says {dtype}")
    if not contiguous or (offset is None and count):
        raise CacheError(f"{path}: emb is not a contiguous dataset; cannot memory-map it")
    if count == 0:
        return np.zeros((0, dim), dtype=dtype), keys
    nbytes = count * dim * dtype.itemsize
    if path.stat().st_size < offset + nbytes:
        raise CacheError(f"{path}: truncated shard ({path.stat().st_size} bytes, "
                         f"needs {offset + nbytes})")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count, dim)), keys


def _shard_attr(path: Path, name: str) -> Any:
    """One root attribute of a shard, decoded (None when absent); CacheError when unreadable."""

    try:
        with h5py.File(path, "r") as f:
            return decode_attr(f.attrs[name]) if name in f.attrs else None
    except (OSError, KeyError, ValueError) as e:
        raise CacheError(f"{path}: unreadable or corrupt shard ({e})") from e


def shard_paths(cache_dir: Path) -> Sequence[Path]:
    return sorted(p for p in cache_dir.iterdir() if SHARD_RE.match(p.name))
