"""embed-text end to end with a tiny BERT built in a fixture and loaded through the real path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cache import CacheError, CacheMismatchError, TextEmbeddingCache
from cache.verify import verify_cache
from pipeline.text.embedding import plan_batches
from pipeline.text.models import TextModelError, build_tiny_bert, load_text_model
from stages.embed_text import EmbedTextConfig, ReportInputError, run
from tests._text_helpers import make_reports, reference_embeddings, write_jsonl

REPO = Path(__file__).resolve().parents[1]
MAXPOS = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    rows = make_reports(40, seed=3, dup_every=4, long_every=9)
    reports = write_jsonl(root / "reports.jsonl", rows)
    model = build_tiny_bert([r["text"] for r in rows], root / "bert", hidden=32, layers=2, heads=2,
                            vocab_size=300, seed=0, max_position=MAXPOS)
    return {"root": root, "rows": rows, "reports": reports, "model": model}


def cfg(world, out, **kw):
    base = dict(reports=str(world["reports"]), out=str(out), model=str(world["model"]), device="cpu",
                max_length=64, store_dtype="float32", shard_size=16, token_budget=300)
    base.update(kw)
    return EmbedTextConfig(**base)


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("part-*.h5"))}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cache_equals_one_at_a_time_forward(world, tmp_path, pooling):
    res = run(cfg(world, tmp_path, pooling=pooling))
    assert res.complete and res.count == 40 and res.n_shards == 3
    assert res.n_truncated > 0  # the long reports exceed 64 tokens: truncation is exercised
    c = TextEmbeddingCache(tmp_path, expect={"pooling": pooling, "max_length": 64})
    keys = [r["study_id"] for r in world["rows"]]
    ref = reference_embeddings(world["model"], [r["text"] for r in world["rows"]], pooling, 64)
    got = c.lookup(keys)
    assert np.abs(got - ref).max() < 1e-5
    assert c.attrs["n_truncated"] == res.n_truncated and c.attrs["dim"] == 32
    assert c.attrs["text_encoder_params"] > 0 and c.attrs["revision"].startswith("sha256:")


def test_batches_sorted_and_within_budget():
    lengths = [5, 50, 7, 7, 30, 120, 3]
    batches = plan_batches(lengths, 100)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    assert [lengths[i] for i in flat] == sorted(lengths)
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100


def test_dedupe_embeds_each_text_once(world, tmp_path):
    res = run(cfg(world, tmp_path, shard_size=1000))
    distinct = {r["text"] for r in world["rows"]}
    assert res.n_embedded == len(distinct) < 40
    c = TextEmbeddingCache(tmp_path)
    by_text: dict[str, list[str]] = {}
    for r in world["rows"]:
        by_text.setdefault(r["text"], []).append(r["study_id"])
    groups = [ks for ks in by_text.values() if len(ks) > 1]
    assert groups
    for ks in groups:
        e = c.lookup(ks)
        assert (e == e[0]).all()


KILL_SCRIPT = """
import json, sys, time
sys.path.insert(0, {repo!r})
from cache import writer
orig = writer.write_shard
def slow(*a, **k):
    out = orig(*a, **k)
    print("wrote", flush=True)
    time.sleep(0.4)
    return out
