"""Representation probes for a batch of embeddings: collapse indicators and retrieval.

The collapse diagnostic is the one the literature uses (Jing et al., ICLR 2022, "Understanding
Dimensional Collapse in Contrastive Self-supervised Learning"): the singular values of the *centred*
(N, D) embedding matrix, i.e. the square roots of N x the eigenvalues of the embedding covariance,
sorted and read in log scale, and their effective rank. The uncentred numbers are kept as a
secondary measure: for non-negative ReLU features such as zv the mean vector dominates the uncentred
matrix, so its spectrum mostly measures the mean, not how many directions the data spans. Ranks are
bounded by min(N - 1, D) (centred), so N and D are reported next to them.

All functions take torch tensors (any device/dtype; computed in float64 on CPU for stable singular
values on small held-out batches) and return plain Python floats or lists.
"""
from __future__ import annotations

import torch


def _as_f64(z: torch.Tensor) -> torch.Tensor:
    if z.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {tuple(z.shape)}")
    return z.detach().to("cpu", torch.float64)


def singular_values(z: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Singular values (descending, float64) of the (N, D) matrix ``z``, optionally centred over rows."""
    z = _as_f64(z)
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(z)


def effective_rank(z: torch.Tensor, center: bool = False, eps: float = 1e-12) -> float:
    """exp(entropy of the normalized singular values) (Roy & Vetterli 2007): 1 for rank one, min(N, D) for
    an orthogonal matrix."""
    return _erank(singular_values(z, center), eps)


def top_singular_share(z: torch.Tensor, center: bool = False) -> float:
    """Largest singular value over the sum of all: 1 for rank one, 1/min(N, D) for an orthogonal matrix."""
    s = singular_values(z, center)
    total = float(s.sum())
    return float(s[0]) / total if total > 0 else 0.0


def mean_pairwise_cosine(z: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs i != j of rows: near 1 when the embeddings collapse."""
    z = _as_f64(z)
    n = z.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least two rows")
    u = torch.nn.functional.normalize(z, dim=1)
    g = u @ u.T
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, targets, ks=(1, 5)) -> dict[str, float]:
    """Image-to-text retrieval recall: ``image_emb`` (N, P), ``text_emb`` (M, P) ranked by cosine;
    ``targets[i]`` is the row of ``text_emb`` that matches image i. Returns {"R@k": fraction}."""
    a = torch.nn.functional.normalize(_as_f64(image_emb), dim=1)
    b = torch.nn.functional.normalize(_as_f64(text_emb), dim=1)
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    if targets.shape[0] != a.shape[0]:
        raise ValueError(f"{a.shape[0]} images but {targets.shape[0]} targets")
    sim = a @ b.T
    true = sim[torch.arange(a.shape[0]), targets]
    # rank = number of texts strictly more similar than the true one (ties count in the model's favour)
    rank = (sim > true[:, None]).sum(dim=1)
    return {f"R@{k}": float((rank < k).double().mean()) for k in ks}


def _erank(s: torch.Tensor, eps: float = 1e-12) -> float:
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum(z: torch.Tensor) -> dict:
    """The collapse diagnostic of one (N, D) embedding matrix: centred (primary) and uncentred singular
    values (descending), their effective ranks and top-singular shares, with ``n`` and ``dim``."""
    sc, su = singular_values(z, center=True), singular_values(z, center=False)
    return {"n": int(z.shape[0]), "dim": int(z.shape[1]),
            "centred": sc.tolist(), "uncentred": su.tolist(),
            "effective_rank_centred": _erank(sc), "effective_rank_uncentred": _erank(su),
            "top_share_centred": float(sc[0] / sc.sum()) if float(sc.sum()) > 0 else 0.0,
            "top_share_uncentred": float(su[0] / su.sum()) if float(su.sum()) > 0 else 0.0}


def probe_report(zv: torch.Tensor, za: torch.Tensor, zt: torch.Tensor, targets,
                 spectra: dict | None = None) -> dict[str, float]:
    """The per-probe metrics written to metrics.jsonl: the collapse diagnostic of zv and za (centred
    effective rank first, uncentred second, with N images and D dimensions), mean pairwise cosine,
    image-to-text retrieval. ``spectra`` receives the full ``spectrum`` of zv and za when given."""
    out: dict[str, float] = {"n_images": int(zv.shape[0])}
    for name, z in (("zv", zv), ("za", za)):
        sp = spectrum(z)
        if spectra is not None:
            spectra[name] = sp
        out[f"{name}_dim"] = sp["dim"]
        out[f"{name}_effective_rank_centred"] = sp["effective_rank_centred"]
        out[f"{name}_effective_rank_uncentred"] = sp["effective_rank_uncentred"]
        out[f"{name}_top_share_centred"] = sp["top_share_centred"]
        out[f"{name}_top_share_uncentred"] = sp["top_share_uncentred"]
        out[f"{name}_mean_pairwise_cosine"] = mean_pairwise_cosine(z)
    out.update({f"retrieval_{k}": v for k, v in retrieval_recall(za, zt, targets).items()})
    return out
