"""Probes on matrices whose answers are known, and the lr schedules."""
import math

import numpy as np
import pytest
import torch

from pipeline.pretrain import probes
from pipeline.pretrain.schedules import WarmupCosine, WarmupCosineRestarts


def test_rank_one_matrix_has_effective_rank_one():
    z = torch.outer(torch.randn(16, dtype=torch.float64), torch.randn(32, dtype=torch.float64))
    assert probes.effective_rank(z) == pytest.approx(1.0, abs=1e-6)
    assert probes.top_singular_share(z) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n", [4, 16])
def test_orthogonal_matrix_has_full_effective_rank(n):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    assert probes.effective_rank(3.0 * q) == pytest.approx(n, rel=1e-9)
    assert probes.top_singular_share(q) == pytest.approx(1.0 / n, rel=1e-9)


def test_effective_rank_between_extremes():
    z = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    p = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 8
    assert probes.effective_rank(z) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert probes.top_singular_share(z) == pytest.approx(0.5)


def test_mean_pairwise_cosine():
    same = torch.ones(5, 3)
    assert probes.mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert probes.mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert probes.mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_retrieval_recall_counts_ranks():
    text = torch.eye(6)
    # image i is closest to text i, except image 0 whose own text is the 2nd best and image 1 (6th)
    img = torch.eye(6).clone()
    img[0] = torch.tensor([0.9, 0, 1.0, 0, 0, 0])
    img[1] = torch.tensor([0, -1.0, 0.1, 0.1, 0.1, 0.1])
    r = probes.retrieval_recall(img, text, range(6), ks=(1, 2, 5))
    assert r["R@1"] == pytest.approx(4 / 6)
    assert r["R@2"] == pytest.approx(5 / 6)
    assert r["R@5"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="targets"):
        probes.retrieval_recall(img, text, range(5))


def _collapsed_and_isotropic(n=512, d=256, mean_level=500.0, seed=0):
    """Two sets around the same large positive mean (like ReLU features): one whose spread lies in a
    2-d subspace, one isotropic, with the same total variance."""
    g = torch.Generator().manual_seed(seed)
    mean = mean_level + 10 * torch.rand(d, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    low = torch.randn(n, 2, generator=g, dtype=torch.float64) @ basis.T * (d / 2) ** 0.5
    iso = torch.randn(n, d, generator=g, dtype=torch.float64)
    return mean + low, mean + iso


def test_centred_rank_separates_collapse_that_the_uncentred_rank_hides():
    collapsed, isotropic = _collapsed_and_isotropic()
    # centred: the rank-2 set has effective rank 2, the isotropic one close to D = 256 (N = 512)
    assert probes.effective_rank(collapsed, center=True) == pytest.approx(2.0, abs=0.05)
    assert probes.effective_rank(isotropic, center=True) > 200
    # uncentred: both are dominated by the mean and look rank one
    assert probes.effective_rank(collapsed) < 1.5 and probes.effective_rank(isotropic) < 1.5
    assert probes.effective_rank(isotropic) / probes.effective_rank(collapsed) < 1.5


def test_centred_spectrum_is_the_covariance_spectrum():
    # independent route: eigenvalues of numpy's biased covariance, times N, are the squared centred
    # singular values
    _, z = _collapsed_and_isotropic(n=64, d=16)
    sp = probes.spectrum(z)
    eig = np.sort(np.linalg.eigvalsh(np.cov(z.numpy(), rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(np.square(sp["centred"]), 64 * eig, rtol=1e-9, atol=1e-6)
    assert sp["n"] == 64 and sp["dim"] == 16
    assert sp["centred"] == sorted(sp["centred"], reverse=True)
    p = np.array(sp["centred"]) / np.sum(sp["centred"])
    assert sp["effective_rank_centred"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)


def test_probe_report_states_n_and_d_and_both_ranks():
    collapsed, isotropic = _collapsed_and_isotropic(n=40, d=24)
    spectra = {}
    rep = probes.probe_report(collapsed, isotropic, isotropic, range(40), spectra=spectra)
    assert rep["n_images"] == 40 and rep["zv_dim"] == 24 and rep["za_dim"] == 24
    assert rep["zv_effective_rank_centred"] == pytest.approx(2.0, abs=0.1)
    assert rep["za_effective_rank_centred"] > 10
    assert rep["zv_effective_rank_uncentred"] == pytest.approx(probes.effective_rank(collapsed))
    assert rep["retrieval_R@1"] == 1.0
    assert spectra["zv"]["centred"][0] == pytest.approx(float(probes.singular_values(collapsed, True)[0]))


def test_warmup_cosine():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        WarmupCosine(20, 10)


def test_cosine_restarts():
    f = WarmupCosineRestarts(warmup_steps=2, cycle_steps=4, t_mult=2)
    assert f(0) == 0.5
    assert f(2) == pytest.approx(1.0)
    assert f(4) == pytest.approx(0.5)
    assert f(6) == pytest.approx(1.0)  # restart after 4 post-warmup steps
    assert f.position(6 + 4) == (1, 4, 8)  # second cycle is twice as long
    assert f(14) == pytest.approx(1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), f)
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["cycle_steps"] == 4  # the multiplier's settings round-trip in checkpoints
