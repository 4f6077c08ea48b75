"""M-FLAG losses: the symmetric alignment loss and a fused orthogonality loss, and the registry of the
pre-training loss terms (``LOSS_TERMS``) that the training step, its logs and the report iterate over.

Both losses are computed in fp32 (float64 inputs stay float64, for reference checks) whatever the
autocast context, and return a 0-dim tensor.

The orthogonality loss is the original code's definition, with ``C = zᵀz / B`` (raw second moments):

    L = ½ [ Σ_i (C_ii - 1)² + lam Σ_{i≠j} C_ij² ]

Written as ``Σ_{i≠j} C_ij² = ‖C‖²_F - Σ_i C_ii²`` it only needs ``diag(C)`` (column sums of squares of z)
and ``‖C‖²_F``. When B < D, ``‖zᵀz‖²_F = ‖z zᵀ‖²_F`` lets us use the B x B Gram matrix ``G = z zᵀ`` instead
of the D x D one; the gradient ``d‖zᵀz‖²_F/dz = 4 z (zᵀz) = 4 (z zᵀ) z`` reuses G, so forward and backward
cost one B²D product each (the autograd version of the D x D form costs three D²B products plus D x D
element-wise work). When B >= D the D x D form is the cheaper one and is used instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_TERMS",
    "Embeddings",
    "LossSettings",
    "LossTerm",
    "active_terms",
    "compute_terms",
    "weighted_total",
    "alignment_loss",
    "orthogonality_loss",
    "orthogonality_loss_reference",
    "gather_with_grad",
]

DEFAULT_LAMBDA = 0.0051
_STANDARDIZE_EPS = 1e-5  # same eps as BatchNorm1d, the usual way this standardization is done


def _no_autocast(device_type: str):
    """Disable autocast for ``device_type`` so matmuls below run in the dtype of their inputs."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to disable
        return contextlib.nullcontext()


def _loss_dtype(x: Tensor) -> torch.dtype:
    # float64 is kept for reference computations and gradcheck; everything else runs in fp32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- alignment
def alignment_loss(za: Tensor, zt: Tensor) -> Tensor:
    """Original symmetric alignment loss: mean over the batch of (2 - 2cos(za,zt)) + (2 - 2cos(zt,za)).

    ``za``, ``zt``: (B, P) image and text projections. Returns a 0-dim fp32 tensor in [0, 8].
    Identical rows give 0, opposite rows give 8.
    """
    if za.ndim != 2 or za.shape != zt.shape:
        raise ValueError(f"alignment_loss expects two (B, P) tensors of equal shape, got {tuple(za.shape)} "
                         f"and {tuple(zt.shape)}")
    dt = _loss_dtype(za)
    with _no_autocast(za.device.type):
        a = F.normalize(za.to(dt), dim=-1)
        t = F.normalize(zt.to(dt), dim=-1)
        # Two terms kept, as in the original code, so the value scale (0..8) matches its logs.
        loss_at = 2 - 2 * (a * t).sum(dim=-1)
        loss_ta = 2 - 2 * (t * a).sum(dim=-1)
        return (loss_at + loss_ta).mean()


# --------------------------------------------------------------------------- orthogonality
def _standardize(z: Tensor) -> Tensor:
    """Standardize each column over the batch (biased variance, BatchNorm's eps)."""
    if z.shape[0] < 2:
        raise ValueError("orthogonality_loss(standardize=True) needs a batch of at least 2 rows")
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + _STANDARDIZE_EPS)


