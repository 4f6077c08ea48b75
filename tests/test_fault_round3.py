"""The third fault round (issue 22): integrity at every read, preemption-safe training, no code from a
model folder, one stage per folder, declared encodings, degenerate inputs, reproducible files.

Each test is one of the issue's numbered cases (or a fault of the same class), built on the synthetic
worlds the suite already has. New APIs are imported inside the tests, so each test fails on the code
before the fix for the reason it describes.
"""
from __future__ import annotations

import builtins
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cache import write_cache
from tests._train_helpers import cli_args, make_world, tiny_config
from tests.test_hostile_inputs import env, invoke, one_error_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("round3-train"), n_train=8, n_val=4, per_shard=4)


def _fresh_world(tmp_path: Path) -> dict:
    """A private copy of the module's world, for tests that damage it."""
    return make_world(tmp_path / "w", n_train=8, n_val=4, per_shard=4)


def _keyed_cache(folder: Path, world: dict, fp: str, seed: int, shard_size: int = 6) -> Path:
    """A cache of the world's studies with the configuration fingerprint ``fp`` (as embed-text writes)."""
    keys = [s for s, _ in world["train"] + world["val"]]
    emb = np.random.default_rng(seed).normal(size=(len(keys), 16)).astype(np.float32)
    return write_cache(folder, keys, emb, {"model_id": f"synthetic/{fp}", "fingerprint": fp, "pooling": "cls"},
                       shard_size=shard_size)


def _flip_embedding_bit(shard: Path, row: int = 1) -> None:
    with h5py.File(shard, "r") as f:
        offset = f["emb"].id.get_offset()
    with open(shard, "r+b") as fh:
        fh.seek(offset + row * 64 + 3)
        b = fh.read(1)
        fh.seek(offset + row * 64 + 3)
        fh.write(bytes([b[0] ^ 0x04]))


# --------------------------------------------------------------------------- 1. code from a model folder
def _evil_model(tmp_path: Path, marker: Path) -> Path:
    from pipeline.text.models import build_tiny_bert

    folder = build_tiny_bert(["no acute findings", "small effusion"], tmp_path / "evil", hidden=16, layers=1,
                             heads=2, vocab_size=60)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evilbert", architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n"
                                    "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n")
    return folder


def test_model_folder_code_never_runs_even_when_a_terminal_says_yes(tmp_path, monkeypatch):
    """Case 1: transformers asks "Do you wish to run the custom code? [y/N]" on a terminal; here the
    answer is y, and still nothing of the folder runs: its model_type is refused before transformers."""
    marker = tmp_path / "payload-ran"
    folder = _evil_model(tmp_path, marker)
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"study_id": "1", "text": "no acute findings"}) + "\n", encoding="utf-8")
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    res = invoke(["embed-text", "--reports", reports, "--out", tmp_path / "cache", "--model", folder,
                  "--device", "cpu"])
    line = one_error_line(res)
    assert not marker.exists(), "the model folder's Python file ran"
    assert str(folder / "config.json") in line and "'evilbert'" in line and "never runs code" in line, line


@pytest.mark.parametrize("change,named", [
    ({"vocab_size": 4e9}, "vocab_size is 4000000000.0"),
    ({"vocab_size": 4_000_000}, "word_embeddings.weight has shape"),
    ({"intermediate_size": 100_000}, "config.json implies (100000,)"),
])
def test_config_sizes_are_checked_against_the_weights_before_allocation(tmp_path, monkeypatch, change, named):
    """Case 1: a config.json size that disagrees with the weight file is one line, found on the meta
    device and the weight headers: no tensor of the config's size is ever allocated."""
    from transformers import BertModel

    from pipeline.text.models import build_tiny_bert

    folder = build_tiny_bert(["no acute findings", "small effusion"], tmp_path / "m", hidden=16, layers=1,
                             heads=2, vocab_size=60)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    real_init = BertModel.__init__
    allocated = []

    def watch(self, config, *a, **k):
        if torch.empty(0).device.type != "meta":
            allocated.append(config.vocab_size)
        real_init(self, config, *a, **k)

    monkeypatch.setattr(BertModel, "__init__", watch)
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"study_id": "1", "text": "no acute findings"}) + "\n", encoding="utf-8")
    line = one_error_line(invoke(["embed-text", "--reports", reports, "--out", tmp_path / "cache", "--model",
                                  folder, "--device", "cpu"]))
    assert named in line and str(folder) in line, line
    assert not allocated, "a model of the config's size was built before the check"


