"""pipeline.corpora: the corpus registry, MIMIC unchanged by it, and the shared reader helpers."""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest

from pipeline.corpora import CORPORA, corpus_of
from pipeline.corpora.base import draw_split, image_key, natural_key
from stages.prepare import PrepareConfig, run

# Hashes of prepare's outputs on the synthetic MIMIC world, recorded from the code before corpora
# existed (main @ 8101099). The shard bytes hold encoded images, so they are compared only with the
# library versions they were recorded with; everything else must match anywhere.
BEFORE_CORPORA = {
    "png": {
        "shards/test-000000.tar": "0e25a41accb9bc2b",
        "shards/train-000000.tar": "7afa0d0bd311c200",
        "shards/train-000001.tar": "76184f7df5d2e9d0",
        "shards/train-000002.tar": "ad713d75bea63f05",
        "shards/validate-000000.tar": "cd2607fe474078a3",
        "shards/sizes.json": "9038930257463082",
        "reports.jsonl": "da97dfa9f03f1f7b",
        "manifest.json": "c0f1aff59c935fa0",
    },
    "raw_views": {
        "shards/test-000000.tar": "c89e0caf6a036702",
        "shards/train-000000.tar": "328a80dd5e05a5c9",
        "shards/train-000001.tar": "8afe28ee3d27eb34",
        "shards/train-000002.tar": "d72a7d95202a26f6",
        "shards/train-000003.tar": "7125176e4837e266",
        "shards/train-000004.tar": "ac3153b4d4568562",
        "shards/validate-000000.tar": "def3b5b7e8f567e3",
        "shards/sizes.json": "3c20fca99db795ec",
        "reports.jsonl": "db2845fa592a30b0",
        "manifest.json": "2fcfab24f117622c",
    },
    "jpg_sep": {
        "shards/test-000000.tar": "1a3c4239d2c8148c",
        "shards/train-000000.tar": "04182fc81720718a",
        "shards/train-000001.tar": "b274aa708e5d5745",
        "shards/train-000002.tar": "192c0f5cd34e1d6b",
        "shards/sizes.json": "d51b056cc0527685",
        "reports.jsonl": "4fef2ee82adf3189",
        "manifest.json": "cf3742bd53b759be",
    },
}
RECORDED_WITH = {"zlib": "1.2.13", "PIL": "13.0.0", "numpy": "2.4.6"}
VARIANTS = {
    "png": {},
    "raw_views": {"image_format": "raw", "views": ("PA", "AP", "LATERAL"), "text_sections": ("findings",)},
    "jpg_sep": {"image_format": "jpg", "section_separator": " | ", "splits": ("train", "test"), "crop_border": False},
}


def test_mimic_outputs_are_byte_identical_to_before_the_corpus_registry(tmp_path):
    from pipeline.synth.mimic import write_mimic

    root = tmp_path / "synth"
    write_mimic(root, n_studies=12, seed=0, image_size=96)
    same_libs = RECORDED_WITH == {"zlib": zlib.ZLIB_RUNTIME_VERSION, "PIL": PIL.__version__, "numpy": np.__version__}
    for name, kw in VARIANTS.items():
        out = tmp_path / name
        cfg = PrepareConfig(root=str(root), out=str(out), size=32, shard_size=3, workers=1, **kw)
        assert corpus_of(cfg) is CORPORA["mimic"]
        run(cfg)
        got = {p: hashlib.sha256((out / p).read_bytes()).hexdigest()[:16] for p in BEFORE_CORPORA[name]}
        # manifest.json gained shard_files (issue 22: each tar's count, bytes and sha256, checked before
        # training) after these hashes were recorded: the rest of it, as write_json writes it, is unchanged
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        shard_files = man.pop("shard_files")
        assert shard_files == {
            t.name: {"count": json.loads((out / "shards" / "sizes.json").read_text())[t.name],
                     "bytes": t.stat().st_size, "sha256": hashlib.sha256(t.read_bytes()).hexdigest()}
            for t in sorted((out / "shards").glob("*.tar"))}
        got["manifest.json"] = hashlib.sha256(
            (json.dumps(man, indent=2, sort_keys=True) + "\n").encode("utf-8")).hexdigest()[:16]
        assert sorted(p.name for p in (out / "shards").glob("*.tar")) == \
            sorted(p.split("/")[1] for p in BEFORE_CORPORA[name] if p.endswith(".tar"))
        for path, digest in BEFORE_CORPORA[name].items():
            if path.endswith(".tar") and not same_libs:
                continue  # encoded image bytes depend on zlib/Pillow/numpy; see RECORDED_WITH
            assert got[path] == digest, f"{name}: {path} changed"
    if not same_libs:
        pytest.skip(f"shard bytes not compared: libraries differ from {RECORDED_WITH} (the rest matched)")


def test_every_registered_corpus_is_a_command_a_yaml_corpus_and_documented():
    import dataclasses

    from cli import stage_commands
    from pipeline.corpora.base import ShardOptions
    from pipeline.run.spec import corpus_keys

    commands = stage_commands()
    options_md = (Path(__file__).resolve().parents[1] / "docs" / "OPTIONS.md").read_text()
    for name, entry in CORPORA.items():
        cls = entry.config_class()
        assert issubclass(cls, ShardOptions) and callable(entry.load().read)
        assert set(cls.INPUTS) <= {f.name for f in dataclasses.fields(cls)}
        assert commands[f"prepare {name}"].config_class() is cls
        assert name in corpus_keys() and f"### `mflag prepare {name}`" in options_md


@pytest.mark.parametrize("ids, order", [
    (["10", "9", "100"], ["9", "10", "100"]),  # digit-only ids in int() order (MIMIC's reports.jsonl)
    (["CXR10_1_IM-0002", "CXR2_1_IM-0001", "CXR2_1_IM-0010"], ["CXR2_1_IM-0001", "CXR2_1_IM-0010", "CXR10_1_IM-0002"]),
    (["patient00002_1", "patient00001_10", "patient00001_2"], ["patient00001_2", "patient00001_10", "patient00002_1"]),
    (["b", "a10", "a9", "9"], ["9", "a9", "a10", "b"]),
])
def test_natural_key_orders_any_id_and_digits_as_numbers(ids, order):
    assert sorted(ids, key=natural_key) == order


def test_drawn_split_is_a_pure_function_of_seed_and_key_with_the_asked_fractions():
    keys = [str(i) for i in range(4000)]
    a = [draw_split(k, 0, (0.9, 0.05, 0.05)) for k in keys]
    assert a == [draw_split(k, 0, (0.9, 0.05, 0.05)) for k in reversed(keys)][::-1]
    n = {s: a.count(s) for s in ("train", "validate", "test")}
    assert 3500 < n["train"] < 3700 and 150 < n["validate"] < 260 and 150 < n["test"] < 260
    assert a != [draw_split(k, 1, (0.9, 0.05, 0.05)) for k in keys]
    assert {draw_split(k, 0, (0.0, 0.0, 1.0)) for k in keys} == {"test"}


def test_image_keys_are_member_safe_and_distinct():
    paths = ["a/b.png", "a_b.png", "a/b.c.png", "x/../y.png", "ünïcode/ü.jpg", "a/b.jpg"]
    keys = [image_key(p) for p in paths]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    assert image_key("a/b.png") == image_key("a/b.png")