class _FusedOrthogonality(torch.autograd.Function):
    """½[Σ(C_ii-1)² + lam Σ_{i≠j} C_ij²] with C = zᵀz/B, without the D x D matrix when B < D.

    Forward saves z, the smaller of the two Gram matrices and diag(C); the backward is analytic:
        dL/dz = (2/B) z ⊙ ((1-lam) diag(C) - 1)  +  (2 lam / B²) (z zᵀ) z          (B < D)
        dL/dz = (2/B) z ⊙ (diag(C) - 1)           +  (2 lam / B) z C_offdiag       (B >= D)
    """

    @staticmethod
    def forward(ctx, z: Tensor, lam: float) -> Tensor:  # noqa: D401 - autograd signature
        with _no_autocast(z.device.type):
            b, d = z.shape
            diag = z.square().sum(dim=0) / b  # (D,) = diag(C)
            on = (diag - 1).square().sum()
            if b < d:
                gram = z @ z.T  # (B, B); ‖zᵀz‖_F = ‖z zᵀ‖_F
                off = gram.square().sum() / (b * b) - diag.square().sum()
            else:
                gram = (z.T @ z) / b  # (D, D) = C
                gram.diagonal().zero_()  # off-diagonal part, reused by the backward
                off = gram.square().sum()
            loss = 0.5 * (on + lam * off)
        ctx.save_for_backward(z, gram, diag)
        ctx.lam = lam
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, gram, diag = ctx.saved_tensors
        lam = ctx.lam
        b, d = z.shape
        with _no_autocast(z.device.type):
            if b < d:
                scale = (diag - 1) - lam * diag
                grad = (2.0 / b) * (z * scale) + (2.0 * lam / (b * b)) * (gram @ z)
            else:
                grad = (2.0 / b) * (z * (diag - 1)) + (2.0 * lam / b) * (z @ gram)
            grad = grad * grad_out
        return grad, None


def orthogonality_loss(z: Tensor, lam: float = DEFAULT_LAMBDA, standardize: bool = False) -> Tensor:
    """Fused M-FLAG orthogonality loss of ``z`` (B, D); returns a 0-dim fp32 tensor (float64 for float64 z).

    Equals :func:`orthogonality_loss_reference` (the original D x D formulation) in value and gradient;
    never forms the D x D matrix when B < D; runs in fp32 inside any autocast context.
    ``standardize=True`` standardizes each column of z over the batch first (the paper's wording,
    "correlation matrix"); the default uses raw second moments like the original code.

    Scope under DDP: pass ``gather_with_grad(z, world_size)`` for a *global* loss, or the local z.
      - local: C is estimated from the per-GPU batch; no communication, but since the off-diagonal
        term of E[C_ij²] carries a ~1/B bias, the loss value and its gradient change with the number
        of GPUs at a fixed global batch (and are noisier).
      - global: C is estimated from the whole global batch, so the loss is the same whatever the GPU
        count (equal to a single-process run on the concatenated batch); the price is one all_gather
        of B x D activations per step (B=256, D=1024 fp32: 1 MiB per rank) and its reduce-scatter in
        backward, and a (B·W)² Gram matrix (switching to D x D once B·W >= D).
    """
    if z.ndim != 2:
        raise ValueError(f"orthogonality_loss expects a (B, D) tensor, got shape {tuple(z.shape)}")
    if z.shape[0] < 1:
        raise ValueError("orthogonality_loss got an empty batch")
    dt = _loss_dtype(z)
    with _no_autocast(z.device.type):
        z = z.to(dt)
        if standardize:
            z = _standardize(z)
    return _FusedOrthogonality.apply(z, float(lam))


def orthogonality_loss_reference(z: Tensor, lam: float = DEFAULT_LAMBDA, standardize: bool = False) -> Tensor:
    """The original formulation: the D x D matrix C = zᵀz/B, its off-diagonal taken by indexing.

    Autograd backward; computed in the input dtype (use float64 for a reference). For tests and
    ``bench/orth_loss.py``.
    """
    if z.ndim != 2:
        raise ValueError(f"orthogonality_loss_reference expects a (B, D) tensor, got {tuple(z.shape)}")
    if standardize:
        z = _standardize(z)
    b, d = z.shape
    c = z.T @ z / b
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    # The original's off_diagonal(): a flattened view that drops the diagonal by indexing.
    off = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()
    off_diag = off.pow(2).sum()
    return 0.5 * (on_diag + lam * off_diag)