# --------------------------------------------------------------------------- 2. damaged or foreign text cache
def test_a_flipped_bit_in_a_cache_shard_stops_train_vision(tmp_path):
    """Case 2: one bit of one embedding changed after embed-text wrote the shard."""
    w = _fresh_world(tmp_path)
    shard = Path(w["cache"]) / "part-00000.h5"
    _flip_embedding_bit(shard)
    line = one_error_line(invoke(["train-vision", *cli_args(w, tmp_path / "out")]))
    assert str(shard) in line and "hash differs from index.json" in line, line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_shard_of_another_cache_is_named_as_such(tmp_path, world):
    """Case 2: part-00000.h5 replaced by the same-index shard of another model's cache."""
    a = _keyed_cache(tmp_path / "a", world, "fp-model-a", seed=1)
    b = _keyed_cache(tmp_path / "b", world, "fp-model-b", seed=2)
    shutil.copyfile(b / "part-00001.h5", a / "part-00001.h5")
    line = one_error_line(invoke(["train-vision", *cli_args(world, tmp_path / "out", text_cache=a)]))
    assert str(a / "part-00001.h5") in line and "another text cache" in line and "fp-model-b" in line, line


def test_status_calls_a_damaged_cache_stale_and_run_would_rebuild_it(tmp_path, prepared):
    """Case 2: `cli.py status` called every stage fresh while the cache it trains on was damaged."""
    import yaml

    from pipeline.common import write_json
    from pipeline.run.graph import record_path
    from stages import orchestrate

    spec = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    spec["workdir"] = str(tmp_path / "work")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = orchestrate.RunConfig(config=str(path))
    _, nodes = orchestrate._plan_nodes(cfg)
    from pipeline.run.graph import resolve_fingerprints

    by_name = resolve_fingerprints(nodes)
    w = make_world(tmp_path / "w", n_train=4, n_val=2, per_shard=2)
    for node in nodes:  # every stage recorded as finished with its current fingerprint
        node.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(record_path(node), {"fingerprint": node.fingerprint})
    write_json(by_name["embed-text"].out_dir / "cache.json", {"path": str(w["cache"])})
    shutil.rmtree(by_name["prepare"].out_dir)
    shutil.copytree(prepared["out"], by_name["prepare"].out_dir)
    assert all(st.state == "fresh" for st in orchestrate.status(cfg))
    _flip_embedding_bit(Path(w["cache"]) / "part-00000.h5")
    states = {st.name: st for st in orchestrate.status(cfg)}
    assert states["embed-text"].state == "stale" and "outputs damaged" in states["embed-text"].reason
    assert "part-00000.h5" in states["embed-text"].reason
    assert all(st.state == "stale" for name, st in states.items() if name.startswith("train:"))
    assert states["prepare"].state == "fresh"
    tar = by_name["prepare"].out_dir / "shards" / "train-000000.tar"
    with open(tar, "ab") as fh:
        fh.write(b"\0" * 512)
    states = {st.name: st for st in orchestrate.status(cfg)}
    assert states["prepare"].state == "stale" and str(tar) in states["prepare"].reason


# --------------------------------------------------------------------------- 3. cache rebuilt at the same path
@pytest.mark.slow
def test_resume_refuses_a_cache_rebuilt_at_the_same_path_by_another_model(tmp_path, world):
    cache = _keyed_cache(tmp_path / "cache", world, "fp-model-a", seed=1)
    out = tmp_path / "out"
    args = cli_args(world, out, text_cache=cache, max_steps=2, ckpt_every=2, probe_size=0)
    assert invoke(["train-vision", *args]).exit_code == 0
    shutil.rmtree(cache)
    _keyed_cache(tmp_path / "cache", world, "fp-model-b", seed=2)  # same path, another model
    line = one_error_line(invoke(["train-vision", *args]))
    assert "another text cache" in line and str(cache) in line, line
    # and a checkpoint mid-run is refused the same way, not "resumed at step 2"
    (out / "summary.json").unlink()
    line = one_error_line(invoke(["train-vision", *args]))
    assert "resume:" in line and "another text cache" in line, line


