"""The training step's measurement of each loss term's gradient on the shared trunk."""
import copy

import pytest
import torch

from pipeline.pretrain.step import StepSettings, TrainModule, losses, train_step, trunk_probe_params
from pipeline.vision.models import MFlagVision


def _setup(seed=0):
    torch.manual_seed(seed)
    module = TrainModule(MFlagVision(16, 32, "mlp", "random", 64))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    images, target = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 16, generator=g)
    return module, opt, scaler, images, target


@pytest.mark.slow
@pytest.mark.parametrize("orth_on", ["zv", "za"])
def test_trunk_gradient_norms_match_separate_backward_passes_and_leave_the_step_unchanged(orth_on):
    s = StepSettings(losses.LossSettings(weights={"align": 1.0, "orth": 0.01}, orth_on=orth_on))
    module, opt, scaler, images, target = _setup()
    reference = copy.deepcopy(module)
    params = trunk_probe_params(module.vision)
    assert params and all(p.requires_grad for p in params)

    # independent: each unweighted term alone through an ordinary backward on a copy of the model
    expected = {}
    for name in ("align", "orth"):
        m = copy.deepcopy(module)
        m.train()
        zv, za, zt = m(images, target)
        loss = losses.alignment_loss(za, zt) if name == "align" else losses.orthogonality_loss(
            zv if orth_on == "zv" else za)
        loss.backward()
        expected[name] = torch.sqrt(sum(p.grad.pow(2).sum() for p in trunk_probe_params(m.vision)))

    module.train()
    out = train_step(module, opt, scaler, images, target, s, grad_params=params)
    assert float(out["grad_align_trunk"]) == pytest.approx(float(expected["align"]), rel=1e-5)
    assert float(out["grad_orth_trunk"]) == pytest.approx(float(expected["orth"]), rel=1e-5)

    # the measured step and an unmeasured one end with bit-identical weights
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference.train()
    plain = train_step(reference, ref_opt, scaler, images, target, s)
    assert "grad_align_trunk" not in plain
    for (name, a), (_, b) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
