"""train-vision end to end on tiny synthetic shards (real ResNet50, real pipeline, CPU)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from cache import write_cache
from pipeline.common import ConfigError, MflagError
from pipeline.pretrain import losses
from pipeline.pretrain.state import TrainingError
from stages import train_vision as tv
from tests._train_helpers import TEXT_PARAMS, cli_args, make_world, tiny_config

REPO = Path(__file__).resolve().parents[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_orthogonality_on_projected_embedding_lets_alignment_fall_fast(tmp_path):
    # With the orthogonality loss on za (BN-normalised, Barlow-Twins scale) the alignment term
    # dominates the gradient and falls within a few steps on a fixed batch.
    world = make_world(tmp_path, n_train=8, n_val=8, per_shard=4)
    out = tmp_path / "run"
    tv.run(tiny_config(world, out, batch_size=8, shuffle_buffer=1, lr=2e-5, max_steps=6, ckpt_every=100,
                       probe_every=100, orth_on="za"))
    align = [r["train/align"] for r in metrics(out) if "train/loss" in r]
    assert align[-1] < 0.8 * align[0], align


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_exports_a_torchvision_encoder(tmp_path, caplog):
    # 8 studies in 2 shards, a global batch of 8 and no shuffle buffer: every step sees the same 8
    # images, so the loss curve reflects optimisation rather than batch-to-batch noise. Default
    # objective: the orthogonality loss on the raw ResNet features zv (the original code's choice),
    # which dominates the total at initialisation.
    world = make_world(tmp_path, n_train=8, n_val=8, per_shard=4)
    out = tmp_path / "run"
    caplog.set_level("INFO")
    summary = tv.run(tiny_config(world, out, batch_size=8, shuffle_buffer=1, lr=2e-5, max_steps=6,
                                 ckpt_every=100, probe_every=3))
    rows = [r for r in metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    total = [r["train/loss"] for r in rows]
    assert total[-1] < 0.9 * total[0], total
    for key in ("train/orth", "train/lr", "train/images_per_s", "train/data_wait", "train/grad_norm", "epoch",
                "train/grad_align_trunk", "train/grad_orth_trunk"):
        assert key in rows[0]
    probes_rows = [r for r in metrics(out) if "val/zv_effective_rank_centred" in r]
    assert [r["step"] for r in probes_rows] == [3, 6]
    # the probe states N (the 8 held-out images) and D next to the ranks; centred ranks are < N
    assert probes_rows[-1]["val/n_images"] == 8 and probes_rows[-1]["val/zv_dim"] == 2048
    assert probes_rows[-1]["val/za_dim"] == 32
    assert 1.0 <= probes_rows[-1]["val/zv_effective_rank_centred"] < 8.0
    assert 0.0 <= probes_rows[-1]["val/retrieval_R@1"] <= probes_rows[-1]["val/retrieval_R@5"] <= 1.0

    # the parameter report: trainable vision parameters against the frozen encoder in the cache attrs
    assert summary["text_encoder_params"] == TEXT_PARAMS
    trainable = summary["trainable_params"]
    assert summary["fewer_trainable_vs_finetuned_text"] == pytest.approx(TEXT_PARAMS / (trainable + TEXT_PARAMS))
    assert "fewer trainable parameters" in caplog.text

    sd = torch.load(out / "encoder.pt", weights_only=True)
    missing, unexpected = torchvision.models.resnet50().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    proj = torch.load(out / "projector.pt", weights_only=True)
    assert proj["projector"]["3.weight"].shape == (32, 128) and proj["text_dim"] == 16
    spectrum = json.loads((out / "spectrum.json").read_text())
    assert spectrum["n_images"] == 8 and spectrum["zv"]["dim"] == 2048 and spectrum["za"]["dim"] == 32
    for z in ("zv", "za"):
        for kind in ("centred", "uncentred"):
            sv = spectrum[z][kind]
            assert len(sv) == 8 and sv == sorted(sv, reverse=True)
        assert spectrum[z]["centred"][-1] < 1e-6 * spectrum[z]["centred"][0]  # centring removes one rank
    final = json.loads((out / "summary.json").read_text())
    assert final["final_probe"]["zv_effective_rank_centred"] == pytest.approx(
        spectrum["zv"]["effective_rank_centred"])
    assert final["final_probe"]["zv_effective_rank_centred"] == pytest.approx(
        probes_rows[-1]["val/zv_effective_rank_centred"])
    assert (out / "config.json").is_file() and (out / "checkpoints" / "latest.pt").is_file()

    # a rerun of the finished configuration does nothing; another configuration in OUT is refused
    assert tv.run(tiny_config(world, out, batch_size=8, shuffle_buffer=1, lr=2e-5, max_steps=6,
                              ckpt_every=100, probe_every=3))["steps"] == 6
    with pytest.raises(ConfigError, match="different configuration.*lr"):
        tv.run(tiny_config(world, out, batch_size=8, shuffle_buffer=1, lr=1e-3, max_steps=6))


@pytest.mark.slow
def test_bad_samples_are_counted_and_too_many_stop_the_run(tmp_path):
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4, corrupt=2, missing=2)
    summary = tv.run(tiny_config(world, tmp_path / "ok", max_steps=2, max_bad_fraction=0.5, probe_size=0,
                                 shuffle_buffer=1))
    assert summary["corrupt"] >= 2 and summary["missing"] >= 2
    with pytest.raises(MflagError, match=r"corrupt samples .* > 1%"):
        tv.run(tiny_config(world, tmp_path / "strict", max_steps=2, probe_size=0))


@pytest.mark.slow
def test_restart_schedule_defaults_to_cycles_of_40_percent_of_the_run(tmp_path):
    # Without --restart-every a cycle is --restart-fraction (0.4) of the run: 2 of 5 steps here, so the
    # learning rate is back at its peak after steps 2 and 4 (tests/test_recipes.py: the original's T_0).
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    out = tmp_path / "run"
    tv.run(tiny_config(world, out, schedule="restarts", max_steps=5, probe_size=0, ckpt_every=5))
    lrs = [r["train/lr"] for r in metrics(out) if "train/lr" in r]
    assert len(lrs) == 5
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-3)
    assert lrs[0] == pytest.approx(5e-4) and lrs[2] == pytest.approx(5e-4)


def test_text_cache_of_other_shards_fails_at_start(tmp_path):
    # A cache built for other shards: no study id in common, so no batch could ever be made.
    world = make_world(tmp_path / "a", n_train=8, n_val=2, per_shard=4)
    foreign = write_cache(tmp_path / "foreign", [f"9{i:07d}" for i in range(8)], np.ones((8, 16), np.float32),
                          {"model_id": "x", "pooling": "cls"})
    with pytest.raises(MflagError, match=r"none of the first 4 samples .* has a report in the text cache"):
        tv.run(tiny_config(world, tmp_path / "run", text_cache=str(foreign), probe_size=0))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_study_is_fatal_with_on_missing_error(tmp_path):
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4, missing=4)
    with pytest.raises(MflagError, match="not in the text cache.*on-missing error"):
        tv.run(tiny_config(world, tmp_path / "run", on_missing="error", probe_size=0))


def test_dimension_mismatch_and_preflight_errors(tmp_path):
    from click.testing import CliRunner

    import cli

    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    res = CliRunner().invoke(cli.cli, ["train-vision", *cli_args(world, tmp_path / "a", text_head="none",
                                                                 proj_dim=32)])
    assert res.exit_code == 2 and "error: --proj-dim:" in res.output
    assert "dimension 16" in res.output and "--proj-dim must be 16" in res.output
    with pytest.raises(MflagError, match="2 training shard.*need at least 4"):
        tv.run(tiny_config(world, tmp_path / "b", num_workers=4))
    with pytest.raises(ConfigError, match="crop_size"):
        tiny_config(world, tmp_path / "c", crop_size=64)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    real = losses.alignment_loss
    calls = []

    def poisoned(za, zt):
        calls.append(1)
        loss = real(za, zt)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "alignment_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*step-00000002\.pt"):
        tv.run(tiny_config(world, out, max_steps=4, probe_size=0))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step-00000002.pt"]
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["step"] == 2
    assert not (out / "encoder.pt").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import cli
    from pipeline.pretrain import state as train_state
    real = train_state.save_checkpoint
    def save_then_die(path, payload):
        if path.name == "step-00000006.pt":  # steps 4-6 are done but never saved: they must be redone
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, payload)
    train_state.save_checkpoint = save_then_die
    sys.argv = ["mflag", "train-vision", *sys.argv[1:]]
    cli.main()
""")


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """CPU, fixed seed, 2 DataLoader workers, the original augmentation: a run SIGKILLed after step 6
    (last checkpoint at step 3, mid-epoch, odd step so the workers rotate) and resumed ends with the
    same weights as a run that was never interrupted. 7 steps cross an epoch boundary (4 per epoch)."""
    world = make_world(tmp_path, n_train=16, n_val=4, per_shard=4)
    opts = dict(num_workers=2, aug="original", shuffle_buffer=6, max_steps=7, ckpt_every=3, probe_every=3)
    ref = tmp_path / "ref"
    args_ref = cli_args(world, ref, **opts)
    subprocess.run([sys.executable, "cli.py", "-q", "train-vision", *args_ref], cwd=REPO, env=subprocess_env(),
                   check=True, timeout=300)

    out = tmp_path / "killed"
    args = cli_args(world, out, **opts)
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, env=subprocess_env(), timeout=300,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["step"] == 3
    assert not (out / "encoder.pt").exists()
    subprocess.run([sys.executable, "cli.py", "-q", "train-vision", *args, "--resume", "auto"], cwd=REPO,
                   env=subprocess_env(), check=True, timeout=300)

    for name in ("encoder.pt", "projector.pt"):
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        flat_a = {k: v for k, v in _flatten(a)}
        flat_b = {k: v for k, v in _flatten(b)}
        assert flat_a.keys() == flat_b.keys()
        diff = max((flat_a[k].double() - flat_b[k].double()).abs().max().item() for k in flat_a)
        assert diff <= 1e-6, (name, diff)
    ma = [r for r in metrics(ref) if "train/loss" in r]
    mb = [r for r in metrics(out) if "train/loss" in r]
    assert [r["step"] for r in mb] == list(range(1, 8))  # lines of the lost steps were replaced, not doubled
    assert [r["train/loss"] for r in ma] == pytest.approx([r["train/loss"] for r in mb], rel=1e-6)
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((out / "summary.json").read_text())
    assert sa["samples_read"] == sb["samples_read"]