def test_cache_verify_checks_the_folder_name_is_the_fingerprint(tmp_path, world):
    good = _keyed_cache(tmp_path / "fp-model-a", world, "fp-model-a", seed=1)
    assert invoke(["cache", "verify", good]).exit_code == 0
    moved = tmp_path / "renamed"
    shutil.copytree(good, moved)
    line = one_error_line(invoke(["cache", "verify", moved]))
    assert str(moved) in line and "fingerprint 'fp-model-a'" in line, line


# --------------------------------------------------------------------------- 8. YAML duplicate keys
def test_yaml_with_a_duplicated_key_is_refused_naming_both_lines(tmp_path):
    text = (REPO / "configs" / "tiny-test.yaml").read_text()
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines, 1) if ln.startswith("prepare:"))
    spec = tmp_path / "dup.yaml"
    spec.write_text(text + "\nprepare: {size: 64}\n")
    n = len(lines) + 2
    line = one_error_line(invoke(["status", "--config", spec]))
    assert str(spec) in line and "'prepare'" in line and f"lines {first} and {n}" in line, line


# --------------------------------------------------------------------------- 9. byte-identical files
@pytest.mark.slow
def test_identical_runs_write_byte_identical_encoder_and_checkpoint_files(tmp_path, world):
    """Case 9: torch.save recorded the temporary file's name inside the zip."""
    from stages import train_vision as tv

    files = ("encoder.pt", "projector.pt", "encoder.safetensors", "checkpoints/latest.pt")
    out = tmp_path / "out"
    tv.run(tiny_config(world, out, max_steps=2, probe_size=0))
    first = {f: (out / f).read_bytes() for f in files}
    shutil.rmtree(out)
    tv.run(tiny_config(world, out, max_steps=2, probe_size=0))
    for f in files:
        assert (out / f).read_bytes() == first[f], f


# --------------------------------------------------------------------------- 6. SIGTERM and Ctrl-C
# Sends the signal from inside the step (deterministic step), to the process or to its whole group
# (a terminal's Ctrl-C reaches the DataLoader workers too).
SIGNALLER = textwrap.dedent("""
    import os, signal, sys
    import cli
    from pipeline.pretrain import step as pretrain
    step_at, signame, group, rank = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "group", sys.argv[4]
    real = pretrain.train_step
    calls = []
    def signalling_step(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if len(calls) == step_at and os.environ.get("RANK", "0") in (rank, "any"):
            sig = getattr(signal, signame)
            os.killpg(os.getpgid(0), sig) if group else os.kill(os.getpid(), sig)
        return out
    pretrain.train_step = signalling_step
    sys.argv = ["mflag", "train-vision", *sys.argv[5:]]
    cli.main()
""")


def _signalled(args: list, step: int, sig: str, group: bool = False, rank: str = "0", torchrun: bool = False):
    script = Path(args[args.index("--out") + 1]).parent / f"signaller-{step}-{sig}.py"
    script.write_text(SIGNALLER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(script), str(step), sig, "group" if group else "self", rank,
                           *map(str, args)], cwd=REPO, env=env(), timeout=300, capture_output=True, text=True,
                          start_new_session=True)


