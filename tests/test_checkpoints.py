"""Encoder checkpoint layouts: this tool's, original M-FLAG, MGCA, GLoRIA, torchvision; strictness."""
from __future__ import annotations

import argparse

import pytest
import torch
from torchvision.models import resnet50

from pipeline.common import MflagError
from pipeline.vision.checkpoints import (
    IMAGENET_FILES,
    CheckpointError,
    build_encoder,
    extract_encoder_state,
    load_encoder,
    load_encoder_state,
)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return resnet50(weights=None).state_dict()


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _assert_same(got, reference):
    ref = _trunk(reference)
    assert set(got) == set(ref)
    for k in ("conv1.weight", "layer4.2.bn3.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(got[k], ref[k])


@pytest.mark.parametrize("layout,wrap", [
    ("torchvision", lambda s: dict(s)),  # fc.* present: dropped
    ("torchvision", lambda s: _trunk(s)),  # this tool's encoder.pt
    ("mflag-original", lambda s: {**{f"encoder.{k}": v for k, v in s.items()},
                                  "proj_v.0.weight": torch.zeros(2048, 2048)[:2], "lm_model.x": torch.zeros(1)}),
    ("mflag-original", lambda s: {f"module.encoder.{k}": v for k, v in _trunk(s).items()}),
    ("mgca", lambda s: {"state_dict": {**{f"img_encoder_q.model.{k}": v for k, v in _trunk(s).items()},
                                       "img_encoder_q.global_embed.weight": torch.zeros(3),
                                       "text_encoder_q.model.x": torch.zeros(1)}, "epoch": 3}),
    ("gloria", lambda s: {"state_dict": {**{f"gloria.img_encoder.model.{k}": v for k, v in s.items()},
                                         "gloria.img_encoder.global_embedder.weight": torch.zeros(2)}}),
    ("torchvision", lambda s: {"model": _trunk(s), "optimizer": {}}),
    ("torchvision", lambda s: {f"_orig_mod.{k}": v for k, v in _trunk(s).items()}),
    ("mflag-checkpoint", lambda s: {"format": 1, "step": 5, "model": {
        **{f"vision.trunk.{k}": v for k, v in _trunk(s).items()}, "vision.projector.0.weight": torch.zeros(2)}}),
])
def test_layouts_detected(reference, layout, wrap):
    from pipeline.vision.checkpoints import _tensor_dict

    state = _tensor_dict(wrap(reference))
    got, name = extract_encoder_state(state)
    assert name == layout
    _assert_same(got, reference)


def test_load_from_files_and_build(tmp_path, reference):
    from pipeline.safeload import Stub, safe_load

    mgca = tmp_path / "mgca.ckpt"
    # Lightning pickles hyper-parameters as objects torch's weights-only loader refuses; the restricted
    # loader keeps them as inert stubs (the class is never imported) beside the real tensors.
    torch.save({"state_dict": {f"img_encoder_q.model.{k}": v for k, v in reference.items()},
                "hyper_parameters": argparse.Namespace(emb_dim=128)}, mgca)
    hp = safe_load(mgca)["hyper_parameters"]
    assert isinstance(hp, Stub) and not isinstance(hp, argparse.Namespace)
    assert hp.state == {"emb_dim": 128} and repr(hp) == "<stub of argparse.Namespace>"
    got, name = load_encoder_state(mgca)
    assert name == "mgca"
    _assert_same(got, reference)
    model, info = load_encoder(str(mgca))
    assert info["layout"] == "mgca" and len(info["sha256"]) == 64
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2048)


def test_checkpoint_pickling_classes_that_are_not_installed(tmp_path, reference, monkeypatch):
    # GLoRIA/Lightning checkpoints pickle hyper-parameters as OmegaConf / Lightning objects; neither is a
    # dependency here. Write one with a class from a throw-away module, then make that module vanish.
    import sys
    import types

    mod = types.ModuleType("fake_omegaconf")

    class DictConfig(dict):
        pass

    DictConfig.__module__, DictConfig.__qualname__ = "fake_omegaconf", "DictConfig"
    mod.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "fake_omegaconf", mod)
    ckpt = tmp_path / "gloria.ckpt"
    hp = DictConfig(model={"vision": {"model_name": "resnet_50"}})
    hp.extra = [1, 2]
    torch.save({"state_dict": {f"gloria.img_encoder.model.{k}": v for k, v in reference.items()},
                "hyper_parameters": hp}, ckpt)
    monkeypatch.delitem(sys.modules, "fake_omegaconf")
    got, name = load_encoder_state(ckpt)
    assert name == "gloria"
    _assert_same(got, reference)


def test_old_checkpoint_without_num_batches_tracked(reference):
    state = {k: v for k, v in _trunk(reference).items() if not k.endswith("num_batches_tracked")}
    got, name = extract_encoder_state(state)
    assert name == "torchvision" and int(got["bn1.num_batches_tracked"]) == 0


def test_unknown_layout_lists_keys(reference):
    state = {f"visual.trunk.{k}": v for k, v in reference.items()}
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*first keys: \['visual\.trunk\.conv1"):
        extract_encoder_state(state)


def test_strict_missing_and_shape(reference):
    state = {f"img_encoder_q.model.{k}": v for k, v in _trunk(reference).items() if not k.startswith("layer4.2.")}
    with pytest.raises(CheckpointError, match=r"mgca layout .* missing .* key\(s\), e\.g\. \['layer4\.2\."):
        extract_encoder_state(state)
    bad = dict(_trunk(reference))
    bad["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(CheckpointError, match=r"conv1\.weight has shape \(64, 1, 7, 7\)"):
        extract_encoder_state(bad)
    extra = {**_trunk(reference), "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected key"):
        extract_encoder_state(extra)


def test_random_and_imagenet(tmp_path, monkeypatch, reference):
    assert isinstance(build_encoder("random").fc, torch.nn.Identity)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MflagError, match=r"hub/checkpoints/resnet50-0676ba61\.pth"):
        build_encoder("imagenet")
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    torch.save(reference, tmp_path / "hub/checkpoints" / IMAGENET_FILES[0])
    model, info = load_encoder("imagenet")
    assert info["init"] == "imagenet" and info["layout"] == "torchvision"
    assert torch.equal(model.state_dict()["conv1.weight"], reference["conv1.weight"])
    with pytest.raises(MflagError, match="not found"):
        build_encoder(str(tmp_path / "missing.pt"))
