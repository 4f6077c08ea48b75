"""CUDA-only defects, shown on the CPU wherever they can be (issue 14); the tests marked ``cuda`` run
on a GPU machine (``bench/gpu_smoke.sh`` runs them there) and are skipped here."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import distributed
from pipeline.common import ConfigError
from pipeline.pretrain import augment as A
from pipeline.pretrain.state import TrainingError
from pipeline.pretrain.step import NonFiniteWatch
from stages import train_vision as tv
from tests._train_helpers import make_world, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --------------------------------------------------------------------------- warp in half precision
def _random_batch(b: int, size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Sharp random pixels in [0, 1]: a sampling point off by a tenth of a pixel changes the output."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, size, size), generator=g).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 4e-3)])
def test_half_precision_warp_equals_the_float32_warp(dtype, tol):
    imgs = _random_batch(8, 64, dtype)
    hmat, _, bounds = A.sample_params(8, torch.Generator().manual_seed(1), "original", 64, 48, with_bounds=True)
    half = A.warp_batch(imgs, hmat, 48, bounds)
    ref = A.warp_batch(imgs.float(), hmat, 48, bounds)  # the same (rounded) pixel values, warped in fp32
    assert half.dtype == dtype  # float input keeps its dtype
    assert (half.float() - ref).abs().max().item() <= tol  # only the output's rounding differs
    assert ref.abs().sum() > 0  # not an all-black warp


@pytest.mark.parametrize("recipe", ["original", "light"])
def test_augmenter_takes_half_precision_input(recipe):
    imgs = _random_batch(8, 64, torch.float16, seed=2)
    half = A.Augmenter(recipe, seed=3, out_size=48)(imgs)
    ref = A.Augmenter(recipe, seed=3, out_size=48)(imgs.float())
    assert half.dtype == torch.float32 and torch.equal(half, ref)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 4e-3)])
def test_half_precision_warp_on_cuda(dtype, tol):
    imgs = _random_batch(8, 256, dtype).cuda()
    hmat, _, bounds = A.sample_params(8, torch.Generator().manual_seed(1), "original", 256, 224, with_bounds=True)
    half = A.warp_batch(imgs, hmat, 224, bounds)
    ref = A.warp_batch(imgs.float().cpu(), hmat, 224, bounds)
    assert half.dtype == dtype and (half.float().cpu() - ref).abs().max().item() <= tol


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["original", "light", "none"])
def test_cuda_augmenter_does_not_synchronise(recipe):
    """Index, flag and coefficient tensors reach the GPU pinned and asynchronously: a batch draws
    parameters on the CPU and queues its warp without waiting for the GPU."""
    imgs = torch.randint(0, 256, (32, 1, 256, 256), dtype=torch.uint8).pin_memory()
    aug = A.Augmenter(recipe, device="cuda", seed=0)
    aug(imgs)  # warm-up: CUDA context, kernels, pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = aug(imgs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (32, 3, 224, 224) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- device selection
@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend ``n`` CUDA devices are visible; records the devices made current."""
    current: list = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(torch.device(d))))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(n)))
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(var, raising=False)
        return current

    return install


def test_device_selection_validates_the_gpu_index(fake_gpus):
    current = fake_gpus(2)
    assert distributed.resolve_device("auto") == "cuda:0"
    assert distributed.resolve_device("cuda") == "cuda:0"
    assert distributed.init_distributed("cuda:1").device == "cuda:1"
    assert current == ["cuda:1"]  # the current device follows, so work that says just "cuda" lands there
    with pytest.raises(ConfigError, match=r"device: cuda:2 does not exist: 2 CUDA device\(s\) visible "
                                          r"\(CUDA_VISIBLE_DEVICES=0,1\); use cuda:0 to cuda:1"):
        distributed.init_distributed("cuda:2")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        distributed.resolve_device("cuda:x")
    assert current == ["cuda:1"]  # nothing was made current by the refused calls


