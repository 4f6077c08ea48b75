"""Hostile and damaged inputs (issue 11): crafted checkpoints, damaged shards, concurrent runs, paths in
data files, leftovers, one-line errors, memory bombs; plus tracking and checkpoint formats.

New APIs are imported inside the tests, so each test fails on the code before the fix for the reason
it describes rather than at collection time.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

import cli
from pipeline.common import MflagError
from stages import train_vision as tv
from tests._train_helpers import cli_args, make_world, tiny_config

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def invoke(args: list[str]):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def one_error_line(res) -> str:
    """The CLI result failed with exit 2 and exactly one ``error:`` line, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:])
    assert "Traceback" not in res.output, res.output[-2000:]
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- 1. crafted checkpoints
class _Payload:
    """Unpickling this calls os.mkdir(marker): the side effect shows whether the loader ran it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _trunk_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}


def _write(path: Path, obj, fmt: str) -> Path:
    if fmt == "zip":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    return path


@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("hostile-train"), n_train=8, n_val=4, per_shard=4)


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    from pipeline.synth.downstream import write_chexpert

    root = tmp_path_factory.mktemp("hostile-chexpert") / "chexpert"
    write_chexpert(root, 40, 0, image_size=64)
    return root


def _eval_args(root: Path, out: Path, init: Path | str) -> list:
    return ["eval", "--task", "cls", "--dataset", "chexpert", "--root", root, "--out", out, "--init", init,
            "--image-size", 64, "--epochs", 1, "--batch-size", 4, "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zip", "pickle"])
@pytest.mark.parametrize("where", ["eval-init", "train-init", "resume", "latest"])
def test_crafted_checkpoint_never_runs_code(tmp_path, train_world, chexpert_root, where, fmt):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / f"evil.{'pt' if fmt == 'zip' else 'pkl'}"
    if where in ("eval-init", "train-init"):  # a published-looking Lightning checkpoint with a payload inside
        obj = {"state_dict": {f"img_encoder_q.model.{k}": v for k, v in _trunk_state().items()},
               "hyper_parameters": {"emb_dim": 128, "callback": _Payload(marker)}}
    else:  # a train-vision checkpoint with a payload among its RNG states
        obj = {"format": 1, "step": 2, "model": {}, "rng": [_Payload(marker)]}
    _write(evil, obj, fmt)
    out = tmp_path / "out"
    if where == "eval-init":
        res = invoke(_eval_args(chexpert_root, out, evil))
    elif where == "train-init":
        res = invoke(["train-vision", *cli_args(train_world, out, init=evil)])
    elif where == "resume":
        res = invoke(["train-vision", *cli_args(train_world, out, resume=evil)])
    else:  # planted as OUT/checkpoints/latest.pt, found by the default --resume auto
        (out / "checkpoints").mkdir(parents=True)
        shutil.copyfile(evil, out / "checkpoints" / "latest.pt")
        evil = out / "checkpoints" / "latest.pt"
        res = invoke(["train-vision", *cli_args(train_world, out)])
    line = one_error_line(res)
    assert not marker.exists(), "the checkpoint's payload was executed"
    assert str(evil) in line and "refused" in line and "mkdir" in line, line


class _Reduces:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,refused", [
    (_Reduces(getattr, (1, "real")), "call builtins.getattr"),  # the first step of most gadget chains
    (_Reduces(frozenset, (range(10**18),)), "call builtins.range"),  # a lazy iterable: memory and time bomb
    (b"\x80\x02ccollections\nOrderedDict\n}X\x03\x00\x00\x00fooK\x01sb.", "write state into collections.OrderedDict"),
    (b"\x80\x02ctorch\nTensor\n)\x81.", "instantiate torch.Tensor"),  # NEWOBJ of a non-stub class
])
def test_restricted_unpickler_refuses_what_is_not_data(tmp_path, payload, refused):
    """Beyond calls of unknown globals: allow-listed names used as gadgets (getattr), lazy iterables
    that would never end, state written into a class object, instances of non-data classes."""
    from pipeline.safeload import safe_load

    path = tmp_path / "x.pkl"
    path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps({"w": payload}, protocol=2))
    with pytest.raises(MflagError, match=f"{path}: refused to load: it would {refused}"):
        safe_load(path)


def test_lightning_checkpoints_with_omegaconf_and_attributedict_still_load(tmp_path, monkeypatch):
    """The layouts published checkpoints use: Lightning's AttributeDict and OmegaConf's DictConfig (with
    dataclass metadata and typing.Any references) as hyper-parameters, callbacks' state with tensors,
    optimizer state. Neither package is installed: the classes are made here, pickled, and removed."""
    import dataclasses
    import types
    import typing

    from pipeline.safeload import Stub, safe_load
    from pipeline.vision.checkpoints import load_encoder_state

    mods = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.utilities",
                                             "pytorch_lightning.utilities.parsing", "omegaconf",
                                             "omegaconf.dictconfig", "omegaconf.base", "omegaconf.nodes")}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    class AttributeDict(dict):
        def __getattr__(self, k):
            return self[k]

    @dataclasses.dataclass
    class ContainerMetadata:
        ref_type: typing.Any = typing.Any
        object_type: typing.Any = dict
        optional: bool = True
        key: typing.Any = None
        flags: dict = dataclasses.field(default_factory=dict)
        key_type: typing.Any = typing.Any
        element_type: typing.Any = typing.Any

    class AnyNode:
        def __init__(self, value):
            self._val, self._metadata = value, ContainerMetadata()

    class DictConfig:
        def __init__(self, content):
            self._content = {k: AnyNode(v) for k, v in content.items()}
            self._metadata = ContainerMetadata()
            self._parent = None

        def __getstate__(self):
            return {"_content": self._content, "_metadata": self._metadata, "_parent": self._parent}

        def __setstate__(self, d):
            self.__dict__.update(d)

    for cls, mod in ((AttributeDict, "pytorch_lightning.utilities.parsing"), (DictConfig, "omegaconf.dictconfig"),
                     (ContainerMetadata, "omegaconf.base"), (AnyNode, "omegaconf.nodes")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    ref = _trunk_state(1)
    ckpt = {"epoch": 49, "global_step": 1000, "pytorch-lightning_version": "1.5.10",
            "state_dict": {**{f"gloria.img_encoder.model.{k}": v for k, v in ref.items()},
                           "gloria.text_encoder.model.embeddings.word_embeddings.weight": torch.zeros(4, 2)},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5),
                                                                    "best_model_path": "/ckpt/epoch=3.ckpt"}},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
            "hyper_parameters": AttributeDict(cfg=DictConfig({"lr": 1e-4, "model": "resnet_50"}), emb_dim=768)}
    path = tmp_path / "gloria.ckpt"
    torch.save(ckpt, path)
    for mod in mods:
        monkeypatch.delitem(sys.modules, mod)
    got, layout = load_encoder_state(path)
    assert layout == "gloria" and all(torch.equal(got[k], ref[k]) for k in ref)
    hp = safe_load(path)["hyper_parameters"]
    assert isinstance(hp, Stub) and repr(hp) == "<stub of pytorch_lightning.utilities.parsing.AttributeDict>"
    assert hp.items["emb_dim"] == 768 and repr(hp.items["cfg"]) == "<stub of omegaconf.dictconfig.DictConfig>"


def test_convirt_checkpoint_as_mgca_saves_it(tmp_path):
    """MGCA's ConVIRT LightningModule holds ``img_encoder`` (MGCA's ImageEncoder: a torchvision resnet50
    as ``.model`` with fc = Identity, plus global/local embedding heads) and ``text_encoder``."""
    from pipeline.vision.checkpoints import load_encoder

    ref = _trunk_state(2)
    sd = {f"img_encoder.model.{k}": v for k, v in ref.items()}
    sd.update({"img_encoder.global_embed.head.0.weight": torch.zeros(2048, 2048)[:4],
               "img_encoder.local_embed.head.0.weight": torch.zeros(4, 1024, 1),
               "text_encoder.model.embeddings.word_embeddings.weight": torch.zeros(8, 4),
               "text_encoder.global_embed.head.0.weight": torch.zeros(4, 4)})
    path = tmp_path / "convirt.ckpt"
    torch.save({"epoch": 10, "state_dict": sd, "hyper_parameters": {"img_encoder": "resnet_50", "emb_dim": 128}},
               path)
    model, info = load_encoder(str(path))
    assert info["layout"] == "convirt"
    assert torch.equal(model.state_dict()["layer3.5.bn2.running_mean"], ref["layer3.5.bn2.running_mean"])


@pytest.mark.slow
def test_checkpoint_written_with_more_cuda_devices_resumes_on_cpu(tmp_path, train_world, monkeypatch):
    """A checkpoint of the previous format (RNG states as Python/NumPy tuples, plus the CUDA generators of
    8 GPUs) resumes where the RNG code sees 1 GPU, touching no CUDA generator, and ends bit-identical to
    an uninterrupted run. (Only the RNG save/restore sees the fake GPU: the optimizer would try to use it.)"""
    from pipeline.pretrain import state as train_state
    opts = dict(max_steps=4, ckpt_every=2, probe_size=0)
    ref = tmp_path / "ref"
    tv.run(tiny_config(train_world, ref, **opts))
    out = tmp_path / "resumed"
    tv.run(tiny_config(train_world, out, **opts))
    ck = torch.load(out / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert "cuda" not in ck["rng"][0]  # not saved any more
    r = ck["rng"][0]
    py = r["python"]
    npst = r["numpy"]
    ck["rng"][0] = {"python": (py["version"], tuple(py["state"].tolist()), py["gauss"]),
                    "numpy": (npst["bit_generator"], npst["key"].numpy().astype(np.uint32), npst["pos"],
                              npst["has_gauss"], npst["gauss"]),
                    "torch": r["torch"], "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    for p in list((out / "checkpoints").iterdir()) + [out / "summary.json", out / "encoder.pt"]:
        p.unlink()
    torch.save(ck, out / "checkpoints" / "latest.pt")

    def no_cuda_rng(*a, **k):
        raise AssertionError("a CUDA generator was touched")

    calls = []

    def with_one_gpu(fn):
        def wrapped(*a, **k):
            calls.append(fn.__name__)
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "is_available", lambda: True)
                m.setattr(torch.cuda, "device_count", lambda: 1)
                for name in ("set_rng_state_all", "get_rng_state_all", "set_rng_state", "get_rng_state"):
                    m.setattr(torch.cuda, name, no_cuda_rng)
                return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(train_state, "set_rng_state", with_one_gpu(train_state.set_rng_state))
    monkeypatch.setattr(train_state, "rng_state", with_one_gpu(train_state.rng_state))
    summary = tv.run(tiny_config(train_world, out, **opts))
    assert summary["steps"] == 4 and calls == ["set_rng_state", "rng_state"]  # restored once, saved at step 4
    a, b = torch.load(ref / "encoder.pt", weights_only=True), torch.load(out / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_own_checkpoints_load_weights_only_and_encoder_safetensors(tmp_path, train_world, chexpert_root):
    from safetensors.torch import load_file

    from pipeline.vision.checkpoints import load_encoder

    out = tmp_path / "run"
    tv.run(tiny_config(train_world, out, max_steps=2, probe_size=0))
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)  # torch's own safe loader
    assert ck["step"] == 2 and set(ck["rng"][0]) == {"python", "numpy", "torch"}
    pt = torch.load(out / "encoder.pt", weights_only=True)
    st = load_file(str(out / "encoder.safetensors"))
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    model, info = load_encoder(str(out / "encoder.safetensors"))
    assert info["layout"] == "torchvision"
    assert torch.equal(model.state_dict()["layer4.2.conv3.weight"], pt["layer4.2.conv3.weight"])


def test_eval_init_text_file_and_nan_weights_are_one_line_errors(tmp_path, chexpert_root):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n" * 20)
    line = one_error_line(invoke(_eval_args(chexpert_root, tmp_path / "a", text)))
    assert str(text) in line and "not a readable checkpoint" in line
    state = _trunk_state()
    state["layer2.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    nan = tmp_path / "nan.pt"
    torch.save(state, nan)
    line = one_error_line(invoke(_eval_args(chexpert_root, tmp_path / "b", nan)))
    assert str(nan) in line and "NaN or inf" in line and "layer2.1.conv2.weight" in line


# --------------------------------------------------------------------------- 2. damaged shards
def _readable_samples(tar: Path) -> int:
    """Samples (distinct keys with at least one complete member) a truncated tar still holds, read
    with tarfile alone."""
    keys: set[str] = set()
    try:
        with tarfile.open(tar) as tf:
            for m in tf:
                tf.extractfile(m).read()
                keys.add(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys)


@pytest.mark.slow
def test_truncated_shard_counts_every_lost_sample(tmp_path):
    world = make_world(tmp_path, n_train=80, n_val=4, per_shard=40, size=32)
    tar = world["shards"] / "train-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 20])  # a copy cut short: 38 of its 40 samples are gone
    readable = _readable_samples(tar)
    assert readable <= 3
    opts = dict(batch_size=8, max_steps=12, ckpt_every=100, probe_size=0, image_size=32, crop_size=32)
    with pytest.raises(MflagError, match=r"samples lost in damaged shard\(s\) train-000001\.tar \(\d+ missing\).*"
                                         r"sizes\.json.*rerun prepare"):
        tv.run(tiny_config(world, tmp_path / "strict", max_bad_fraction=0.05, **opts))
    summary = tv.run(tiny_config(world, tmp_path / "lenient", max_bad_fraction=0.9, **opts))
    per_read = 40 - readable
    assert summary["lost"] >= per_read and summary["lost"] % per_read == 0, (summary["lost"], per_read)


def test_nan_in_the_text_cache_is_blamed_on_the_cache(tmp_path):
    world = make_world(tmp_path, n_train=8, n_val=4, per_shard=4, nan_studies=8)
    with pytest.raises(MflagError) as err:
        tv.run(tiny_config(world, tmp_path / "run", max_steps=2, probe_size=0))
    msg = str(err.value)
    assert "NaN or inf embeddings" in msg and str(world["cache"]) in msg and "embed-text" in msg
    assert "--lr" not in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- 3. locks
def test_lock_names_its_holder_and_stale_locks_are_taken_over(tmp_path, caplog):
    from pipeline import locks

    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipeline.locks import hold_output_lock
        hold_output_lock(sys.argv[1], "holder-stage")
        print("held", flush=True)
        time.sleep(60)
    """), str(folder)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.FolderLockedError, match=rf"in use by holder-stage \(pid {holder.pid} on host "):
            with locks.output_lock(folder, "second"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed without releasing: its lock file stays, and is stale
    record = json.loads((folder / locks.LOCK_NAME).read_text())
    assert record["pid"] == holder.pid
    caplog.set_level("INFO", logger="pipeline.locks")
    with locks.output_lock(folder, "third") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "taking over a stale lock of holder-stage" in caplog.text
    assert not (folder / locks.LOCK_NAME).exists()  # released


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """On file systems without flock: a live pid on this host holds the folder, a dead one does not."""
    import socket

    from pipeline import locks

    monkeypatch.setattr(locks, "_flock", lambda fd: None)
    folder = tmp_path / "out"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / locks.LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                          "stage": "train-vision", "since": "x"}))
        with pytest.raises(locks.FolderLockedError, match=f"pid {sleeper.pid}"):
            with locks.output_lock(folder, "eval"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with locks.output_lock(folder, "eval") as lock:  # the pid is gone now: stale
        assert lock.writable


@pytest.mark.slow
def test_stale_checkpoint_temps_are_removed_on_start(tmp_path, train_world):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    leftovers = [out / "checkpoints" / ".step-00000500.pt.k3j2h1.tmp", out / ".encoder.pt.a8s7d6.tmp"]
    for p in leftovers:
        p.write_bytes(b"\0" * (1 << 20))
    tv.run(tiny_config(train_world, out, max_steps=2, probe_size=0))
    assert not any(p.exists() for p in leftovers)
    assert not list(out.rglob("*.tmp"))


# Runs a stage through the real CLI, but pauses right after taking its output lock until GO exists.
HOLD_AFTER_LOCK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import pipeline.locks as locks
    ready, go, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    real = locks._take_dist

    def take(folder, name, *a, **k):
        lock = real(folder, name, *a, **k)
        if name == stage:
            ready.touch()
            while not go.exists():
                time.sleep(0.05)
        return lock

    locks._take_dist = take
    import cli
    sys.argv = ["mflag", "-q", *sys.argv[4:]]
    cli.main()
""")


def _two_runs(tmp_path: Path, stage: str, args: list) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``args`` twice on one output folder: the first holds its lock while the second starts.
    Returns the second run's result and the first one's stderr (after letting it finish)."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    args = [str(a) for a in args]
    first = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_LOCK, str(ready), str(go), stage, *args],
                             cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "cli.py", "-q", *args], cwd=REPO, env=env(), timeout=300,
                                capture_output=True, text=True)
        assert first.poll() is None  # the second run ended while the first still held the folder
    finally:
        go.touch()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    return second, err


def _refused(second: subprocess.CompletedProcess, stage: str) -> None:
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is in use by {stage} (pid " in errors[0], errors[0]


@pytest.mark.slow
def test_two_train_vision_runs_on_one_out(tmp_path, train_world):
    out = tmp_path / "run"
    second, _ = _two_runs(tmp_path, "train-vision", ["train-vision", *cli_args(train_world, out, probe_size=0)])
    _refused(second, "train-vision")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # one training line per step and one final probe line: the second run wrote nothing
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "train/loss" not in r] == [4]


@pytest.mark.slow
def test_two_embed_text_runs_on_one_out(tmp_path):
    from cache.verify import verify_cache
    from pipeline.text.models import build_tiny_bert
    from tests._text_helpers import make_reports, write_jsonl

    rows = make_reports(24, seed=1)
    reports = write_jsonl(tmp_path / "reports.jsonl", rows)
    bert = build_tiny_bert([r["text"] for r in rows], tmp_path / "bert", hidden=32, layers=1, heads=2,
                           vocab_size=200, seed=0, max_position=64)
    out = tmp_path / "cache"
    args = ["embed-text", "--reports", reports, "--out", out, "--model", bert, "--device", "cpu",
            "--max-length", 32, "--shard-size", 8]
    second, _ = _two_runs(tmp_path, "embed-text", args)
    _refused(second, "embed-text")
    assert verify_cache(out)["count"] == 24


@pytest.mark.slow
def test_two_prepare_runs_on_one_out(tmp_path):
    from tests._prepare_helpers import default_studies, make_tree

    root = make_tree(tmp_path / "mimic", default_studies(), image_size=48)
    out = tmp_path / "prep"
    args = ["prepare", "mimic", "--root", root, "--out", out, "--size", 32, "--workers", 1, "--shard-size", 2,
            "--max-bad-fraction", 0.5]
    second, _ = _two_runs(tmp_path, "prepare", args)
    _refused(second, "prepare")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_images"] == sum(json.loads((out / "shards" / "sizes.json").read_text()).values()) > 0


@pytest.mark.slow
def test_two_eval_runs_on_one_out(tmp_path, chexpert_root):
    out = tmp_path / "eval"
    second, _ = _two_runs(tmp_path, "eval", _eval_args(chexpert_root, out, "random"))
    _refused(second, "eval")
    rows = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| 20")]
    assert len(rows) == 1


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_the_folder_is_held(tmp_path, train_world):
    """Under torchrun rank 0 takes the lock for the job; when it is refused, every rank stops at once
    (none waits at a collective for a rank that left)."""
    out = tmp_path / "ddp"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipeline.locks import hold_output_lock
        hold_output_lock(sys.argv[1], "other-run")
        print("held", flush=True)
        time.sleep(300)
    """), str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "cli.py", "-q",
             "train-vision", *[str(a) for a in cli_args(train_world, out, num_workers=1)]],
            cwd=REPO, env=env(), timeout=300, capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by other-run (pid {holder.pid}") >= 2, proc.stderr[-3000:]  # both ranks
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


# --------------------------------------------------------------------------- 4. paths from data
def test_prepare_never_reads_or_writes_outside_root_for_a_crafted_dicom_id(tmp_path):
    from pipeline.corpora.mimic_files import METADATA_CSV, SPLIT_CSV
    from stages.prepare import PrepareConfig, TooManyBadItems, run
    from tests._prepare_helpers import default_studies, make_tree, phantom

    root = make_tree(tmp_path / "data" / "mimic", default_studies(), image_size=48, gz=False)
    evil_id = "../../../../../secret"
    from PIL import Image

    Image.fromarray(phantom(np.random.default_rng(0), 48)).save(tmp_path / "data" / "secret.jpg")
    for name, row in ((METADATA_CSV, f"{evil_id},10000032,50414267,CHEST,PA,48,48,1,1,x,y,z\n"),
                      (SPLIT_CSV, f"{evil_id},50414267,10000032,train\n")):
        with open(root / name, "a", encoding="utf-8") as fh:
            fh.write(row)
    evil_line = len((root / METADATA_CSV).read_text().splitlines())
    res = run(PrepareConfig(root=str(root), out=str(tmp_path / "out"), size=32, workers=1, max_bad_fraction=0.5))
    members = [m for t in (tmp_path / "out" / "shards").glob("*.tar") for m in tarfile.open(t).getnames()]
    assert members and not any(".." in m or "secret" in m for m in members)
    report = json.loads((tmp_path / "out" / "prepare-report.json").read_text())
    bad = [b for b in report["bad"] if evil_id in b["detail"]]
    assert len(bad) == 1 and bad[0]["reason"] == "bad_csv_row"
    assert bad[0]["where"].endswith(f"{METADATA_CSV}:{evil_line}")
    assert res.counts["bad_images"] >= 1
    with pytest.raises(TooManyBadItems, match="bad_csv_row"):  # the row is counted against the threshold
        run(PrepareConfig(root=str(root), out=str(tmp_path / "strict"), size=32, workers=1,
                          max_bad_fraction=0.01))


def _append_line(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n", encoding="utf-8")


@pytest.mark.parametrize("dataset", ["chexpert", "covidx", "object-cxr", "rsna"])
def test_downstream_ids_never_become_paths_outside_the_root(tmp_path, dataset):
    from PIL import Image

    from pipeline.downstream.datasets.registry import load_dataset
    from pipeline.synth import downstream as synth

    root = tmp_path / "data" / dataset
    writer = {"chexpert": synth.write_chexpert, "covidx": synth.write_covidx,
              "object-cxr": synth.write_object_cxr, "rsna": synth.write_rsna}[dataset]
    writer(root, 12, 0, image_size=64)
    task = {"chexpert": "cls", "covidx": "cls", "object-cxr": "det", "rsna": "det"}[dataset]
    before = sorted(r.image_id for r in load_dataset(dataset, str(root), task).records)
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(secret / "x.png")
    shutil.copyfile(secret / "x.png", secret / "x.jpg")
    if dataset == "chexpert":
        csv = root / "train.csv"
        first = csv.read_text().splitlines()[1].split(",", 1)
        _append_line(csv, "CheXpert-v1.0-small/train/patient00001/../../../../secret/x.jpg," + first[1])
    elif dataset == "covidx":
        _append_line(root / "train.txt", "p999 ../../../secret/x.png normal synthetic")
    elif dataset == "object-cxr":
        _append_line(root / "train.csv", "../../../secret/x.jpg,")
    else:
        pydicom = pytest.importorskip("pydicom")
        labels = next(root.glob("stage_2_train_labels.csv"))
        _append_line(labels, "../../../secret/x,,,,,0")
        images = next(p for p in root.iterdir() if p.is_dir())
        shutil.copyfile(next(images.glob("*.dcm")), secret / "x.dcm")
        assert pydicom.dcmread(secret / "x.dcm").Rows > 0
    spec = load_dataset(dataset, str(root), task)
    assert sorted(r.image_id for r in spec.records) == before
    assert not any("secret" in str(r.path) for r in spec.records)
    assert spec.counts["unsafe_ids"] == 1


# --------------------------------------------------------------------------- 5. one-line errors
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'


def small_disk(size: str) -> str:
    return f'mount -t tmpfs -o size={size} tmpfs "$0"'


def _unshare_can(mount: str, check: str) -> bool:
    """unshare gives this user a private mount namespace in which ``mount`` (a shell command on the
    folder "$0") works and ``check`` then holds."""
    import tempfile

    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && {check}", d],
                              capture_output=True).returncode == 0


def run_mounted(mount: str, folder: Path, args: list, then: str = "") -> subprocess.CompletedProcess:
    """``cli.py args`` with ``folder`` under ``mount`` in a private mount namespace (no root needed);
    ``then`` runs there afterwards, before the mount goes, and the exit status stays cli.py's."""
    script = f'{mount} && {{ "$@"; rc=$?; {then} exit $rc; }}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), sys.executable, "cli.py", "-q",
                           *[str(a) for a in args]], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)


