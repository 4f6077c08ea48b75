"""The HDF5 cache on its own: writer, reader (incl. DataLoader workers), verify/info."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from cache import CacheError, CacheMismatchError, TextEmbeddingCache, write_cache
from cache.verify import cache_info, verify_cache
from tests._text_helpers import KeyDataset


@pytest.fixture
def small_cache(tmp_path):
    rng = np.random.default_rng(0)
    keys = [f"s{i:03d}" for i in range(23)]
    emb = rng.standard_normal((23, 8)).astype(np.float32)
    path = write_cache(tmp_path / "c" / "abc", keys, emb, {"pooling": "cls", "model_id": "m"}, shard_size=5)
    return path, keys, emb


def test_roundtrip_order_and_contract(small_cache, tmp_path):
    path, keys, emb = small_cache
    c = TextEmbeddingCache(path.parent, expect={"pooling": "cls"})  # parent with one cache folder
    assert c.path == path and len(c) == 23 and c.dim == 8 and c.keys == keys
    assert "s007" in c and "nope" not in c
    order = [keys[i] for i in (22, 0, 7, 7, 13)]
    got = c.lookup(order)
    assert got.dtype == np.float32 and got.shape == (5, 8)
    np.testing.assert_array_equal(got, emb[[22, 0, 7, 7, 13]])
    assert len(list(path.glob("part-*.h5"))) == 5
    with pytest.raises(KeyError, match="nope"):
        c.lookup(["s001", "nope"])
    with pytest.raises(CacheMismatchError, match="pooling"):
        TextEmbeddingCache(path, expect={"pooling": "mean"})


def test_float16_storage_and_memmap(tmp_path):
    emb = np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4)
    path = write_cache(tmp_path, [str(i) for i in range(10)], emb, {}, store_dtype="float16")
    c = TextEmbeddingCache(path)
    assert c.attrs["store_dtype"] == "float16"
    np.testing.assert_allclose(c.lookup(["3"])[0], emb[3], atol=1e-3)
    c.lookup(["0"])
    assert all(isinstance(m, np.memmap) for m in c._maps)
    with h5py.File(path / "part-00000.h5") as f:
        assert f["emb"].chunks is None and f["emb"].dtype == np.float16
        assert f.attrs["dim"] == 4 and f.attrs["count"] == 10


def test_write_is_deterministic(tmp_path):
    emb = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float16)
    a = write_cache(tmp_path / "a", list("abcdefg"), emb, {"x": {"n": 1}}, shard_size=3)
    b = write_cache(tmp_path / "b", list("abcdefg"), emb, {"x": {"n": 1}}, shard_size=3)
    for p in a.glob("*.h5"):
        assert p.read_bytes() == (b / p.name).read_bytes()
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())


def test_resolve_errors(tmp_path, small_cache):
    path, keys, emb = small_cache
    with pytest.raises(CacheError, match="not found"):
        TextEmbeddingCache(tmp_path / "missing")
    write_cache(path.parent / "other", keys[:2], emb[:2], {})
    with pytest.raises(CacheError, match="2 text caches"):
        TextEmbeddingCache(path.parent)
    (path / "index.json").unlink()
    with pytest.raises(CacheError, match="unfinished"):
        TextEmbeddingCache(path)


@pytest.mark.slow
@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_reader_in_dataloader_workers(small_cache, ctx):
    path, keys, emb = small_cache
    c = TextEmbeddingCache(path)
    c.lookup(keys[:1])  # opened in the parent: workers must still reopen cleanly
    loader = torch.utils.data.DataLoader(KeyDataset(c, keys), batch_size=4, num_workers=2,
                                         multiprocessing_context=ctx)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, emb)


def test_verify_and_info(small_cache):
    path, keys, emb = small_cache
    info = cache_info(path)
    assert info["count"] == 23 and info["dim"] == 8 and len(info["shards"]) == 5
    assert verify_cache(path)["ok"]


def test_verify_names_bad_file(small_cache):
    path, _, _ = small_cache
    bad = path / "part-00002.h5"
    data = bytearray(bad.read_bytes())
    data[-4] ^= 0xFF  # flip a byte in the embedding payload
    bad.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="part-00002.h5"):
        verify_cache(path)
    trunc = path / "part-00003.h5"
    trunc.write_bytes(trunc.read_bytes()[:-40])
    with pytest.raises(CacheError, match="part-00003.h5.*truncated"):
        TextEmbeddingCache(path).lookup(["s000"])