def test_torchrun_rank_with_one_visible_gpu_takes_it(fake_gpus, monkeypatch):
    # Launchers that give each rank its own GPU (CUDA_VISIBLE_DEVICES per rank) leave LOCAL_RANK as is.
    fake_gpus(1)
    assert distributed.resolve_device("cuda", local_rank=3, world_size=4) == "cuda:0"
    fake_gpus(8)
    assert distributed.resolve_device("auto", local_rank=3, world_size=4) == "cuda:3"
    fake_gpus(2)
    with pytest.raises(ConfigError, match="LOCAL_RANK=3 has no GPU of its own: 2 CUDA device"):
        distributed.resolve_device("cuda", local_rank=3, world_size=4)


def test_cuda_without_cuda_is_a_config_error(fake_gpus):
    fake_gpus(0)
    assert distributed.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="device: cuda:0 requested but CUDA is not available"):
        distributed.resolve_device("cuda:0")


def test_train_vision_refuses_a_missing_gpu_before_reading_anything(fake_gpus, tmp_path):
    fake_gpus(1)
    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    with pytest.raises(ConfigError, match="device: cuda:3 does not exist: 1 CUDA device"):
        tv.run(tiny_config(world, tmp_path / "run", device="cuda:3"))
    assert not (tmp_path / "run").exists()


def test_embed_text_makes_its_gpu_current(fake_gpus, monkeypatch, tmp_path):
    from stages import embed_text

    current = fake_gpus(2)
    seen = []
    monkeypatch.setattr(embed_text, "_run", lambda config, device, dist, barrier, lock=None: seen.append(device))
    embed_text.run(embed_text.EmbedTextConfig(reports=str(tmp_path / "r.jsonl"), out=str(tmp_path / "o"),
                                              device="cuda:1"))
    assert seen == ["cuda:1"] and current == ["cuda:1"]
    with pytest.raises(ConfigError, match="cuda:5 does not exist"):
        embed_text.run(embed_text.EmbedTextConfig(reports="r.jsonl", out=str(tmp_path / "o"), device="cuda:5"))


# --------------------------------------------------------------------------- non-finite loss, no sync
def _step_out(loss: float, align: float, orth: float) -> dict:
    return {"loss": torch.tensor(loss), "align": torch.tensor(align), "orth": torch.tensor(orth)}


def test_non_finite_watch_keeps_the_first_bad_step_without_reading_the_device(monkeypatch):
    watch = NonFiniteWatch("cpu", start_step=10)

    def no_sync(*_a, **_k):
        raise AssertionError("a host read of a device value in the per-step path")

    outs = [_step_out(1.0, 0.5, 0.5), _step_out(float("nan"), 0.25, float("inf")),
            _step_out(float("inf"), 7.0, 7.0), _step_out(2.0, 1.0, 1.0)]
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, no_sync)
        watch.update(outs[0])
    assert watch.first_bad() is None
    for out in outs[1:]:
        watch.update(out)
    assert watch.first_bad() == (12, {"align": 0.25, "orth": float("inf")})  # steps 11..14: the first bad one is 12
    assert watch.flag().item() == 1.0


@pytest.mark.slow
def test_non_finite_loss_between_log_steps_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    """The check runs at log and checkpoint steps only: a NaN at step 3 (logs every 5 steps,
    checkpoints every 2) is caught at step 4, before step 4's checkpoint, and named as step 3."""
    from pipeline.pretrain import losses

    world = make_world(tmp_path, n_train=8, n_val=2, per_shard=4)
    real, calls = losses.alignment_loss, []

    def poisoned(za, zt):
        calls.append(1)
        loss = real(za, zt)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "alignment_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 \(align nan.*step-00000002\.pt"):
        tv.run(tiny_config(world, out, max_steps=6, log_every=5, ckpt_every=2, probe_size=0))
    assert len(calls) == 4  # stopped at step 4, not at the end of the run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step-00000002.pt"]


# --------------------------------------------------------------------------- online text mode dtype
def _save_fp16(model, folder) -> None:
    from pipeline.text.models import quiet_transformers

    with quiet_transformers():
        model.half().save_pretrained(folder)


def _stored_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _fp16_bert(texts, folder):
    from transformers import BertModel

    from pipeline.text.models import build_tiny_bert

    build_tiny_bert(texts, folder, hidden=32, layers=2, heads=2, vocab_size=200)
    _save_fp16(BertModel.from_pretrained(folder), folder)
    assert _stored_dtypes(folder) == {"F16"}  # the checkpoint really is fp16
    return folder