def run_readonly(folder: Path, args: list) -> subprocess.CompletedProcess:
    """Read-only storage, not permissions: the test machines run as root, which ignores permissions."""
    return run_mounted(READ_ONLY, folder, args)


needs_readonly = pytest.mark.skipif(not _unshare_can(READ_ONLY, '! touch "$0/x" 2>/dev/null'),
                                    reason="unshare with a private mount namespace is not available here")


def _single_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file()}


@needs_readonly
@pytest.mark.slow
def test_read_only_out_in_every_stage(tmp_path, train_world, chexpert_root):
    from stages.prepare import PrepareConfig
    from stages.prepare import run as prepare
    from tests._prepare_helpers import default_studies, make_tree

    # prepare: a finished output is only re-checked; an unfinished one is a one-line error
    root = make_tree(tmp_path / "mimic", default_studies(), image_size=48)
    done = tmp_path / "prep"
    prepare(PrepareConfig(root=str(root), out=str(done), size=32, workers=1, max_bad_fraction=0.5))
    before = _snapshot(done)
    args = ["prepare", "mimic", "--root", root, "--size", 32, "--workers", 1, "--max-bad-fraction", 0.5]
    proc = run_readonly(done, [*args, "--out", done])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(done) == before
    empty = tmp_path / "ro-empty"
    empty.mkdir()
    assert "not writable" in _single_error(run_readonly(empty, [*args, "--out", empty]))
    # train-vision and eval need to write: one line each
    assert "not writable" in _single_error(run_readonly(empty, ["train-vision", *cli_args(train_world, empty)]))
    assert "not writable" in _single_error(run_readonly(empty, _eval_args(chexpert_root, empty, "random")))