def _flatten(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    """torchrun with 2 CPU ranks (gloo): ranks read disjoint shards and end with identical weights."""
    world = make_world(tmp_path, n_train=16, n_val=4, per_shard=4)
    out = tmp_path / "ddp"
    args = cli_args(world, out, num_workers=1, max_steps=3, ckpt_every=2, probe_every=3)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "cli.py", "-q",
         "train-vision", *args], cwd=REPO, env=subprocess_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "SyncBatchNorm needs CUDA" in proc.stderr  # on CPU BatchNorm stays per process, and says so
    r0, r1 = (set(s) for s in summary["shards_per_rank"])
    assert r0 and r1 and not r0 & r1
    c0, c1 = summary["param_checksum_per_rank"]
    assert c0 == c1
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert len(ck["data"]) == 2 and ck["step"] == 3
    assert len([r for r in metrics(out) if "train/loss" in r]) == 3  # rank 0 alone writes


@pytest.mark.slow
def test_online_text_mode_runs_the_text_encoder_in_the_step(tmp_path):
    from pipeline.text.models import build_tiny_bert

    world = make_world(tmp_path, n_train=8, n_val=4, per_shard=4)
    texts = [json.loads(line)["text"] for line in world["reports"].read_text().splitlines()]
    bert = build_tiny_bert(texts, tmp_path / "bert", hidden=32, layers=2, heads=2, vocab_size=200)
    out = tmp_path / "online"
    summary = tv.run(tiny_config(world, out, text_cache=None, text_mode="online", text_model=str(bert),
                                 reports=str(world["reports"]), unfreeze_last=1, text_max_length=24,
                                 max_steps=2, probe_every=2))
    vision_only = tv.run(tiny_config(world, tmp_path / "cached", max_steps=1, probe_size=0))
    # trained: the vision model (its text head now maps 32-d BERT output) and the last BERT layer only
    from transformers import AutoModel

    last_layer = sum(p.numel() for p in AutoModel.from_pretrained(bert).encoder.layer[1].parameters())
    assert summary["trainable_params"] == vision_only["trainable_params"] + (32 - 16) * 128 + last_layer
    assert summary["text_encoder_params"] > last_layer
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert any(k.startswith("text.encoder.encoder.layer.1.") for k in ck["model"])
    assert "retrieval_R@1" in summary["final_probe"]
    with pytest.raises(ConfigError, match="reports"):
        tiny_config(world, out, text_cache=None, text_mode="online", text_model=str(bert))


