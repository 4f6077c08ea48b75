"""Named pre-training loss terms: a term registered in ``pipeline.pretrain.losses.LOSS_TERMS`` (plus its
weight option) reaches the training step, the logged scalars, the non-finite watch and the report with
no other edit; a term at weight 0 contributes nothing."""
from __future__ import annotations

import copy
import dataclasses
import json
import types

import pytest
import torch

from pipeline.common import ConfigError
from pipeline.options import option, result_config
from pipeline.pretrain import losses
from pipeline.pretrain import step as pretrain
from pipeline.pretrain.losses import LOSS_TERMS, Embeddings, LossSettings, LossTerm
from pipeline.report import build
from pipeline.vision.models import MFlagVision
from stages import train_vision as tv
from tests._train_helpers import make_world, tiny_config

NO_DIST = types.SimpleNamespace(enabled=False, world_size=1)


def _toy(e: Embeddings, s: LossSettings) -> torch.Tensor:
    """A toy term: the mean square of the projected image embedding (fp32)."""
    return e.za.float().pow(2).mean()


@dataclasses.dataclass(frozen=True)
class ToyConfig(tv.TrainVisionConfig):
    """TrainVisionConfig with the toy term's weight option, declared as a new term's must be."""

    toy_weight: float = option(0.0, min=0, added_later=True, help="Weight of the toy loss term.")


@pytest.fixture
def toy(monkeypatch):
    """Register the toy term (computed only when weighted, as a new term is by default)."""
    monkeypatch.setitem(LOSS_TERMS, "toy", LossTerm(_toy, "toy_weight"))
    return LOSS_TERMS["toy"]


def _setup():
    torch.manual_seed(0)
    module = pretrain.TrainModule(MFlagVision(16, 32, "mlp", "random", 64))
    g = torch.Generator().manual_seed(1)
    return module, torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 16, generator=g)


def _step(module, images, target, weights: dict, grad_params: bool = False):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    module.train()
    params = pretrain.trunk_probe_params(module.vision) if grad_params else None
    return pretrain.train_step(module, opt, scaler, images, target,
                               pretrain.StepSettings(LossSettings(weights=weights)), params)


# --------------------------------------------------------------------------- the registry
def test_every_registered_term_has_its_weight_option_in_the_config():
    fields = {f.name: f for f in dataclasses.fields(tv.TrainVisionConfig)}
    assert list(LOSS_TERMS) == ["align", "orth"]  # the order of the sum, as the original code
    for name, term in LOSS_TERMS.items():
        assert name.isidentifier() and name not in ("loss", "grad_norm"), name
        assert term.weight_option in fields, term.weight_option
        assert fields[term.weight_option].default == term.default_weight, name


def test_config_gives_the_weights_by_term_name_and_the_grouped_settings(tmp_path):
    world = make_world(tmp_path)
    cfg = tiny_config(world, tmp_path / "o", align_weight=0.5, orth_weight=0.01, orth_on="za", orth_scope="local")
    s = cfg.loss_settings(world_size=4)
    assert dict(s.weights) == {"align": 0.5, "orth": 0.01}
    assert (s.orth_on, s.orth_global, s.world_size, s.orth_lambda) == ("za", False, 4, cfg.orth_lambda)
    o = cfg.optim_settings
    assert (o.lr, o.weight_decay, o.schedule, o.epochs) == (cfg.lr, cfg.weight_decay, cfg.schedule, cfg.epochs)
    m = cfg.model_settings
    assert (m.proj_dim, m.hidden_dim, m.seed, m.channels_last) == (32, 128, 0, cfg.channels_last)
    assert cfg.text_settings.text_cache == cfg.text_cache and cfg.text_settings.text_mode == "cache"
    d = cfg.data_settings
    assert (d.shards, d.splits, d.batch_size, d.image_size, d.seed) == (cfg.shards, ("train",), 4, 40, 0)
    assert tiny_config(world, tmp_path / "o", pairs="all").data_settings.splits == ("train", "validate", "test")


# --------------------------------------------------------------------------- the step
def test_a_registered_term_is_computed_summed_logged_and_watched(toy):
    module, images, target = _setup()
    weights = {"align": 1.0, "orth": 0.01, "toy": 0.5}
    out = _step(copy.deepcopy(module), images, target, weights, grad_params=True)
    assert list(out) == ["loss", "align", "orth", "toy", "grad_norm", "grad_align_trunk", "grad_orth_trunk",
                         "grad_toy_trunk"]
    with torch.no_grad():
        module.train()
        zv, za, zt = module(images, target)
    assert torch.equal(out["toy"], _toy(Embeddings(zv, za, zt), LossSettings()))
    assert torch.equal(out["loss"], 1.0 * out["align"] + 0.01 * out["orth"] + 0.5 * out["toy"])
    assert float(out["grad_toy_trunk"]) > 0

    scalars = pretrain.step_scalars(out, NO_DIST)
    assert list(scalars) == ["train/loss", "train/align", "train/orth", "train/toy", "train/grad_norm",
                             "train/grad_align_trunk", "train/grad_orth_trunk", "train/grad_toy_trunk"]
    assert scalars["train/toy"] == pytest.approx(float(out["toy"]))

    watch = pretrain.NonFiniteWatch("cpu", 0, losses.active_terms(LossSettings(weights=weights)))
    watch.update({**out, "loss": torch.tensor(float("nan"))})
    assert watch.first_bad() == (1, {n: pytest.approx(float(out[n])) for n in ("align", "orth", "toy")})