# --------------------------------------------------------------------------- distributed
def gather_with_grad(z: Tensor, world_size: int, group=None) -> Tensor:
    """All-gather ``z`` (B, D) from every rank into (world_size·B, D), keeping gradients.

    Rank order is preserved. With world_size 1 (or no process group) ``z`` is returned unchanged.
    The backward sums the gradients of every rank's copy onto its owner (reduce-scatter); together
    with DDP's gradient averaging, a loss computed identically on every rank from the gathered
    tensor gets exactly the gradient of that loss on the global batch.
    """
    if world_size <= 1:
        return z
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"gather_with_grad(world_size={world_size}) needs an initialised process group")
    actual = dist.get_world_size(group)
    if actual != world_size:
        raise ValueError(f"gather_with_grad: world_size={world_size} but the process group has {actual} ranks")
    import warnings

    with warnings.catch_warnings():
        # torch 2.9+ marks it deprecated in favour of a private API; it is the public autograd-aware
        # all_gather, still present in every torch this project admits (<= 2.14).
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(z.contiguous(), group=group) if group is not None else dist_fn.all_gather(
            z.contiguous())
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------- the loss terms
class Embeddings(NamedTuple):
    """What one training step's forward gives the loss terms: ResNet features zv (B, 2048), projected
    image embedding za (B, P) and projected text embedding zt (B, P)."""

    zv: Tensor
    za: Tensor
    zt: Tensor


def _default_weights() -> dict[str, float]:
    return {name: term.default_weight for name, term in LOSS_TERMS.items()}


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How the terms are computed and combined: ``weights`` (term name -> weight; a term left out has
    weight 0) and the terms' own options. train-vision builds it from its flat config
    (``TrainVisionConfig.loss_settings``)."""

    weights: Mapping[str, float] = dataclasses.field(default_factory=_default_weights)
    orth_lambda: float = DEFAULT_LAMBDA
    orth_standardize: bool = False
    orth_on: str = "zv"  # "zv" (ResNet features, the original) or "za" (projected image embedding)
    orth_global: bool = True  # gather z over ranks first
    world_size: int = 1

    def weight(self, name: str) -> float:
        return self.weights.get(name, 0.0)


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One pre-training loss term: ``fn(embeddings, settings) -> 0-dim fp32 tensor`` and the name of its
    weight option in ``TrainVisionConfig`` (a new term's: ``option(0.0, min=0, added_later=True)``, so
    the fingerprints of existing runs do not change; ``default_weight`` is that option's default, which
    the report assumes for runs whose config.json predates the option)."""

    fn: Callable[[Embeddings, LossSettings], Tensor]
    weight_option: str
    default_weight: float = 0.0
    always: bool = False  # computed and logged at weight 0 too (the ablations measure the unweighted term)
    wide: bool = False  # values span orders of magnitude: a symlog axis and 3 significant digits in the report
    on_option: str | None = None  # the option naming what the term is applied to (the report shows it)


def _align_term(e: Embeddings, s: LossSettings) -> Tensor:
    return alignment_loss(e.za, e.zt)


def _orth_term(e: Embeddings, s: LossSettings) -> Tensor:
    z = e.zv if s.orth_on == "zv" else e.za
    if s.orth_global and s.world_size > 1:
        z = gather_with_grad(z, s.world_size)
    return orthogonality_loss(z, lam=s.orth_lambda, standardize=s.orth_standardize)


# The one place a term is registered. Its name is its key in train_step's output, ``train/<name>`` in
# metrics.jsonl (``train/grad_<name>_trunk`` its gradient norm on the trunk) and its column in the report;
# the order is the order of the sum (align_weight x align + orth_weight x orth, as the original code).
LOSS_TERMS: dict[str, LossTerm] = {
    "align": LossTerm(_align_term, "align_weight", default_weight=1.0, always=True),
    "orth": LossTerm(_orth_term, "orth_weight", default_weight=1.0, always=True, wide=True,
                     on_option="orth_on"),
}


def active_terms(s: LossSettings) -> list[str]:
    """The names of the terms a step computes: those with a nonzero weight and those computed always."""
    return [name for name, term in LOSS_TERMS.items() if term.always or s.weight(name) != 0]


def compute_terms(e: Embeddings, s: LossSettings) -> dict[str, Tensor]:
    """``{name: unweighted value}`` of the active terms (:func:`active_terms`), in registry order."""
    return {name: LOSS_TERMS[name].fn(e, s) for name in active_terms(s)}


def weighted_total(values: Mapping[str, Tensor], s: LossSettings) -> Tensor:
    """``w_1 x t_1 + w_2 x t_2 + ...`` summed left to right from the first product (not from 0): the same
    floating-point operations as writing the expression out. Zero-weight terms that are computed stay
    in the sum, so a non-finite value of one still shows in the total."""
    total = None
    for name, value in values.items():
        part = s.weight(name) * value
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss term to sum: every weight is 0")
    return total
