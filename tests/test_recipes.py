"""The two pre-training recipes: configs/mimic-original.yaml reproduces the original M-FLAG run
(cheliu-computation/M-FLAG-MICCAI2023 @ a7fea3c) setting by setting, configs/mimic.yaml is the
recommended one. The expected values below are read off the original source, independently of the
YAML, with the file and line each comes from."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from cli import cli
from pipeline.common import ConfigError, MflagError
from pipeline.options import result_config
from pipeline.pretrain import wds as wdsp
from pipeline.pretrain.schedules import original_restart_period
from pipeline.pretrain.step import batch_per_rank, param_groups
from stages import orchestrate
from stages import train_vision as tv
from tests._train_helpers import cli_args, make_world

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_YAML = REPO / "configs" / "mimic-original.yaml"
RECOMMENDED_YAML = REPO / "configs" / "mimic.yaml"

# What the original code trains with (file:line in cheliu-computation/M-FLAG-MICCAI2023).
ORIGINAL_TRAIN = {
    "batch_size": 512,                  # pretrain/config.yaml:19, per process (utils_trainer.py:67-70)
    "batch_semantics": "per-process",
    "epochs": 51,                       # max_epochs 50 (config.yaml:22), range(0, 50 + 1) (utils_trainer.py:112)
    "lr": 2e-5,                         # config.yaml:29
    "weight_decay": 0.05,               # config.yaml:31
    "decay_norm_bias": True,            # AdamW(model.parameters(), ...) (main.py:73-77)
    "schedule": "restarts",             # CosineAnnealingWarmRestarts (utils_trainer.py:100-106)
    "restart_period": "original",
    "restart_every": None,
    "min_lr": 1e-8,                     # eta_min (utils_trainer.py:105)
    "min_lr_ratio": 0.0,
    "warmup_steps": 0,
    "precision": "fp16",                # autocast() + GradScaler() (utils_trainer.py:110, 128)
    "orth_scope": "local",              # each process's own batch (utils_trainer.py:47-49)
    "sync_bn": False,                   # plain DDP (main.py:67)
    "orth_on": "zv",                    # orthogonal_loss(img_emb, img_emb) (utils_trainer.py:139)
    "orth_lambda": 0.0051,              # utils_trainer.py:52
    "orth_weight": 1.0,                 # loss = orth + align (utils_trainer.py:142)
    "orth_standardize": False,
    "text_head": "mlp",                 # proj_t (utils_builder.py:31-36)
    "hidden_dim": 2048,                 # utils_builder.py:25, 32
    "proj_dim": 1024,                   # utils_builder.py:28-29, 35-36
    "image_size": 256,                  # ext_data.py --resize 256
    "crop_size": 224,                   # RandomCrop(224) (utils_dataset.py:61)
    "aug": "original",                  # utils_dataset.py:60-70
    "init": "imagenet",                 # resnet50(pretrained=True) (utils_builder.py:19)
    "pairs": "all",                     # every row of MGCA's master csv (main.py:47-49, utils_dataset.py:74-84)
    "grad_clip": None,                  # no clipping (utils_trainer.py:155-157)
    "text_mode": "cache",               # the frozen CXR-BERT (config.yaml:5), run once by embed-text here
    "seed": 42,                         # torch.manual_seed(42) (main.py:39)
}
ORIGINAL_PREPARE = {"size": 256, "views": ("PA", "AP"), "splits": ("train", "validate", "test"),
                    "text_sections": ("impression", "findings"), "section_separator": ""}
ORIGINAL_EMBED = {"pooling": "cls", "max_length": 512}  # utils_builder.py:48, 70


def _nodes(path: Path, workdir: Path) -> dict:
    spec = orchestrate.load_spec(path, str(workdir))
    return {n.name: n for n in orchestrate.build_nodes(spec)}


def _train_config(params: dict, **paths) -> tv.TrainVisionConfig:
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return tv.TrainVisionConfig(**{"shards": "(x)", "text_cache": "(x)", "out": "(x)", **paths, **opts})


def _original_lrs(t0: int, steps: int, lr: float = 2e-5, eta_min: float = 1e-8) -> list[float]:
    """The learning rate after each of ``steps`` iterations of the original loop: AdamW, then
    CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min) stepped once per iteration without an
    argument (utils_trainer.py:100-106, 156-160)."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.05, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=1, eta_min=eta_min)
    out = []
    for _ in range(steps):
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_original_recipe_validates_and_names_the_originals_settings(tmp_path):
    res = CliRunner().invoke(cli, ["status", "--config", str(ORIGINAL_YAML), "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    states = {line.split()[0]: line.split()[1] for line in res.output.splitlines()}
    assert states == {"prepare": "missing", "embed-text": "missing", "train:original": "missing",
                      "report": "missing"}

    nodes = _nodes(ORIGINAL_YAML, tmp_path / "w")
    cfg = _train_config(nodes["train:original"].params)
    got = {k: getattr(cfg, k) for k in ORIGINAL_TRAIN}
    assert got == ORIGINAL_TRAIN
    prep = nodes["prepare"].params
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in prep.items() if k in ORIGINAL_PREPARE} \
        == ORIGINAL_PREPARE
    assert {k: nodes["embed-text"].params[k] for k in ORIGINAL_EMBED} == ORIGINAL_EMBED
    assert nodes["embed-text"].params["model"] == "microsoft/BiomedVLP-CXR-BERT-general"  # utils_builder.py:38


@pytest.mark.slow
def test_original_recipe_on_a_tiny_run_trains_with_the_originals_schedule_and_optimizer(tmp_path):
    # The recipe's own options, with only the sizes a CPU test needs replaced; none of the replaced
    # keys is one that defines the schedule, the optimizer, the batch semantics or the data.
    world = make_world(tmp_path, n_train=32, n_val=8, per_shard=4)
    params = dict(_nodes(ORIGINAL_YAML, tmp_path / "w")["train:original"].params)
    tiny = dict(batch_size=4, epochs=6, max_steps=12, image_size=40, crop_size=32, hidden_dim=128, proj_dim=32,
                precision="fp32", init="random", device="cpu", num_workers=0, shuffle_buffer=8, aug="none",
                threads=1, log_every=1, ckpt_every=12, probe_every=100, probe_size=8)
    kept = {"batch_semantics", "pairs", "lr", "weight_decay", "decay_norm_bias", "schedule", "restart_period",
            "min_lr", "warmup_steps", "orth_scope", "sync_bn", "orth_on", "orth_lambda", "text_head", "seed"}
    assert kept <= set(params) and not kept & set(tiny)
    out = tmp_path / "run"
    cfg = _train_config({**params, **tiny}, shards=str(world["shards"]), text_cache=str(world["cache"]),
                        out=str(out))
    summary = tv.run(cfg)

    # pairs all: the 32 train and 8 validate images are the epoch, 4 per process -> 10 steps an epoch
    n, b = 40, 4
    assert summary["batch_per_process"] == b and summary["global_batch"] == b
    assert summary["steps_per_epoch"] == n // b and summary["steps"] == 12 and summary["epochs"] == 2
    seen = {s for rank in summary["shards_per_rank"] for s in rank}
    assert seen == {f"train-{i:06d}.tar" for i in range(8)} | {f"validate-{i:06d}.tar" for i in range(2)}
    assert summary["probe_held_out"] is False  # the validate images are training images now

    # T_0 as the original computes it: int(max_epochs * len(dataset) // 4 // batch_size * 0.4) with
    # max_epochs = 5 for the 6 epochs its loop would run; 40% of this 12-step run would be 5 instead.
    t0 = int(5 * n // 4 // b * 0.4)
    assert t0 == 4 and round(0.4 * 12) != t0
    assert summary["restart_cycle"] == t0
    lrs = [r["train/lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r]
    ref = _original_lrs(t0, 12)
    assert lrs == pytest.approx(ref, rel=1e-12, abs=0)
    assert lrs[3] == pytest.approx(2e-5) and lrs[7] == pytest.approx(2e-5)  # restarts after steps 4 and 8
    assert min(lrs) < 2e-5 * 0.2  # and in between it really anneals

    # one AdamW group holding every trainable tensor, all decayed, with the original's betas and eps
    ck = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    groups = ck["optimizer"]["param_groups"]
    n_tensors = len(list(torchvision.models.resnet50().parameters())) - 2 + 2 * 6  # - fc, + two projectors
    assert len(groups) == 1 and len(groups[0]["params"]) == n_tensors
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["betas"] == (0.9, 0.999) and groups[0]["eps"] == 1e-8
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["orth_scope"] == "local" and saved["config"]["sync_bn"] is False


@pytest.mark.slow
def test_original_recipe_on_two_processes_doubles_the_batch_but_not_the_cycle(tmp_path):
    """torchrun with 2 CPU ranks: 4 images per process make a global batch of 8, so an epoch of 40 is
    5 steps, while T_0 (from the batch per process) stays 4 steps, as in the original."""
    world = make_world(tmp_path, n_train=32, n_val=8, per_shard=4)
    out = tmp_path / "ddp"
    args = cli_args(world, out, num_workers=1, max_steps=6, epochs=6, ckpt_every=6, probe_every=100,
                    probe_size=0, batch_semantics="per-process", pairs="all", lr=2e-5, weight_decay=0.05,
                    schedule="restarts", restart_period="original", min_lr=1e-8, orth_scope="local")
    args += ["--decay-norm-bias", "--no-sync-bn"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "cli.py", "-q",
         "train-vision", *args], cwd=REPO, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["batch_per_process"] == 4
    assert summary["steps_per_epoch"] == 5 and summary["restart_cycle"] == 4
    assert "SyncBatchNorm" not in proc.stderr  # --no-sync-bn: BatchNorm per process, as the original
    lrs = [r["train/lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r]
    assert lrs == pytest.approx(_original_lrs(4, 6), rel=1e-12, abs=0)


def test_recommended_recipe_is_gpu_count_independent_with_the_originals_cycle(tmp_path):
    cfg = _train_config(_nodes(RECOMMENDED_YAML, tmp_path / "w")["train:mflag"].params)
    assert (cfg.batch_semantics, cfg.orth_scope, cfg.sync_bn, cfg.precision) == ("global", "global", True, "bf16")
    assert cfg.batch_size == 2 * 512 and cfg.schedule == "restarts" and cfg.min_lr == 1e-8
    # Its cycle, a fraction of the run, is the original's T_0 on its 2 processes of 512 (about 10 epochs),
    # for a MIMIC-sized epoch; the original formula on 8 processes of 128 would be 4 times longer.
    n = 230_000
    steps = cfg.epochs * (n // cfg.batch_size)
    cycle = round(cfg.restart_fraction * steps)
    t0_two = original_restart_period(50, n, 512)
    assert abs(cycle - t0_two) / t0_two < 0.01
    assert original_restart_period(50, n, 128) == pytest.approx(4 * t0_two, rel=0.01)


@pytest.mark.parametrize("args, local, total", [
    ((512, "per-process", 2), 512, 1024), ((512, "per-process", 1), 512, 512),
    ((1024, "global", 2), 512, 1024), ((1024, "global", 8), 128, 1024)])
def test_batch_per_rank(args, local, total):
    assert batch_per_rank(*args) == (local, total)


def test_batch_per_rank_refuses_an_uneven_global_batch():
    with pytest.raises(ValueError, match="1000 must be divisible by the world size 3"):
        batch_per_rank(1000, "global", 3)


@pytest.mark.parametrize("max_epochs, n, b", [(50, 230_000, 512), (50, 230_001, 512), (5, 40, 4), (0, 40, 4),
                                              (3, 1234, 7)])
def test_original_restart_period_evaluates_left_to_right(max_epochs, n, b):
    # The literal expression of utils_trainer.py:102-103 (Python: * and // left to right, then * 0.4)
    assert original_restart_period(max_epochs, n, b) == int(max_epochs * n // 4 // b * 0.4)
    assert original_restart_period(max_epochs, n, b) == int(((max_epochs * n) // 4) // b * 0.4)


def test_param_groups_decay_norm_and_bias_only_when_asked():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    split = param_groups(params, 0.05, decay_norm_bias=False)
    assert [len(g["params"]) for g in split] == [2, 4] and [g["weight_decay"] for g in split] == [0.05, 0.0]
    assert all(p.ndim == 2 for p in split[0]["params"])
    one = param_groups(params, 0.05, decay_norm_bias=True)
    assert len(one) == 1 and one[0]["params"] == params and one[0]["weight_decay"] == 0.05


def test_pairs_all_reads_every_split_of_a_prepare_output(tmp_path):
    world = make_world(tmp_path / "w", n_train=8, n_val=4, per_shard=4)
    shards = Path(world["shards"])
    # a plain folder: train- then validate- shards, counts from sizes.json
    both = wdsp.resolve_splits(str(shards), ("train", "validate", "test"))
    assert [Path(u).name for u in both.urls] == ["train-000000.tar", "train-000001.tar", "validate-000000.tar"]
    assert both.num_samples == 12
    # a prepare output folder: the manifest's lists, in split order; splits it lacks are skipped
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "shards").symlink_to(shards)
    (prep / "manifest.json").write_text(json.dumps({"splits": {
        "validate": {"shards": ["validate-000000.tar"]}, "train": {"shards": ["train-000001.tar"]}}}))
    got = wdsp.resolve_splits(str(prep), ("train", "validate", "test"))
    assert [Path(u).name for u in got.urls] == ["train-000001.tar", "validate-000000.tar"] and got.num_samples == 8
    with pytest.raises(MflagError, match="lists no shards for the splits test"):
        wdsp.resolve_splits(str(prep), ("test",))
    with pytest.raises(MflagError, match="need a prepare output folder"):
        wdsp.resolve_splits(str(shards / "train-000000.tar"), ("train",))


def test_recipe_options_are_checked(tmp_path):
    from tests._train_helpers import tiny_config

    world = make_world(tmp_path, n_train=8, n_val=4, per_shard=4)
    with pytest.raises(ConfigError, match="min_lr: give either"):
        tiny_config(world, tmp_path / "a", min_lr=1e-8, min_lr_ratio=0.1)
    with pytest.raises(ConfigError, match=r"min_lr: must be in \[0, lr"):
        tiny_config(world, tmp_path / "a", min_lr=1.0)
    with pytest.raises(ConfigError, match="restart_every: give either"):
        tiny_config(world, tmp_path / "a", restart_every=3, restart_period="original")
    with pytest.raises(ConfigError, match="restart_fraction"):
        tiny_config(world, tmp_path / "a", restart_fraction=0.0)
    with pytest.raises(ConfigError, match="pairs"):
        tiny_config(world, tmp_path / "a", pairs="validate")
    # The original formula on too little data gives T_0 = 0, which torch refuses: a clear error, by CLI too
    res = CliRunner().invoke(cli, ["train-vision", *cli_args(world, tmp_path / "b", epochs=2, schedule="restarts",
                                                             restart_period="original", pairs="all",
                                                             batch_semantics="per-process", probe_size=0)])
    assert res.exit_code == 2
    assert "the original's T_0 = int(1 x 12 // 4 // 4 x 0.4) is 0 steps" in res.output, res.output


def _doc_command(path: Path, start: str) -> list[str]:
    """The arguments of the shell command in ``path`` that begins with ``start`` (continuation lines
    joined, ``#`` comments dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(start))
    text = ""
    for ln in lines[i:]:
        text += ln.rstrip().rstrip("\\") + " "
        if not ln.rstrip().endswith("\\"):
            break
    return shlex.split(text[len(start):])


def _semantics(cfg: tv.TrainVisionConfig) -> dict:
    d = result_config(cfg)
    for k in ("shards", "text_cache"):
        d.pop(k)
    if d["proj_dim"] is None and d["text_head"] == "mlp":
        d["proj_dim"] = 1024  # what None means with an mlp text head
    return d


@pytest.mark.parametrize("doc, start, yaml_path, variant", [
    ("docs/RECIPES.md", "torchrun --nproc_per_node=2 cli.py train-vision", ORIGINAL_YAML, "train:original"),
    ("README.md", "torchrun --nproc_per_node=8 cli.py train-vision", RECOMMENDED_YAML, "train:mflag")])
def test_documented_commands_train_what_the_recipes_train(tmp_path, doc, start, yaml_path, variant):
    import cli as cli_module

    args = _doc_command(REPO / doc, start)
    ctx = cli_module.cli.commands["train-vision"].make_context("train-vision", args)
    from_doc = tv.TrainVisionConfig(**ctx.params)  # the command builds its config from the parsed values alone
    from_yaml = _train_config(_nodes(yaml_path, tmp_path / "w")[variant].params)
    assert _semantics(from_doc) == _semantics(from_yaml)