@needs_readonly
@pytest.mark.slow
def test_finished_text_cache_on_read_only_storage_is_rechecked(tmp_path):
    from pipeline.text.models import build_tiny_bert
    from stages.embed_text import EmbedTextConfig, run
    from tests._text_helpers import make_reports, write_jsonl

    rows = make_reports(20, seed=2)
    reports = write_jsonl(tmp_path / "reports.jsonl", rows)
    bert = build_tiny_bert([r["text"] for r in rows], tmp_path / "bert", hidden=32, layers=1, heads=2,
                           vocab_size=200, seed=0, max_position=64)
    out = tmp_path / "cache"
    opts = ["--reports", reports, "--model", bert, "--device", "cpu", "--max-length", 32, "--shard-size", 8]
    run(EmbedTextConfig(reports=str(reports), out=str(out), model=str(bert), device="cpu", max_length=32,
                        shard_size=8))
    before = _snapshot(out)
    proc = run_readonly(out, ["embed-text", *opts, "--out", out])
    assert proc.returncode == 0 and "complete: 20 reports" in proc.stdout, proc.stderr[-3000:]
    assert _snapshot(out) == before  # index.json and config.json not rewritten
    empty = tmp_path / "ro-empty"
    empty.mkdir()
    assert "not writable" in _single_error(run_readonly(empty, ["embed-text", *opts, "--out", empty]))


