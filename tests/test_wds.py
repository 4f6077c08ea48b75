"""The webdataset pipeline: deterministic order, disjoint ranks, fast-forward, bad samples, shard specs."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.pretrain import wds as wdsp
from tests._train_helpers import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("wds"), n_train=24, n_val=4, per_shard=4, size=16)


def batches(world, n, batch_size=4, **state_kw):
    urls = list(wdsp.resolve_shards(str(world["shards"])).urls)
    state = wdsp.StreamState(seed=state_kw.pop("seed", 1), **state_kw)
    pipe = wdsp.train_pipeline(urls, state, wdsp.CacheTargets(world["cache"]), batch_size, 16, shuffle_buffer=6)
    it = iter(pipe)
    return [next(it) for _ in range(n)]


def keys(bs):
    return [k for b in bs for k in b["key"]]


def test_batches_join_the_cached_embedding_by_study(world):
    from cache import TextEmbeddingCache

    b = batches(world, 1)[0]
    assert b["image"].shape == (4, 1, 16, 16) and b["image"].dtype == torch.uint8
    cache = TextEmbeddingCache(world["cache"])
    for sid, row in zip(b["study_id"], b["target"]):
        assert torch.equal(row, torch.from_numpy(cache.lookup([sid])[0]))
    assert all(k == f"d{s}" for k, s in zip(b["key"], b["study_id"]))


def test_order_is_a_function_of_seed_and_epoch(world):
    a, b = keys(batches(world, 5)), keys(batches(world, 5))
    assert a == b
    assert keys(batches(world, 5, epoch=1)) != a
    assert keys(batches(world, 5, seed=2)) != a


def test_ranks_read_disjoint_shards(world):
    r0 = batches(world, 6, rank=0, world_size=2)
    r1 = batches(world, 6, rank=1, world_size=2)
    s0 = {u for b in r0 for u in b["urls"]}
    s1 = {u for b in r1 for u in b["urls"]}
    assert s0 and s1 and not (s0 & s1)
    assert len(s0 | s1) == 6  # every shard is used by someone
    assert not set(keys(r0)) & set(keys(r1))


def test_fast_forward_reproduces_the_stream_without_the_skipped_samples(world):
    full = batches(world, 4)
    skip = full[1]["meta"]["raw"]
    resumed = batches(world, 2, skip={0: skip})
    assert keys(resumed) == keys(full[2:])
    assert torch.equal(resumed[0]["image"], full[2]["image"])


def test_resumed_loader_with_workers_continues_the_batch_order(world):
    """Two DataLoader workers: batch i comes from worker i % 2. Resuming after 3 batches rotates the
    workers so that batches 4 and 5 are the same as in the uninterrupted loader."""
    urls = list(wdsp.resolve_shards(str(world["shards"])).urls)
    targets = wdsp.CacheTargets(world["cache"])

    def loader_batches(n, **kw):
        state = wdsp.StreamState(seed=3, **kw)
        pipe = wdsp.train_pipeline(urls, state, targets, 4, 16, shuffle_buffer=6)
        it = iter(wdsp.make_loader(pipe, num_workers=2))
        out = [next(it) for _ in range(n)]
        del it
        return out

    full = loader_batches(5)
    assert [b["meta"]["worker"] for b in full] == [0, 1, 0, 1, 0]
    pos = {}
    for b in full[:3]:
        pos[b["meta"]["worker"]] = b["meta"]["raw"]
    resumed = loader_batches(2, rotation=3 % 2, skip=pos)
    assert keys(resumed) == keys(full[3:])
    assert [b["meta"]["worker"] for b in resumed] == [1, 0]


def test_missing_studies_are_counted_and_skipped(tmp_path):
    w = make_world(tmp_path, n_train=8, n_val=0, per_shard=8, size=16, missing=2)
    bs = batches(w, 3, batch_size=2)
    assert not set(keys(bs)) & {f"d{s}" for s in w["missing"]}
    assert sum(b["meta"]["missing"] for b in bs) >= 1


def test_on_missing_error_ends_the_stream_with_a_message(tmp_path):
    w = make_world(tmp_path, n_train=8, n_val=2, per_shard=8, size=16, missing=8)
    urls = list(wdsp.resolve_shards(str(w["shards"])).urls)
    state = wdsp.StreamState(seed=0)
    pipe = wdsp.train_pipeline(urls, state, wdsp.CacheTargets(w["cache"]), 2, 16, on_missing="error")
    first = next(iter(pipe))
    assert "error" in first and "not in the text cache" in first["error"] and "study_id 5" in first["error"]


def test_skipping_missing_studies_never_runs_forever():
    # A text cache of other shards: every sample is skipped, so no batch would ever come. A long
    # run of misses ends the stream with an error item instead; a hit resets the count.
    samples = [{"study_id": str(i), "key": f"d{i}", "url": "train-000000.tar"} for i in range(10)]
    join = wdsp.JoinText(wdsp.StreamState(), targets={"2"}, max_missing_run=3)
    out = list(join(iter(samples)))
    assert [o.get("study_id") for o in out[:1]] == ["2"]
    err = out[-1].get("__error__", "")
    assert "3 samples in a row" in err and "study_id 5" in err
    assert len(out) == 2


def test_check_targets_cover_reads_study_ids_of_the_first_shard(tmp_path):
    w = make_world(tmp_path, n_train=8, n_val=0, per_shard=4, size=16, missing=0)
    urls = list(wdsp.resolve_shards(str(w["shards"])).urls)
    assert wdsp.check_targets_cover(urls, wdsp.CacheTargets(w["cache"])) == (4, 4, [])
    found, read, missing = wdsp.check_targets_cover(urls, {"50000001"})
    assert (found, read) == (1, 4) and missing == ["50000000", "50000002", "50000003"]
    assert wdsp.check_targets_cover(["pipe:cat x.tar"], set()) == (0, 0, [])

    # a corrupt json member (bad UTF-8) is skipped, as the stream skips it; the check still answers
    import io
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.json", b'{"study_id": "\xff2"}'), ("b.json", b'{"study_id": "50000001"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert wdsp.check_targets_cover([str(bad)], {"50000001"}) == (1, 1, [])


def test_held_out_batch_stops_at_a_long_run_without_targets(tmp_path, monkeypatch):
    # Probe shards of another prepare output: the probe batch is simply empty (probes off), no crash.
    monkeypatch.setattr(wdsp.JoinText.__init__, "__defaults__", ("skip", 3))  # a short run limit
    w = make_world(tmp_path, n_train=8, n_val=8, per_shard=8, size=16)
    urls = [str(u) for u in sorted(Path(w["shards"]).glob("validate-*.tar"))]
    assert wdsp.read_fixed_batch(urls, {"nothing"}, 4, 16) is None
    assert wdsp.read_fixed_batch(urls, wdsp.CacheTargets(w["cache"]), 4, 16)["image"].shape[0] == 4


def test_corrupt_images_and_truncated_tars_are_counted_and_skipped(tmp_path, caplog):
    w = make_world(tmp_path, n_train=12, n_val=2, per_shard=4, size=16, corrupt=1)
    # shard 1 is cut inside a member (its last sample loses its image); shard 2 is not a tar at all
    tar = w["shards"] / "train-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    (w["shards"] / "train-000002.tar").write_bytes(b"this is not a tar file" * 100)
    caplog.set_level("WARNING", logger="pipeline.pretrain.wds")
    bs = batches(w, 6, batch_size=2)
    assert sum(b["meta"]["corrupt"] for b in bs) >= 3
    assert not set(keys(bs)) & set(w["corrupt"])
    log = caplog.text
    assert "corrupt sample skipped" in log and "sample d50000001: UnidentifiedImageError" in log
    assert re.search(r"train-000001\.tar sample d\d+: ValueError: needs an image and a json member", log)
    assert "unreadable shard data skipped" in log and "train-000002.tar" in log


def test_resolve_shards_forms(tmp_path, world):
    folder = world["shards"]
    s = wdsp.resolve_shards(str(folder))
    assert len(s.urls) == 6 and s.num_samples == 24 and all("train-" in u for u in s.urls)
    brace = wdsp.resolve_shards(str(folder / "train-{000000..000002}.tar"))
    assert len(brace.urls) == 3 and brace.num_samples == 12
    # a prepare output folder: manifest.json + shards/
    out = tmp_path / "prep"
    shutil.copytree(folder, out / "shards")
    (out / "manifest.json").write_text(json.dumps(
        {"splits": {"train": {"shards": ["train-000000.tar", "train-000001.tar"], "count": 8}}}))
    prep = wdsp.resolve_shards(str(out))
    assert [Path(u).name for u in prep.urls] == ["train-000000.tar", "train-000001.tar"] and prep.num_samples == 8
    assert [Path(u).name for u in wdsp.heldout_shards(prep)] == ["validate-000000.tar"]
    piped = wdsp.resolve_shards("pipe:cat /data/train-{0..3}.tar")
    assert len(piped.urls) == 4 and piped.num_samples is None
    with pytest.raises(wdsp.DataError, match=r"train-0000\d\d.tar: no such folder, shard or URL"):
        wdsp.resolve_shards(str(folder / "train-{000000..000009}.tar"))
    with pytest.raises(wdsp.DataError, match="prepar: no such folder, shard or URL"):
        wdsp.resolve_shards(str(tmp_path / "prepar"))  # a mistyped folder is not called a shard
    with pytest.raises(wdsp.DataError, match="no .tar shards"):
        wdsp.resolve_shards(str((tmp_path / "empty").mkdir() or tmp_path / "empty"))


def test_too_few_shards_for_the_workers():
    with pytest.raises(wdsp.DataError, match="cannot feed 2 rank"):
        wdsp.assign_shards(["a.tar", "b.tar"], rank=1, world_size=2, worker=1, n_workers=2)
    assert wdsp.assign_shards(list("abcdefgh"), 1, 2, 1, 2) == ["d", "h"]


def test_shard_assignment_is_disjoint_and_redrawn_each_epoch():
    urls = [f"s{i:02d}" for i in range(10)]  # 10 shards over 2 ranks x 2 workers: 3, 3, 2, 2 per slot
    per_epoch = []
    for epoch in range(6):
        seed = wdsp.stream_seed(0, epoch, 0, 0, "assign")
        slots = [wdsp.assign_shards(urls, r, 2, w, 2, shuffle_seed=seed) for r in range(2) for w in range(2)]
        assert sorted(sum(slots, [])) == urls  # disjoint and complete in every epoch
        per_epoch.append([frozenset(x) for x in slots])
    # the shards that share the small slots (read most often) change from epoch to epoch
    assert len({frozenset(x for x in e if len(x) == 2) for e in per_epoch}) > 1


def test_read_reports_names_bad_lines(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"study_id": "1", "text": "a"}\n{"study_id": 2}\n')
    with pytest.raises(wdsp.DataError, match="line 2"):
        wdsp.read_reports(p)


def test_raw_npy_images_decode_without_pickle_to_the_same_pixels():
    import io

    import numpy as np

    from tests._train_helpers import png_bytes

    img = (np.arange(40 * 40) % 251).astype(np.uint8).reshape(40, 40)
    buf = io.BytesIO()
    np.save(buf, img)
    assert np.array_equal(wdsp.decode_image(buf.getvalue(), "npy"), wdsp.decode_image(png_bytes(img), "png"))
    bad = io.BytesIO()
    np.save(bad, img.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        wdsp.decode_image(bad.getvalue(), "npy")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # pickled payloads are refused, never executed
        wdsp.decode_image(obj.getvalue(), "npy")