def test_config_and_resume_guards(tmp_path):
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        tv.run(tiny_config(world, tmp_path / "a", precision="fp16"))
    with pytest.raises(ConfigError, match="unfreeze_last"):
        tiny_config(world, tmp_path / "a", unfreeze_last=1)
    with pytest.raises(ConfigError, match="checkpoint .* not found"):
        tv.run(tiny_config(world, tmp_path / "a", resume=str(tmp_path / "nope.pt")))
    out = tmp_path / "b"
    tv.run(tiny_config(world, out, max_steps=2, probe_size=0))
    latest, step2 = out / "checkpoints" / "latest.pt", out / "checkpoints" / "step-00000002.pt"
    assert torch.load(latest, weights_only=False)["step"] == 2 and latest.read_bytes() == step2.read_bytes()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        tv.run(tiny_config(world, out, max_steps=2, probe_size=0, resume="never"))


@pytest.mark.slow
def test_probe_sizes_and_a_held_out_set_smaller_than_asked(tmp_path, caplog):
    # the cheap probe during training uses the first probe_size held-out images, the diagnostic at the
    # end final_probe_size of them, or all there are (with a warning naming the shortfall)
    world = make_world(tmp_path, n_train=8, n_val=6, per_shard=4)
    out = tmp_path / "run"
    caplog.set_level("WARNING")
    tv.run(tiny_config(world, out, max_steps=4, probe_every=2, probe_size=4, final_probe_size=100))
    rows = [r for r in metrics(out) if "val/n_images" in r]
    assert [(r["step"], r["val/n_images"]) for r in rows] == [(2, 4), (4, 6)]
    assert "only 6 usable images" in caplog.text
    assert json.loads((out / "spectrum.json").read_text())["n_images"] == 6


