"""On-disk layout of a text-embedding cache folder, and the errors its readers and writers raise.

A cache folder holds ``part-00000.h5``, ``part-00001.h5``, ... and ``index.json``. Each shard has a
``keys`` dataset (variable-length UTF-8 strings) and an ``emb`` dataset (N x D float16/float32,
contiguous and unfiltered so readers can memory-map it), plus the cache attributes on its root group.
``index.json`` is written last: a folder without it is an unfinished cache.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable

import numpy as np

from pipeline.common import MflagError

INDEX_NAME = "index.json"
SHARD_RE = re.compile(r"^part-(\d{5})\.h5$")
STORE_DTYPES = ("float16", "float32")
FORMAT_VERSION = 1
# Shard root attributes that describe that shard only (index.json holds the totals).
PER_SHARD_ATTRS = ("shard", "n_rows", "n_truncated")
# index.json attributes about the whole run that shards do not carry.
INDEX_ONLY_ATTRS = ("n_truncated", "truncation", "input")


class CacheError(MflagError):
    """A text-embedding cache is missing, unfinished, corrupt, or not the one the caller expects."""


class CacheMismatchError(CacheError):
    """A cache's attributes differ from what the caller (or a resumed run) expects."""


def shard_name(i: int) -> str:
    return f"part-{i:05d}.h5"


def content_hash(keys: Iterable[str], emb: np.ndarray) -> str:
    """sha256 over the keys (NUL-separated UTF-8) and the raw little-endian embedding bytes."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\0")
    arr = np.ascontiguousarray(emb)
    h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def encode_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; nested values (dicts, lists) go in as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return "json:" + json.dumps(value, sort_keys=True)
    if value is None:
        return "json:null"
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    if isinstance(value, np.generic):
        return value.item()
    return value