def test_out_naming_a_file_is_one_line(tmp_path, train_world):
    from tests._text_helpers import make_reports, write_jsonl

    afile = tmp_path / "a-file"
    afile.write_text("x")
    line = one_error_line(invoke(["train-vision", *cli_args(train_world, afile)]))
    assert "a-file: exists and is not a folder" in line
    reports = write_jsonl(tmp_path / "reports.jsonl", make_reports(4))
    line = one_error_line(invoke(["embed-text", "--reports", reports, "--out", afile, "--model", tmp_path / "none",
                                  "--device", "cpu"]))
    assert "a-file: exists and is not a folder" in line


@pytest.mark.skipif(not _unshare_can(small_disk("1m"), '! head -c 2000000 /dev/zero > "$0/x" 2>/dev/null'),
                    reason="unshare cannot mount a tmpfs here")
@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, train_world):
    """--out on a 40 MB disk: the first checkpoint (~270 MB) does not fit. torch.save says so as
    "unexpected pos"; the user reads which file, that the disk is full, and that nothing was half written."""
    out = tmp_path / "small"
    out.mkdir()
    proc = run_mounted(small_disk("40m"), out, ["train-vision", *cli_args(train_world, out)],
                       then='find "$0" -type f > "$0.left";')
    line = _single_error(proc)
    assert line.startswith(f"error: {out}/checkpoints/step-00000002.pt: No space left on device"), line
    assert "the file was not written" in line
    left = (tmp_path / "small.left").read_text().split()  # listed before the tmpfs goes
    assert not [f for f in left if f.endswith(".tmp")] and f"{out}/metrics.jsonl" in left, left


