"""The stage graph behind `cli.py run`: fingerprints, staleness reasons, skip/rerun decisions."""
from pathlib import Path

import pytest

from pipeline.common import MflagError
from pipeline.run.graph import Node, execute, plan


def _graph(tmp_path: Path, calls: list, prep_size=256, model="tiny"):
    def runner(node, by_name):
        calls.append(node.name)
        (node.out_dir / "out.txt").write_text(str(node.params))

    return [
        Node("prepare", tmp_path / "prepare", {"size": prep_size}, (), runner),
        Node("embed-text", tmp_path / "embed", {"model": model}, ("prepare",), runner),
        Node("train:mflag", tmp_path / "train", {"orth": 1.0}, ("prepare", "embed-text"), runner),
        Node("eval:cls", tmp_path / "eval", {"task": "cls"}, ("train:mflag",), runner),
    ]


def test_first_run_runs_everything_and_rerun_skips(tmp_path):
    calls = []
    execute(_graph(tmp_path, calls))
    assert calls == ["prepare", "embed-text", "train:mflag", "eval:cls"]
    calls.clear()
    summary = execute(_graph(tmp_path, calls))
    assert calls == []
    assert {s["action"] for s in summary} == {"skipped"}


def test_changing_text_model_reruns_embed_and_downstream_only(tmp_path):
    calls = []
    execute(_graph(tmp_path, calls))
    calls.clear()
    nodes = _graph(tmp_path, calls, model="other")
    _, steps = plan(nodes)
    states = {n.name: (s.state, s.reason) for n, s, _ in steps}
    assert states["prepare"][0] == "fresh"
    assert states["embed-text"] == ("stale", "options changed: model")
    assert "upstream embed-text changed" in states["train:mflag"][1]
    execute(nodes)
    assert calls == ["embed-text", "train:mflag", "eval:cls"]


def test_force_and_from(tmp_path):
    calls = []
    execute(_graph(tmp_path, calls))
    calls.clear()
    execute(_graph(tmp_path, calls), force=("embed-text",))
    assert calls == ["embed-text", "train:mflag", "eval:cls"]
    calls.clear()
    execute(_graph(tmp_path, calls), from_stage="train")  # prefix of "train:mflag"
    assert calls == ["train:mflag", "eval:cls"]
    with pytest.raises(MflagError, match="unknown stage"):
        execute(_graph(tmp_path, calls), force=("nope",))


def test_crash_mid_stage_leaves_it_missing(tmp_path):
    calls = []
    execute(_graph(tmp_path, calls))
    nodes = _graph(tmp_path, calls, prep_size=128)

    def boom(node, by_name):
        raise RuntimeError("killed")

    nodes[0].run = boom
    with pytest.raises(RuntimeError):
        execute(nodes)
    _, steps = plan(_graph(tmp_path, calls, prep_size=128))
    assert steps[0][1].state == "missing"


def test_stale_outputs_are_removed_but_interrupted_same_config_is_kept(tmp_path):
    calls = []
    execute(_graph(tmp_path, calls))
    leftover = tmp_path / "prepare" / "old-config-output.bin"
    leftover.write_bytes(b"x")
    execute(_graph(tmp_path, calls, prep_size=128))  # stale: old outputs must not survive
    assert not leftover.exists()

    nodes = _graph(tmp_path, calls, prep_size=64)
    partial = tmp_path / "prepare" / "partial-shard.tar"

    def interrupted(node, by_name):
        partial.write_bytes(b"half")
        raise KeyboardInterrupt

    nodes[0].run = interrupted
    with pytest.raises(KeyboardInterrupt):
        execute(nodes)
    seen = []

    def resume(node, by_name):
        seen.append(partial.exists())

    nodes = _graph(tmp_path, calls, prep_size=64)
    nodes[0].run = resume
    execute(nodes)
    assert seen == [True]  # same options: the partial output is there to resume from


def test_path_signature_follows_content_not_copies_or_times(tmp_path):
    import os
    import shutil

    from pipeline.run.graph import path_signature

    root = tmp_path / "data"
    (root / "files").mkdir(parents=True)
    (root / "labels.csv").write_text("id,label\n1,0\n")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    sig = path_signature(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # new mtimes, same content
    os.utime(copy / "labels.csv", (1, 1))
    assert path_signature(copy) == sig
    (root / "labels.csv").write_text("id,label\n1,1\n")  # same size, other content
    assert path_signature(root) != sig
    data = bytearray((copy / "big.bin").read_bytes())
    data[-10] ^= 0xFF  # a change in the last MiB of a large file (a zip's or checkpoint's index)
    (copy / "big.bin").write_bytes(bytes(data))
    assert path_signature(copy) != sig
    assert path_signature(tmp_path / "nothing") == "missing"


def test_a_replaced_external_input_makes_the_stage_stale(tmp_path):
    from pipeline.run.graph import path_signature

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"a" * 100)
    calls = []

    def graph():
        nodes = _graph(tmp_path, calls, model=str(model))
        nodes[1].inputs = {"format": 1, "model": path_signature(model)}
        return nodes

    execute(graph())
    calls.clear()
    execute(graph())
    assert calls == []
    (model / "weights.bin").write_bytes(b"b" * 100)
    _, steps = plan(graph())
    states = {n.name: (s.state, s.reason) for n, s, _ in steps}
    assert states["prepare"][0] == "fresh"
    assert states["embed-text"] == ("stale", "input model changed")
    execute(graph())
    assert calls == ["embed-text", "train:mflag", "eval:cls"]


def test_progress_names_each_stage_of_how_many_with_the_time_so_far(tmp_path, caplog):
    import logging
    import re

    calls = []
    execute(_graph(tmp_path, calls))
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        execute(_graph(tmp_path, calls), force=("embed",), log=logger)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "3 of 4 stage(s) to run"
    running = [m for m in lines if "running" in m]
    assert [re.match(r"\[(\d)/(\d), (\d+ s|\d+ min \d\d s) elapsed\] stage (\S+): running", m).group(1, 2, 4)
            for m in running] == [("1", "3", "embed-text"), ("2", "3", "train:mflag"), ("3", "3", "eval:cls")]
    assert sum("done in" in m for m in lines) == 3