def test_orthogonality_only_trains_on_the_orthogonality_term(tmp_path):
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    out = tmp_path / "orth-only"
    cfg = tiny_config(world, out, max_steps=2, align_weight=0.0, orth_weight=0.5, probe_size=0,
                      final_probe_size=0, keep_checkpoints=0)
    tv.run(cfg)
    # keep_checkpoints 0: the finished run keeps no resume point, and a rerun still finds it finished
    assert not (out / "checkpoints").exists() and (out / "encoder.pt").is_file()
    lines = (out / "metrics.jsonl").read_text()
    assert tv.run(cfg)["steps"] == 2 and (out / "metrics.jsonl").read_text() == lines
    rows = [r for r in metrics(out) if "train/loss" in r]
    assert [r["train/loss"] for r in rows] == pytest.approx([0.5 * r["train/orth"] for r in rows], rel=1e-6)
    assert all(r["train/align"] > 0 for r in rows)  # still measured, as the orth term is at weight 0
    assert not (out / "spectrum.json").exists()
    with pytest.raises(ConfigError, match="align_weight and orth_weight are both 0"):
        tiny_config(world, out, align_weight=0.0, orth_weight=0.0)


def test_unfreeze_last_counts_layers_or_takes_all(tmp_path):
    from pipeline.text.models import OnlineTextEncoder, build_tiny_bert, load_text_model

    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    texts = [json.loads(line)["text"] for line in world["reports"].read_text().splitlines()]
    bert = build_tiny_bert(texts, tmp_path / "bert", hidden=32, layers=3, heads=2, vocab_size=200)

    def trainable(k):
        enc = load_text_model(str(bert), "mean")
        text = OnlineTextEncoder(enc.model, enc.tokenizer, 16, "mean", k)
        return {n.split(".")[0] + ("." + n.split(".")[2] if n.startswith("encoder.layer.") else "")
                for n, p in text.encoder.named_parameters() if p.requires_grad}

    assert trainable(0) == set()
    assert trainable(1) == {"encoder.2"}
    assert trainable(2) == {"encoder.1", "encoder.2"}
    assert trainable("all") == {"embeddings", "encoder.0", "encoder.1", "encoder.2"}
    online = dict(text_cache=None, text_mode="online", text_model=str(bert), reports=str(world["reports"]))
    assert tiny_config(world, tmp_path / "a", unfreeze_last="2", **online).unfreeze_last == 2
    assert tiny_config(world, tmp_path / "a", unfreeze_last="all", **online).unfreeze_last == "all"
    with pytest.raises(ConfigError, match="unfreeze_last: expected a number of layers or 'all'"):
        tiny_config(world, tmp_path / "a", unfreeze_last="some", **online)
    with pytest.raises(ConfigError, match="unfreeze_last: .* has 3 layers, asked for 4"):
        OnlineTextEncoder.from_pretrained(str(bert), 16, "mean", 4)