# --------------------------------------------------------------------------- 6. memory bombs
def _png_bomb(path: Path, side: int) -> Path:
    """A valid greyscale PNG of side x side black pixels: a few hundred KB on disk, side² bytes decoded."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_bad_item_never_decoded(tmp_path, monkeypatch):
    from pipeline.imaging import ImageTooLargeError, read_image
    from stages.prepare import PrepareConfig, run
    from tests._prepare_helpers import default_studies, make_tree

    studies = default_studies()
    root = make_tree(tmp_path / "mimic", studies, image_size=48)
    victim = studies[0].images[0].dicom_id
    target = next(root.rglob(f"{victim}.jpg"))
    _png_bomb(target, 13_000)  # 169 Mpx, the size from the issue
    assert target.stat().st_size < 400_000
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    with pytest.raises(ImageTooLargeError, match=r"13000x13000 = 169\.0 Mpx exceeds the pixel limit of 50 Mpx"):
        read_image(target)
    res = run(PrepareConfig(root=str(root), out=str(tmp_path / "out"), size=32, workers=1, max_bad_fraction=0.5))
    assert (13_000, 13_000) not in decoded
    report = json.loads((tmp_path / "out" / "prepare-report.json").read_text())
    assert [b["dicom_id"] for b in report["bad"] if b["reason"] == "image_too_large"] == [victim]
    assert res.counts["bad_images"] >= 1


# --------------------------------------------------------------------------- tracking
def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_jsonl_scalars(tmp_path, train_world):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    tv.run(tiny_config(train_world, out, max_steps=4, probe_every=2, report_to="tensorboard"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    rows = [r for r in _metrics(out) if "train/loss" in r]
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["train/loss"] for r in rows], rel=1e-6)
    probes = [r for r in _metrics(out) if "val/zv_effective_rank_centred" in r]
    assert [e.step for e in acc.Scalars("val/zv_effective_rank_centred")] == [r["step"] for r in probes]


@pytest.mark.slow
def test_wandb_offline_run_logs_the_same_scalars(tmp_path, train_world, monkeypatch):
    pytest.importorskip("wandb", reason="the tracking extra (wandb) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    tv.run(tiny_config(train_world, out, max_steps=3, probe_size=0, report_to="wandb"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's transaction log (what `wandb sync` uploads) holds every logged value as JSON text; the
    # wandb package has no public reader for it, so look for the bytes.
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    rows = [r for r in _metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and log.count(b"train/loss") >= 3
    for r in rows:
        for key in ("train/loss", "train/align", "train/orth"):
            assert json.dumps(r[key]).encode() in log, (key, r[key])