def _fp16_distilbert(texts, folder):
    from transformers import DistilBertConfig, DistilBertModel

    from pipeline.text.models import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer(texts, vocab_size=200)
    tok.save_pretrained(folder)
    cfg = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    _save_fp16(DistilBertModel(cfg), folder)
    assert _stored_dtypes(folder) == {"F16"}
    return folder


@pytest.mark.parametrize("make", [_fp16_bert, _fp16_distilbert], ids=["bert", "auto-distilbert"])
def test_fp16_checkpoint_loads_as_float32_in_online_mode(make, tmp_path):
    from pipeline.text.models import OnlineTextEncoder

    folder = make(["no acute process", "small left effusion", "heart size normal"] * 4, tmp_path / "m")
    enc = OnlineTextEncoder.from_pretrained(str(folder), max_length=16, unfreeze_last=1)
    dtypes = {p.dtype for p in enc.parameters()}
    assert dtypes == {torch.float32}, dtypes
    emb = enc(enc.tokenize(["small left effusion", "no acute process"], "cpu"))
    assert emb.dtype == torch.float32 and emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_online_fp16_checkpoint_trains_in_fp32_with_unfrozen_layers(tmp_path):
    """An fp16-saved text encoder in online mode, --precision fp32 --unfreeze-last 1: the step runs
    (no dtype mismatch), AdamW updates float32 weights of the last layer, the frozen ones stay put."""
    from safetensors.torch import load_file

    world = make_world(tmp_path, n_train=8, n_val=4, per_shard=4)
    texts = [json.loads(line)["text"] for line in world["reports"].read_text().splitlines()]
    folder = _fp16_bert(texts, tmp_path / "bert16")
    saved = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    out = tmp_path / "online"
    summary = tv.run(tiny_config(world, out, text_cache=None, text_mode="online", text_model=str(folder),
                                 reports=str(world["reports"]), unfreeze_last=1, text_max_length=24,
                                 max_steps=2, probe_size=0, lr=1e-2, precision="fp32"))
    assert summary["steps"] == 2 and summary["precision"] == "fp32"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["model"]
    text = {k[len("text.encoder."):]: v for k, v in state.items() if k.startswith("text.encoder.")}
    assert text and {v.dtype for v in text.values()} == {torch.float32}
    trained = "encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(text[trained], saved[trained])  # the unfrozen layer was updated
    frozen = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(text[frozen], saved[frozen])  # fp16 values, held in float32, untouched


# --------------------------------------------------------------------------- fp16 step with a GradScaler
class _TinyVision(torch.nn.Module):
    """MFlagVision's interface (forward -> (zv, za), project_text) in a few parameters."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
        self.projector = torch.nn.Linear(16, 8)
        self.text_head = torch.nn.Linear(4, 8)

    def forward(self, x):
        zv = self.trunk(x)
        return zv, self.projector(zv)

    def project_text(self, t):
        return self.text_head(t)


@pytest.mark.parametrize("overflow", [False, True])
def test_fp16_step_with_grad_scaler_steps_or_skips(overflow):
    """The --precision fp16 path of train_step (autocast fp16, GradScaler enabled; on CPU here): a
    finite step updates the weights at an unchanged scale; an overflowing gradient skips the optimizer
    step and halves the scale, and the unscale-then-clip order does not turn that into NaN weights."""
    from pipeline.pretrain.step import StepSettings, TrainModule, train_step

    torch.manual_seed(0)
    module = TrainModule(_TinyVision())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in module.parameters()]
    if overflow:
        module.vision.trunk[1].weight.register_hook(lambda g: g * float("inf"))
    out = train_step(module, opt, scaler, torch.randn(8, 3, 8, 8), torch.randn(8, 4),
                     StepSettings(autocast_dtype=torch.float16, grad_clip=1.0))
    assert torch.isfinite(out["loss"])
    after = list(module.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed is (not overflow)
    assert scaler.get_scale() == (2.0 ** 9 if overflow else 2.0 ** 10)