writer.write_shard = slow
from stages.embed_text import EmbedTextConfig, run
run(EmbedTextConfig(**json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_identical(world, tmp_path):
    kw = dict(shard_size=5, store_dtype="float16")
    config = cfg(world, tmp_path / "killed", **kw)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    args = json.dumps({k: getattr(config, k) for k in config.__dataclass_fields__})
    proc = subprocess.Popen([sys.executable, str(script), args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        wrote = 0
        deadline = time.monotonic() + 60
        while wrote < 2 and time.monotonic() < deadline:
            if proc.stdout.readline().strip() == "wrote":
                wrote += 1
        assert wrote == 2
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    folder = next((tmp_path / "killed").iterdir())
    assert not (folder / "index.json").exists()
    n_before = len(list(folder.glob("part-*.h5")))
    assert 2 <= n_before < 8
    (folder / ".part-00007.h5.abc123.tmp").write_bytes(b"half a shard")  # a write cut short

    resumed = run(config)
    assert resumed.shards_skipped == n_before and resumed.shards_written == 8 - n_before
    assert not list(folder.glob(".*.tmp"))
    clean = run(cfg(world, tmp_path / "clean", **kw))
    assert clean.cache_dir.name == folder.name
    assert shard_bytes(folder) == shard_bytes(clean.cache_dir)
    assert (folder / "index.json").read_bytes() == (clean.cache_dir / "index.json").read_bytes()
    again = run(config)  # a complete cache: nothing is recomputed
    assert again.shards_written == 0 and again.shards_skipped == 8
    assert verify_cache(folder)["ok"]


def test_fingerprint_changes(world, tmp_path):
    rows = world["rows"][:10]
    small = write_jsonl(tmp_path / "small.jsonl", rows)
    other_texts = write_jsonl(tmp_path / "other.jsonl", [{**rows[0], "text": "changed text"}, *rows[1:]])
    other_model = build_tiny_bert([r["text"] for r in world["rows"]], tmp_path / "bert2", hidden=32,
                                  layers=2, heads=2, vocab_size=300, seed=1, max_position=MAXPOS)
    out = tmp_path / "out"
    base = dict(reports=str(small), shard_size=100)
    names = {}
    for label, kw in {"base": {}, "model": {"model": str(other_model)}, "pooling": {"pooling": "mean"},
                      "max_length": {"max_length": 48}, "texts": {"reports": str(other_texts)},
                      "store": {"store_dtype": "float16"}}.items():
        names[label] = run(cfg(world, out, **{**base, **kw})).cache_dir.name
    assert len(set(names.values())) == len(names), names
    rerun = run(cfg(world, out, **base))
    assert rerun.cache_dir.name == names["base"] and rerun.shards_written == 0
    # Settings that do not change the content keep the folder.
    assert run(cfg(world, out, **base, token_budget=64)).cache_dir.name == names["base"]


def test_parts_by_hand_make_the_same_cache(world, tmp_path):
    whole = run(cfg(world, tmp_path / "whole", shard_size=8))
    p1 = run(cfg(world, tmp_path / "parts", shard_size=8, num_parts=2, part=1))
    assert not p1.complete and p1.shards_written == 2  # shards 1, 3
    assert not (p1.cache_dir / "index.json").exists()
    p0 = run(cfg(world, tmp_path / "parts", shard_size=8, num_parts=2, part=0))
    assert p0.complete and p0.shards_written == 3 and p0.cache_dir.name == whole.cache_dir.name
    assert shard_bytes(p0.cache_dir) == shard_bytes(whole.cache_dir)


def test_parts_run_with_different_process_counts_cover_every_shard(world, tmp_path):
    # Part 0 on a 2-process machine, part 1 on a 1-process one: every shard written exactly once.
    from pipeline.distributed import DistInfo
    from stages.embed_text import _run

    whole = run(cfg(world, tmp_path / "whole", shard_size=4))
    out = tmp_path / "mixed"
    written = []
    for rank in (1, 0):  # the two ranks of part 0, one after the other
        res = _run(cfg(world, out, shard_size=4, num_parts=2, part=0), "cpu",
                   DistInfo(rank=rank, world_size=2), lambda d: None)
        written.append(res.shards_written)
    assert not (res.cache_dir / "index.json").exists()
    last = run(cfg(world, out, shard_size=4, num_parts=2, part=1))
    written.append(last.shards_written)
    assert last.complete and sum(written) == len(list(whole.cache_dir.glob("part-*.h5")))
    assert shard_bytes(last.cache_dir) == shard_bytes(whole.cache_dir)


def test_non_finite_embeddings_are_refused(world, tmp_path, monkeypatch):
    from pipeline.text.models import TextEncoder

    real = TextEncoder.pool

    def overflow(self, *a, **k):
        out = real(self, *a, **k)
        out[..., 0] = 7e4  # beyond float16: inf once stored
        return out

    monkeypatch.setattr(TextEncoder, "pool", overflow)
    with pytest.raises(CacheError, match=r"not finite .*float16 store .*--store-dtype float32"):
        run(cfg(world, tmp_path / "c", shard_size=8, store_dtype="float16"))
    assert not list((tmp_path / "c").rglob("part-*.h5"))


def test_a_moved_model_folder_reuses_the_cache(world, tmp_path):
    import shutil

    first = run(cfg(world, tmp_path / "c", shard_size=8))
    moved = tmp_path / "elsewhere" / "bert"
    shutil.copytree(world["model"], moved)  # the same weights on another mount
    again = run(cfg(world, tmp_path / "c", shard_size=8, model=str(moved)))
    assert again.cache_dir == first.cache_dir and again.shards_written == 0 and again.complete


@pytest.mark.slow
def test_torchrun_two_processes_match_single(world, tmp_path):
    single = run(cfg(world, tmp_path / "single", shard_size=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "cli.py"), "-q", "embed-text", "--reports", str(world["reports"]),
           "--out", str(tmp_path / "dist"), "--model", str(world["model"]), "--device", "cpu",
           "--max-length", "64", "--store-dtype", "float32", "--shard-size", "8", "--token-budget", "300"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 shards written" in proc.stdout  # rank 0 wrote shards 0, 2, 4; rank 1 wrote 1, 3
    dist_dir = tmp_path / "dist" / single.cache_dir.name
    assert verify_cache(dist_dir)["ok"]
    a, b = TextEmbeddingCache(single.cache_dir), TextEmbeddingCache(dist_dir)
    assert a.keys == b.keys
    np.testing.assert_allclose(a.lookup(a.keys), b.lookup(a.keys), atol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_non_utf8_line_is_named(world, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"study_id": "1", "text": "fine"}\n{"study_id": "2", "text": "caf\xe9"}\n')
    with pytest.raises(ReportInputError, match=r"bad.jsonl: line 2: not valid UTF-8"):
        run(cfg(world, tmp_path / "o", reports=str(p)))


def test_conflicting_duplicate_key_lists_both(world, tmp_path):
    p = write_jsonl(tmp_path / "dup.jsonl", [{"study_id": "7", "text": "no effusion"},
                                             {"study_id": "8", "text": "same"},
                                             {"study_id": "8", "text": "same"},
                                             {"study_id": "7", "text": "small effusion"}])
    with pytest.raises(ReportInputError, match=r"key '7': line 1 'no effusion' vs line 4 'small effusion'"):
        run(cfg(world, tmp_path / "o", reports=str(p)))


def test_empty_text_skip_or_error(world, tmp_path):
    rows = [{"study_id": "1", "text": "no acute process"}, {"study_id": "2", "text": "   "},
            {"study_id": "3", "text": None}, {"study_id": "4", "text": "small effusion"}]
    p = write_jsonl(tmp_path / "empty.jsonl", rows)
    res = run(cfg(world, tmp_path / "o", reports=str(p)))
    assert res.n_empty == 2 and res.count == 2
    c = TextEmbeddingCache(res.cache_dir)
    assert c.keys == ["1", "4"] and c.attrs["input"]["empty"] == 2
    with pytest.raises(ReportInputError, match=r"2 report\(s\) with empty text: '2' \(line 2\)"):
        run(cfg(world, tmp_path / "o2", reports=str(p), on_empty="error"))


def test_csv_input_with_columns(world, tmp_path):
    p = tmp_path / "r.csv"
    p.write_text('id,report\nA,"no acute, process"\nB,"line one\nline two"\n', encoding="utf-8")
    res = run(cfg(world, tmp_path / "o", reports=str(p), key_column="id", text_column="report"))
    assert TextEmbeddingCache(res.cache_dir).keys == ["A", "B"]
    with pytest.raises(ReportInputError, match="no column 'study_id'"):
        run(cfg(world, tmp_path / "o", reports=str(p)))


def test_resume_with_other_model_is_refused(world, tmp_path):
    first = run(cfg(world, tmp_path / "o", shard_size=100))
    before = shard_bytes(first.cache_dir)
    other = build_tiny_bert([r["text"] for r in world["rows"]], tmp_path / "wide", hidden=48, layers=1,
                            heads=2, vocab_size=300, seed=5, max_position=MAXPOS)
    with pytest.raises(CacheMismatchError, match="part-00000.h5: written by a different configuration.*dim=32"):
        run(cfg(world, first.cache_dir, shard_size=100, model=str(other)))
    assert shard_bytes(first.cache_dir) == before


def test_write_error_leaves_no_partial_shard(world, tmp_path, monkeypatch):
    import h5py

    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, name, *a, **k):
        if name == "emb":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(CacheError, match=r"part-00001.h5: cannot write shard.*No space left"):
        run(cfg(world, tmp_path / "o"))
    folder = next((tmp_path / "o").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.h5"]
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    res = run(cfg(world, tmp_path / "o"))
    assert res.complete and res.shards_skipped == 1 and res.shards_written == 2


# --------------------------------------------------------------------------- loading
def _fake_cxr_bert(src: Path, dst: Path, with_proj: bool, drop: str | None = None) -> Path:
    """The CXR-BERT layout: BertForMaskedLM-style keys, MLM head, projection head, remote-code config."""
    from safetensors.torch import load_file

    dst.mkdir()
    sd = {f"bert.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()
          if not k.startswith("pooler.")}
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    g = torch.Generator().manual_seed(0)
    sd["cls.predictions.bias"] = torch.zeros(10)
    sd["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden, generator=g)
    if with_proj:
        for name, shape in {"dense_to_hidden.weight": (16, hidden), "dense_to_hidden.bias": (16,),
                            "LayerNorm.weight": (16,), "LayerNorm.bias": (16,),
                            "dense_to_output.weight": (16, 16), "dense_to_output.bias": (16,)}.items():
            sd[f"cls_projection_head.{name}"] = torch.randn(*shape, generator=g)
    if drop:
        del sd[drop]
    torch.save(sd, dst / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="cxr-bert", architectures=["CXRBertModel"], projection_size=16,
                  auto_map={"AutoModel": "modeling_cxrbert.CXRBertModel"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "vocab.txt").write_text((src / "vocab.txt").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                           "tokenizer_class": "BertTokenizer"}))
    return dst


def test_cxr_bert_layout_loads_without_remote_code(world, tmp_path):
    fake = _fake_cxr_bert(world["model"], tmp_path / "cxr", with_proj=True)
    ref = load_text_model(str(world["model"]))
    enc = load_text_model(str(fake), pooling="proj")
    assert enc.kind == "cxr-bert" and enc.dim("proj") == 16 and enc.dim("cls") == 32
    batch = ref.tokenizer(["no acute process", "small left effusion"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        np.testing.assert_allclose(enc.pool(batch["input_ids"], batch["attention_mask"], "cls"),
                                   ref.pool(batch["input_ids"], batch["attention_mask"], "cls"), atol=1e-6)
        proj = enc.pool(batch["input_ids"], batch["attention_mask"], "proj")
    np.testing.assert_allclose(proj.norm(dim=1).numpy(), 1.0, atol=1e-5)
    res = run(cfg(world, tmp_path / "o", model=str(fake), pooling="proj"))
    assert TextEmbeddingCache(res.cache_dir, expect={"pooling": "proj", "dim": 16}).dim == 16

    no_head = _fake_cxr_bert(world["model"], tmp_path / "general", with_proj=False)
    with pytest.raises(TextModelError, match="projection head"):
        load_text_model(str(no_head), pooling="proj")
    broken = _fake_cxr_bert(world["model"], tmp_path / "broken", with_proj=False,
                            drop="bert.encoder.layer.1.output.dense.weight")
    with pytest.raises(TextModelError, match="lacks encoder weights encoder.layer.1.output.dense.weight"):
        load_text_model(str(broken))


def test_offline_uncached_hub_id_fails_fast(world, tmp_path, monkeypatch):
    # "Fast" means: no download is ever attempted (huggingface_hub is asked for local files only),
    # so no network timeout or retry loop can run; measured by what is called, not by a clock.
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(cli.cli, ["embed-text", "--reports", str(world["reports"]),
                                     "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 2 and calls == [True]
    assert "microsoft/BiomedVLP-CXR-BERT-general" in r.output and "local directory" in r.output
    # No offline flag but no reachable hub either: detected by one short probe, same advice.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(TextModelError, match="pass --model DIR"):
        load_text_model("some-org/uncached-model")
    assert calls == [True, True]
    with pytest.raises(TextModelError, match="no such directory"):
        load_text_model(str(tmp_path / "nope" / "model"))
    assert calls == [True, True]


def test_cli_embed_info_verify(world, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["embed-text", "--reports", str(world["reports"]), "--out",
                                str(tmp_path / "o"), "--model", str(world["model"]), "--device", "cpu",
                                "--max-length", "64", "--shard-size", "25"])
    assert r.exit_code == 0, r.output
    folder = next((tmp_path / "o").iterdir())
    info = runner.invoke(cli.cli, ["cache", "info", str(tmp_path / "o")])
    assert info.exit_code == 0 and "count: 40  dim: 32  shards: 2" in info.output
    assert "n_truncated:" in info.output and "store_dtype: float16" in info.output
    ok = runner.invoke(cli.cli, ["cache", "verify", str(folder)])
    assert ok.exit_code == 0 and "ok:" in ok.output
    shard = folder / "part-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-100])
    bad = runner.invoke(cli.cli, ["cache", "verify", str(folder)])
    assert bad.exit_code == 2 and "part-00001.h5" in bad.output
    r = runner.invoke(cli.cli, ["embed-text", "--reports", str(tmp_path / "missing.jsonl"), "--out",
                                str(tmp_path / "o"), "--model", str(world["model"])])
    assert r.exit_code == 2 and "missing.jsonl" in r.output