def test_a_zero_weight_term_contributes_nothing(toy):
    module, images, target = _setup()
    without = copy.deepcopy(module)
    base = {"align": 1.0, "orth": 0.01}
    out = _step(module, images, target, {**base, "toy": 0.0}, grad_params=True)
    assert "toy" not in out and "grad_toy_trunk" not in out  # a new term at weight 0 is not even computed
    toy_always = dataclasses.replace(toy, always=True)
    LOSS_TERMS["toy"] = toy_always  # restored by the fixture's monkeypatch
    also = copy.deepcopy(without)
    out_always = _step(also, images, target, {**base, "toy": 0.0})
    assert "toy" in out_always  # computed and logged, but weighted 0
    del LOSS_TERMS["toy"]
    ref = _step(without, images, target, base)
    for o in (out, out_always):
        assert torch.equal(o["loss"], ref["loss"]) and torch.equal(o["grad_norm"], ref["grad_norm"])
    for m in (module, also):
        for (name, a), (_, b) in zip(m.state_dict().items(), without.state_dict().items()):
            assert torch.equal(a, b), name


def test_the_sum_is_the_written_out_expression_in_registry_order():
    g = torch.Generator().manual_seed(0)
    a, o = torch.rand((), generator=g) * 4, torch.rand((), generator=g) * 1e4
    s = LossSettings(weights={"align": 0.3, "orth": 0.0051})
    assert torch.equal(losses.weighted_total({"align": a, "orth": o}, s), 0.3 * a + 0.0051 * o)
    nan = torch.tensor(float("nan"))
    zero_orth = LossSettings(weights={"align": 1.0, "orth": 0.0})
    assert torch.isnan(losses.weighted_total({"align": a, "orth": nan}, zero_orth))  # 0 x nan still shows


# --------------------------------------------------------------------------- train-vision and the report
@pytest.mark.slow
def test_train_vision_and_the_report_pick_up_a_registered_term(tmp_path, monkeypatch):
    world = make_world(tmp_path, n_train=8, n_val=8, per_shard=4)
    before = tiny_config(world, tmp_path / "plain", max_steps=2, probe_size=0, final_probe_size=0, ckpt_every=100)
    monkeypatch.setitem(LOSS_TERMS, "toy", LossTerm(_toy, "toy_weight"))
    with pytest.raises(ConfigError, match="toy_weight: a loss term"):  # registered without its option
        tv.TrainVisionConfig(**dataclasses.asdict(before))
    # at its default the new option leaves the fingerprint as it was
    plain = ToyConfig(**dataclasses.asdict(before))
    assert result_config(plain) == result_config(before) and plain.loss_settings().weights["toy"] == 0.0
    cfg = ToyConfig(**{**dataclasses.asdict(plain), "out": str(tmp_path / "toy"), "toy_weight": 0.5})
    assert cfg.loss_settings().weights["toy"] == 0.5 and "toy_weight" in result_config(cfg)
    tv.run(cfg)
    tv.run(plain)
    rows = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert all(r["train/toy"] > 0 and r["train/grad_toy_trunk"] > 0 for r in rows)
    assert [r["train/loss"] for r in rows] == pytest.approx(
        [r["train/align"] + r["train/orth"] + 0.5 * r["train/toy"] for r in rows], rel=1e-5)
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any("train/toy" in r for r in plain_rows)  # weight 0: not computed, not logged

    data = build.collect([("mflag", tmp_path / "plain"), ("toy", tmp_path / "toy")], [], "random", "mflag")
    terms = data["trains"]["toy"]["runs"][0]["terms"]
    assert terms["toy"] > 0 and terms["grad_toy_trunk"] > 0
    assert data["trains"]["mflag"]["runs"][0]["terms"]["toy"] is None
    assert set(data["trains"]["toy"]["runs"][0]["curves"]) == {"loss", "align", "orth", "toy"}
    assert "toy_weight" in build.ablation_fields()
    # the reference's config.json may predate the option: read at its default, only toy_weight differs
    ref = {k: v for k, v in data["trains"]["mflag"]["config"].items() if k != "toy_weight"}
    assert build._role(data["trains"]["toy"]["config"], ref) == ("other", {"differs_in": ["toy_weight"]})
    md = build.render(data, tmp_path / "report", "toy")
    table = md.split("## The loss terms per variant")[1].split("\n## ")[0]  # three terms: not "two"
    assert "| align loss | orth loss | toy loss |" in table
    assert "| toy | align 1, orth 1 on zv, toy 0.5 |" in table
    assert "| mflag | align 1, orth 1 on zv |" in table