def _state(path: Path) -> dict:
    return {k: v for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_that_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Case 6: SIGTERM during step 5 (checkpoints every 3 steps, 2 DataLoader workers): the step is
    finished, step 5 is saved, one line, exit 143; the resumed run ends with an uninterrupted run's encoder."""
    w = make_world(tmp_path / "w", n_train=16, n_val=4, per_shard=4)
    opts = dict(num_workers=2, aug="original", shuffle_buffer=6, max_steps=7, ckpt_every=3, probe_every=3)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "cli.py", "-q", "train-vision", *cli_args(w, ref, **opts)], cwd=REPO,
                   env=env(), check=True, timeout=300)
    out = tmp_path / "stopped"
    args = cli_args(w, out, **opts)
    proc = _signalled(args, 5, "SIGTERM")
    assert proc.returncode == 143, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stopped by")]
    assert lines == ["stopped by SIGTERM at step 5; checkpoint saved, rerun the same command to resume"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 5
    assert not (out / "encoder.pt").exists()
    subprocess.run([sys.executable, "cli.py", "-q", "train-vision", *args], cwd=REPO, env=env(), check=True,
                   timeout=300)
    a, b = _state(ref / "encoder.pt"), _state(out / "encoder.pt")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    assert json.loads((out / "summary.json").read_text())["steps"] == 7


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_exits_130(tmp_path, world):
    """Case 6: Ctrl-C (SIGINT to the whole group, DataLoader workers included) was click's "Aborted!"."""
    out = tmp_path / "out"
    args = cli_args(world, out, num_workers=2, max_steps=6, ckpt_every=100, ckpt_every_minutes=0, probe_size=0)
    proc = _signalled(args, 2, "SIGINT", group=True)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "stopped by SIGINT at step 2; checkpoint saved" in proc.stderr and "Aborted" not in proc.stderr
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_torchrun_ranks_agree_on_the_step_when_one_rank_gets_sigterm(tmp_path):
    """Only rank 1 is signalled, during its step 2: both ranks checkpoint step 2 together and stop."""
    w = make_world(tmp_path / "w", n_train=16, n_val=4, per_shard=4)
    out = tmp_path / "ddp"
    args = cli_args(w, out, num_workers=1, max_steps=5, ckpt_every=100, probe_size=0)
    proc = _signalled(args, 2, "SIGTERM", rank="1", torchrun=True)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGTERM at step 2; checkpoint saved") == 1, proc.stderr[-3000:]
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ck["step"] == 2 and len(ck["data"]) == 2


def test_ckpt_every_minutes_checkpoints_on_the_timer(tmp_path, world, monkeypatch):
    """The timer bounds what a kill -9 loses: with checkpoints every 100 steps, a timer that is always
    due checkpoints every step (the clock is faked: no wall-clock assert)."""
    from stages import train_vision as tv

    clock = itertools.count(0, 3600)
    monkeypatch.setattr(tv.time, "monotonic", lambda: next(clock))
    saved = []
    from pipeline.pretrain import state as train_state

    real = train_state.save_checkpoint
    monkeypatch.setattr(train_state, "save_checkpoint", lambda p, payload: (saved.append(payload["step"]),
                                                                           real(p, payload)))
    tv.run(tiny_config(world, tmp_path / "out", max_steps=3, ckpt_every=100, ckpt_every_minutes=1, probe_size=0))
    assert saved == [1, 2, 3]


# --------------------------------------------------------------------------- 5. one stage per folder
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real prepare output of the tiny MIMIC tree (one image per shard)."""
    from stages.prepare import PrepareConfig, run
    from tests._prepare_helpers import default_studies, make_tree

    base = tmp_path_factory.mktemp("round3-prepare")
    root = make_tree(base / "root", default_studies(), border=5)
    out = base / "out"
    run(PrepareConfig(root=str(root), out=str(out), size=40, shard_size=1, workers=1))
    return {"root": root, "out": out}


def test_train_vision_refuses_a_prepare_folder_as_out(tmp_path, world, prepared):
    """Case 5: train-vision --out <a prepare folder> ran and overwrote prepare's config.json."""
    out = tmp_path / "prep"
    shutil.copytree(prepared["out"], out)
    before = (out / "config.json").read_bytes()
    line = one_error_line(invoke(["train-vision", *cli_args(world, out)]))
    assert str(out) in line and "holds the outputs of prepare" in line, line
    assert (out / "config.json").read_bytes() == before and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_eval_refuses_a_train_vision_run_as_out(tmp_path, world):
    """Case 5: eval --out <a train-vision run> ran and overwrote its config.json."""
    from pipeline.synth.downstream import write_chexpert
    from stages import train_vision as tv

    run_dir = tmp_path / "run"
    tv.run(tiny_config(world, run_dir, max_steps=1, probe_size=0))
    before = (run_dir / "config.json").read_bytes()
    root = tmp_path / "chexpert"
    write_chexpert(root, 40, 0, image_size=64)
    line = one_error_line(invoke(["eval", "--task", "cls", "--dataset", "chexpert", "--root", root, "--out", run_dir,
                                  "--init", run_dir / "encoder.pt", "--image-size", 64, "--epochs", 1,
                                  "--batch-size", 4, "--device", "cpu"]))
    assert str(run_dir) in line and "holds the outputs of train-vision" in line, line
    assert (run_dir / "config.json").read_bytes() == before
    # an old folder whose config.json does not name its stage is known by what it holds
    cfg = json.loads(before)
    cfg.pop("stage")
    (run_dir / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(invoke(["prepare", "mimic", "--root", root, "--out", run_dir]))
    assert "holds the outputs of train-vision" in line and "checkpoints" in line, line


# --------------------------------------------------------------------------- 8. degenerate images
def test_degenerate_images_are_bad_items_with_a_reason_in_prepare(tmp_path):
    """Case 8: a 1x1 px image became an all-black training sample, uncounted; a 40 px image where the
    metadata says 64 x 64 is a substituted file. Both are bad items naming the reason."""
    from PIL import Image

    from pipeline.corpora.mimic_files import image_relpath
    from stages.prepare import PrepareConfig, run
    from tests._prepare_helpers import default_studies, make_tree

    studies = default_studies()
    root = make_tree(tmp_path / "root", studies)
    tiny, other = studies[0], studies[2]
    for st, side in ((tiny, 1), (other, 40)):
        p = root / image_relpath(st.subject_id, st.study_id, st.images[0].dicom_id)
        Image.fromarray(np.full((side, side), 128, np.uint8)).save(p, format="JPEG")
    out = tmp_path / "out"
    run(PrepareConfig(root=str(root), out=str(out), size=40, shard_size=1, workers=1, max_bad_fraction=0.5))
    report = json.loads((out / "prepare-report.json").read_text())
    bad = {b["dicom_id"]: b for b in report["bad"] if b["reason"] == "degenerate_image"}
    assert set(bad) == {tiny.images[0].dicom_id, other.images[0].dicom_id}, report["bad"]
    assert "1x1 px" in bad[tiny.images[0].dicom_id]["detail"]
    assert "the metadata gives 64x64" in bad[other.images[0].dicom_id]["detail"]
    assert report["bad_counts"]["degenerate_image"] == 2
    written = {json.loads(line)["study_id"] for line in (out / "reports.jsonl").read_text().splitlines()}
    assert tiny.study_id not in written  # its only PA image was the 1x1 one


def test_degenerate_image_in_an_eval_reader_is_one_line(tmp_path):
    from PIL import Image

    from pipeline.downstream.data import ImageSource
    from pipeline.downstream.datasets.base import Record

    ok, tiny = tmp_path / "ok.png", tmp_path / "tiny.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(ok)
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(tiny)
    src = ImageSource([Record("a", "p1", ok), Record("b", "p2", tiny)], 32, preload=False)
    assert src.get(0)[0].shape == (32, 32)
    with pytest.raises(Exception, match=r"tiny.png: image 'b' is 1x1 px, below the 32 px minimum"):
        src.get(1)


# --------------------------------------------------------------------------- 4. image shards vs prepare's record
def _prepare(root: Path, out: Path, **kw) -> Path:
    from stages.prepare import PrepareConfig, run

    run(PrepareConfig(root=str(root), out=str(out), size=kw.pop("size", 40), shard_size=1, workers=1, **kw))
    return out


def _cache_for(prep: Path, folder: Path) -> Path:
    keys = [json.loads(line)["study_id"] for line in (prep / "reports.jsonl").read_text().splitlines()]
    return write_cache(folder, keys, np.random.default_rng(0).normal(size=(len(keys), 16)).astype(np.float32))


def _train_args(prep: Path, cache: Path, out: Path, **over) -> list[str]:
    return cli_args({"shards": prep, "cache": cache}, out, image_size=40, batch_size=2, max_steps=1,
                    probe_size=0, **over)


@pytest.mark.parametrize("how", ["other-size", "raw-same-bytes", "other-corpus"])
def test_a_shard_replaced_by_another_prepares_tar_is_refused(tmp_path, how):
    """Case 4: at another --size it was silently resized; from another corpus samples were skipped with
    warnings; with --format raw a foreign tar even has the very same byte size."""
    from tests._prepare_helpers import default_studies, make_tree

    fmt = {"image_format": "raw"} if how == "raw-same-bytes" else {}
    root = make_tree(tmp_path / "root", default_studies(), border=5)
    prep = _prepare(root, tmp_path / "prep", **fmt)
    if how == "other-size":
        other = _prepare(root, tmp_path / "other", size=48)
    elif how == "raw-same-bytes":
        other = _prepare(make_tree(tmp_path / "root2", default_studies(), border=5, seed=7), tmp_path / "other", **fmt)
    else:
        other = _prepare(make_tree(tmp_path / "root2", default_studies(seed=9), border=5), tmp_path / "other")
    tar = prep / "shards" / "train-000001.tar"
    if how == "raw-same-bytes":
        assert tar.stat().st_size == (other / "shards" / tar.name).stat().st_size
    shutil.copyfile(other / "shards" / tar.name, tar)
    out = tmp_path / "run"
    line = one_error_line(invoke(["train-vision", *_train_args(prep, _cache_for(prep, tmp_path / "c"), out)]))
    assert str(tar) in line and ("differs from the sha256" in line or "bytes, prepare wrote" in line), line
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside/x.tar", "sub/../../x.tar"])
def test_manifest_entries_outside_the_shards_folder_are_refused(tmp_path, prepared, name):
    """Case 4: a manifest naming /etc/passwd or ../../outside/x.tar was read with --num-samples."""
    prep = tmp_path / "prep"
    shutil.copytree(prepared["out"], prep)
    man = json.loads((prep / "manifest.json").read_text())
    man["splits"]["train"]["shards"].append(name)
    (prep / "manifest.json").write_text(json.dumps(man))
    line = one_error_line(invoke(["train-vision", *_train_args(prep, _cache_for(prep, tmp_path / "c"),
                                                               tmp_path / "run", num_samples=4)]))
    assert str(prep / "manifest.json") in line and repr(name) in line and "inside" in line, line


def test_untouched_prepare_output_trains_and_old_outputs_gain_digests(tmp_path, prepared):
    prep = tmp_path / "prep"
    shutil.copytree(prepared["out"], prep)
    man = json.loads((prep / "manifest.json").read_text())
    assert set(man["shard_files"]) == {n for s in man["splits"].values() for n in s["shards"]}
    res = invoke(["train-vision", *_train_args(prep, _cache_for(prep, tmp_path / "c"), tmp_path / "run")])
    assert res.exit_code == 0, res.output[-2000:]
    # an output of the prepare before digests: a rerun adds them without re-encoding anything
    man.pop("shard_files")
    (prep / "manifest.json").write_text(json.dumps(man))
    tars = {p.name: p.stat().st_mtime_ns for p in (prep / "shards").glob("*.tar")}
    _prepare(prepared["root"], prep)
    assert "shard_files" in json.loads((prep / "manifest.json").read_text())
    assert tars == {p.name: p.stat().st_mtime_ns for p in (prep / "shards").glob("*.tar")}


# --------------------------------------------------------------------------- 7. encodings and lone surrogates
def test_a_lone_surrogate_in_a_report_is_replaced_counted_and_said(tmp_path):
    """Case 7: a JSON-escaped lone surrogate ("\\ud800") in a report was a traceback in embed-text."""
    from cache import TextEmbeddingCache
    from pipeline.text.models import build_tiny_bert

    texts = ["no acute findings", "small left effusion"]
    model = build_tiny_bert(texts, tmp_path / "bert", hidden=16, layers=1, heads=2, vocab_size=60)
    reports = tmp_path / "reports.jsonl"
    reports.write_text('{"study_id": "1", "text": "no acute findings"}\n'
                       '{"study_id": "2", "text": "small \\ud800 left effusion"}\n', encoding="utf-8")
    out = tmp_path / "cache"
    res = invoke(["embed-text", "--reports", reports, "--out", out, "--model", model, "--device", "cpu",
                  "--max-length", 16])
    assert res.exit_code == 0, res.output[-2000:]
    cache = TextEmbeddingCache(out)
    assert len(cache) == 2 and cache.attrs["input"]["surrogates_replaced"] == 1
    assert "lone UTF-16 surrogates (e.g. line 2)" in res.output
    # a key with one is refused, naming the line
    reports.write_text('{"study_id": "1\\udc80", "text": "no acute findings"}\n', encoding="utf-8")
    line = one_error_line(invoke(["embed-text", "--reports", reports, "--out", tmp_path / "c2", "--model", model,
                                  "--device", "cpu"]))
    assert f"{reports}: line 1: key" in line and "surrogate" in line, line


def _break_utf8(csv_path: Path) -> int:
    """Append a row with a Latin-1 byte; returns its line number."""
    data = csv_path.read_bytes()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    csv_path.write_bytes(data.rstrip(b"\n") + b"\n" + data.splitlines()[-1].replace(b"valid", b"v\xe9lid") + b"\n")
    return lines + 1


@pytest.mark.parametrize("command", ["eval", "splits"])
def test_a_label_csv_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, command):
    """Case 7: a Latin-1 label CSV was a traceback in eval and splits."""
    from pipeline.synth.downstream import write_chexpert

    root = tmp_path / "chexpert"
    write_chexpert(root, 40, 0, image_size=64)
    csv_path = root / "valid.csv"
    n = _break_utf8(csv_path)
    if command == "eval":
        args = ["eval", "--task", "cls", "--dataset", "chexpert", "--root", root, "--out", tmp_path / "out",
                "--init", "random", "--image-size", 64, "--epochs", 1, "--batch-size", 4, "--device", "cpu"]
    else:
        args = ["splits", "--dataset", "chexpert", "--task", "cls", "--root", root, "--out", tmp_path / "out"]
    line = one_error_line(invoke(args))
    assert f"{csv_path}: line {n}: not valid UTF-8 (byte 0xe9" in line, line


def test_label_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    from pipeline.downstream.datasets._common import read_csv_rows

    plain, bom = tmp_path / "a.csv", tmp_path / "b.csv"
    plain.write_text("Path,Label\nx.jpg,1\n", encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert list(read_csv_rows(plain, ["Path"])) == list(read_csv_rows(bom, ["Path"]))


EVAL_SIGNALLER = textwrap.dedent("""
    import os, signal, sys
    import cli
    from pipeline.downstream import loop
    real = loop.trainable_state
    def signalled(model):
        os.kill(os.getpid(), signal.SIGTERM)  # at the end of the first epoch of the first seed
        return real(model)
    loop.trainable_state = signalled
    sys.argv = ["mflag", "eval", *sys.argv[1:]]
    cli.main()
""")


@pytest.mark.slow
def test_sigterm_in_eval_is_one_line_and_exit_143(tmp_path):
    """Eval's training loops: no mid-seed checkpoint (a seed is the unit a rerun resumes), but SIGTERM is
    one line and exit 143, and no temporary file is left, instead of a silent death."""
    from pipeline.synth.downstream import write_chexpert

    root = tmp_path / "chexpert"
    write_chexpert(root, 40, 0, image_size=64)
    out = tmp_path / "out"
    script = tmp_path / "eval_signaller.py"
    script.write_text(EVAL_SIGNALLER)
    proc = subprocess.run([sys.executable, str(script), "--task", "cls", "--dataset", "chexpert", "--root", str(root),
                           "--out", str(out), "--init", "random", "--image-size", "64", "--epochs", "2",
                           "--batch-size", "4", "--device", "cpu"], cwd=REPO, env=env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not list(out.rglob(".*.tmp"))


def test_a_repeated_sigterm_still_waits_for_the_checkpoint_but_a_second_ctrl_c_does_not():
    """srun and torchrun may both deliver SIGTERM to a rank: the second must not kill the checkpoint."""
    from pipeline.preempt import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the default handler again: KeyboardInterrupt
