"""Probes on matrices whose answers are known, and the lr schedules."""
import math

import pytest
import torch

from pipeline import probes
from pipeline.schedules import WarmupCosine, WarmupCosineRestarts


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


def test_probe_report_keys():
    z = torch.randn(8, 5)
    rep = probes.probe_report(z, z, z, range(8))
    assert rep["retrieval_R@1"] == 1.0
    assert set(rep) >= {"zv_effective_rank", "zv_top_singular_share", "zv_mean_pairwise_cosine"}


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
