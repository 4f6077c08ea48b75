"""pipeline.vision.models: trunk init modes, projector, MFlagVision, exported encoder layout."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torchvision

from pipeline.common import ConfigError, MflagError
from pipeline.vision.checkpoints import imagenet_weights_path
from pipeline.vision.models import MFlagVision, Projector, build_resnet50_trunk, count_parameters, encoder_state_dict
from tests._scratch import scratch


@pytest.fixture(scope="module")
def model() -> MFlagVision:
    torch.manual_seed(0)
    return MFlagVision(text_dim=48, proj_dim=32, text_head="mlp", hidden=64)


def test_projector_is_the_original_mlp():
    p = Projector(20, out_dim=8, hidden=16)
    kinds = [type(m) for m in p]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert (p[0].in_features, p[0].out_features, p[3].out_features) == (20, 16, 8)
    assert p[1].affine and not p[4].affine
    out = p.train()(torch.randn(6, 20))
    assert out.shape == (6, 8)
    # BatchNorm without affine: every output column is standardised over the batch.
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)


def test_forward_shapes_and_text_heads(model):
    zv, za = model.train()(torch.randn(2, 3, 32, 32))
    assert zv.shape == (2, 2048) and za.shape == (2, 32)
    assert model.project_text(torch.randn(2, 48)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"\(B, 48\)"):
        model.project_text(torch.randn(2, 47))
    direct = MFlagVision(text_dim=40, text_head="none", trunk=nn.Sequential(nn.Flatten(), nn.LazyLinear(2048)))
    assert direct.proj_dim == 40
    t = torch.randn(3, 40)
    assert direct.project_text(t) is t  # straight into the frozen text space
    assert direct.train()(torch.randn(3, 3, 4, 4))[1].shape == (3, 40)
    with pytest.raises(ConfigError, match="proj_dim"):
        MFlagVision(text_dim=40, proj_dim=32, text_head="none", trunk=nn.Identity())
    with pytest.raises(ConfigError, match="text_head"):
        MFlagVision(text_dim=40, text_head="linear", trunk=nn.Identity())


def test_count_parameters(model):
    total = count_parameters(model, trainable_only=False)
    assert total == sum(p.numel() for p in model.parameters())
    trunk_n = count_parameters(model.trunk)
    assert trunk_n == 23_508_032  # torchvision ResNet50 without fc
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    try:
        assert count_parameters(model) == total - trunk_n
        assert count_parameters(model, trainable_only=False) == total
    finally:
        for p in model.trunk.parameters():
            p.requires_grad_(True)


def test_encoder_state_dict_loads_into_torchvision(model):
    sd = encoder_state_dict(model)
    assert not any(k.startswith("fc.") for k in sd)
    assert all(v.device.type == "cpu" for v in sd.values())
    resnet = torchvision.models.resnet50()
    result = resnet.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(resnet.conv1.weight, model.trunk.conv1.weight)
    # Wrapped models (DDP-style .module) export the same keys.
    wrapper = nn.Module()
    wrapper._orig_mod = model
    assert encoder_state_dict(wrapper).keys() == sd.keys()


def test_sync_batchnorm_model_exports_the_same_encoder(model):
    # train-vision converts BatchNorm to SyncBatchNorm under multi-GPU DDP; the exported encoder and
    # the checkpoints must stay plain torchvision ResNet50 weights, loadable by every later stage.
    import copy

    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    a, b = encoder_state_dict(model), encoder_state_dict(synced)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert synced.state_dict().keys() == model.state_dict().keys()


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory, model):
    """One ~94 MB checkpoint for all load tests: nested under "state_dict", DDP prefix, fc included."""
    sd = encoder_state_dict(model)
    nested = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    nested["state_dict"]["module.fc.weight"] = torch.zeros(1000, 2048)  # ignored on load
    nested["state_dict"]["module.fc.bias"] = torch.zeros(1000)
    with scratch(tmp_path_factory, "ckpt") as folder:
        torch.save(nested, folder / "enc.pt")
        yield folder / "enc.pt"


def test_init_from_path_nested_and_prefixed(saved_encoder, model):
    trunk = build_resnet50_trunk(str(saved_encoder))
    assert torch.equal(trunk.layer4[2].conv3.weight, model.trunk.layer4[2].conv3.weight)
    assert torch.equal(trunk.bn1.running_var, model.trunk.bn1.running_var)
    assert isinstance(trunk.fc, nn.Identity)


def test_init_from_bad_files(tmp_path, model):
    torch.save({"encoder": {"conv1.weight": model.trunk.conv1.weight.detach()}}, tmp_path / "partial.pt")
    with pytest.raises(MflagError, match=r"partial\.pt"):
        build_resnet50_trunk(str(tmp_path / "partial.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MflagError, match=r"junk\.pt"):
        build_resnet50_trunk(str(tmp_path / "junk.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MflagError, match=r"list\.pt.*state_dict"):
        build_resnet50_trunk(str(tmp_path / "list.pt"))
    with pytest.raises(ConfigError, match="init"):
        build_resnet50_trunk(str(tmp_path / "absent.pt"))


def test_imagenet_init_reads_only_the_hub_cache(tmp_path, monkeypatch, saved_encoder, model):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert imagenet_weights_path() is None
    with pytest.raises(MflagError) as err:
        build_resnet50_trunk("imagenet")
    msg = str(err.value)
    assert str(expected) in msg and "IMAGENET1K_V1" in msg and "never downloads" in msg
    # With the file in the cache it loads, offline.
    expected.parent.mkdir(parents=True)
    os.link(saved_encoder, expected)
    trunk = build_resnet50_trunk("imagenet")
    assert torch.equal(trunk.conv1.weight, model.trunk.conv1.weight)
