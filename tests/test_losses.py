"""pipeline.pretrain.losses: fused orthogonality loss against the original D x D formulation, alignment loss."""
from __future__ import annotations

import pytest
import torch

from pipeline.pretrain.losses import alignment_loss, gather_with_grad, orthogonality_loss, orthogonality_loss_reference

LAM = 0.0051


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _value_and_grad(fn, z: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, **kw)
    loss.backward()
    return loss.detach(), z.grad


# B < D (Gram branch), B > D and B == D (D x D branch)
SHAPES = [(24, 96), (128, 40), (48, 48)]


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("standardize", [False, True])
def test_fused_matches_float64_reference(b, d, standardize):
    torch.manual_seed(b * 1000 + d)
    z = torch.randn(b, d) * 1.7 + 0.3  # not centred: raw second moments differ from covariances
    ref_v, ref_g = _value_and_grad(orthogonality_loss_reference, z.double(), lam=LAM, standardize=standardize)
    v, g = _value_and_grad(orthogonality_loss, z, lam=LAM, standardize=standardize)
    assert v.dtype == torch.float32 and g.dtype == torch.float32
    assert abs(float(v) - float(ref_v)) <= 1e-6 * abs(float(ref_v))
    assert _rel(g, ref_g) <= 1e-6
    # In float64 the fused algebra is exact up to rounding: a wrong term would show far above 1e-12.
    v64, g64 = _value_and_grad(orthogonality_loss, z.double(), lam=LAM, standardize=standardize)
    assert abs(float(v64) - float(ref_v)) <= 1e-12 * abs(float(ref_v))
    assert _rel(g64, ref_g) <= 1e-12


def test_original_definition_on_a_hand_computed_case():
    # z = I_2 scaled: C = diag(2, 2)/2 ... computed by hand from the definition.
    z = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    c = z.T @ z / 2  # [[5, 1], [1, 2]]
    expected = 0.5 * ((c[0, 0] - 1) ** 2 + (c[1, 1] - 1) ** 2 + 0.5 * (c[0, 1] ** 2 + c[1, 0] ** 2))
    assert torch.allclose(orthogonality_loss(z, lam=0.5), expected)
    assert torch.allclose(orthogonality_loss_reference(z, lam=0.5), expected)


def test_gram_branch_never_forms_d_by_d():
    z = torch.randn(8, 512, requires_grad=True)
    loss = orthogonality_loss(z)
    saved = loss.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) <= 8 * 512  # z itself; the Gram matrix is 8 x 8
    assert any(tuple(t.shape) == (8, 8) for t in saved)
    loss_big_batch = orthogonality_loss(torch.randn(64, 16, requires_grad=True))
    assert any(tuple(t.shape) == (16, 16) for t in loss_big_batch.grad_fn.saved_tensors)


@pytest.mark.parametrize("standardize", [False, True])
def test_fp32_under_bf16_autocast(standardize):
    torch.manual_seed(0)
    z = (torch.randn(16, 64) + 0.1).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = orthogonality_loss(z, standardize=standardize)
        align = alignment_loss(z, z.flip(0))
    assert loss.dtype == torch.float32 and align.dtype == torch.float32
    ref = orthogonality_loss_reference(z.detach().double(), LAM, standardize)
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()  # inputs are bf16, the math is not
    loss.backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


@pytest.mark.parametrize("b,d", [(4, 7), (9, 5), (6, 6)])
@pytest.mark.parametrize("standardize", [False, True])
def test_gradcheck_float64(b, d, standardize):
    torch.manual_seed(b + d)
    z = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: orthogonality_loss(x, lam=0.3, standardize=standardize), (z,))


def test_orthogonality_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        orthogonality_loss(torch.randn(8))
    with pytest.raises(ValueError, match="at least 2"):
        orthogonality_loss(torch.randn(1, 8), standardize=True)


def test_alignment_loss_properties():
    torch.manual_seed(0)
    a = torch.randn(10, 32)
    t = torch.randn(10, 32)
    assert float(alignment_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(a, -a)) == pytest.approx(8.0, abs=1e-5)
    assert torch.allclose(alignment_loss(a, t), alignment_loss(t, a))
    assert torch.allclose(alignment_loss(3 * a, 0.5 * t), alignment_loss(a, t))  # cosine: scale-free
    e = torch.eye(4)
    assert float(alignment_loss(e, e.roll(1, dims=1))) == pytest.approx(4.0)  # orthogonal rows
    cos = torch.nn.functional.cosine_similarity(a.double(), t.double(), dim=-1)
    assert float(alignment_loss(a, t)) == pytest.approx(float((4 - 4 * cos).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="equal shape"):
        alignment_loss(a, t[:, :16])


def test_gather_with_grad_single_process(tmp_path):
    z = torch.randn(4, 8, requires_grad=True)
    assert gather_with_grad(z, 1) is z
    with pytest.raises(RuntimeError, match="process group"):
        gather_with_grad(z, 2)
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="1 ranks"):
            gather_with_grad(z, 2)
    finally:
        dist.destroy_process_group()


def _global_scope_worker(rank: int, world: int, store_path: str, z_all: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        b = z_all.shape[0] // world
        z = z_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        loss = orthogonality_loss(gather_with_grad(z, world))
        loss.backward()
        grad = z.grad / world  # what DDP's gradient averaging does to every rank's gradient
        queue.put((rank, loss.item(), grad.tolist()))  # plain data: tensors would need the sender alive
    finally:
        dist.destroy_process_group()


def test_global_scope_equals_single_process_on_the_global_batch(tmp_path):
    """2 gloo ranks: the gathered loss equals the one-process loss and, after DDP's averaging, so
    do the gradients (so the loss does not depend on the GPU count)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    z_all = torch.randn(12, 20)
    ref_loss, ref_grad = _value_and_grad(orthogonality_loss, z_all)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_global_scope_worker, args=(r, 2, str(tmp_path / "store"), z_all, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, loss, grad in results:
        assert loss == pytest.approx(float(ref_loss), rel=1e-6)
        assert _rel(torch.tensor(grad), ref_grad[rank * 6:(rank + 1) * 6]) <= 1e-5
