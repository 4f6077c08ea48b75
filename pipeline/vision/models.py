"""M-FLAG vision model: torchvision ResNet50 trunk, the original projector MLP, an optional text head.

Text never enters this module as text: report embeddings arrive as (B, D) tensors from the cache, so
nothing here imports transformers.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from torch import Tensor

from pipeline.common import ConfigError, atomic_path
from pipeline.safeload import torch_save
from pipeline.vision.checkpoints import load_encoder

__all__ = [
    "TRUNK_DIM",
    "build_resnet50_trunk",
    "Projector",
    "MFlagVision",
    "count_parameters",
    "encoder_state_dict",
    "unwrap_model",
]

TRUNK_DIM = 2048


def build_resnet50_trunk(init: str = "random") -> nn.Module:
    """torchvision ResNet50 with ``fc = Identity``: (B, 3, H, W) -> (B, 2048).

    ``init``: "random"; "imagenet" (torchvision's IMAGENET1K_V1 weights, read from the local torch hub
    cache only, never downloaded here); or a checkpoint path in any layout ``pipeline.vision.checkpoints``
    recognises (this tool's encoder.pt or training checkpoint, the original M-FLAG code, MGCA, GLoRIA,
    a plain torchvision state_dict). One loader serves pre-training and downstream evaluation.
    """
    if init not in ("random", "imagenet") and not Path(init).expanduser().exists():
        raise ConfigError(f"init: expected 'random', 'imagenet' or a checkpoint file; {init!r} is neither")
    return load_encoder(init)[0]


class Projector(nn.Sequential):
    """The original projector: Linear(in, hidden)-BN-ReLU-Linear(hidden, out)-BN(affine=False).

    (B, in_dim) -> (B, out_dim). Needs B >= 2 in training mode (BatchNorm).
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 2048):
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
            nn.BatchNorm1d(out_dim, affine=False),
        )
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden


class MFlagVision(nn.Module):
    """ResNet50 trunk + image projector (+ text head) trained against frozen, cached text embeddings.

    ``text_dim``: D of the cache. ``text_head``: "mlp" (the original: a Projector from D to P, default
    P=1024) or "none" (images projected straight into the frozen text space; P must equal D).
    ``forward(images (B,3,H,W)) -> (zv (B,2048), za (B,P))``; ``project_text(t (B,D)) -> zt (B,P)``.
    """

    def __init__(self, text_dim: int, proj_dim: int | None = None, text_head: str = "mlp",
                 init: str = "random", hidden: int = 2048, trunk: nn.Module | None = None):
        super().__init__()
        if text_dim < 1:
            raise ConfigError(f"text_dim: must be positive, got {text_dim}")
        if text_head not in ("mlp", "none"):
            raise ConfigError(f"text_head: expected 'mlp' or 'none', got {text_head!r}")
        if text_head == "none":
            if proj_dim is not None and proj_dim != text_dim:
                raise ConfigError(f"proj_dim: with text_head 'none' images are projected into the text space, "
                                  f"so proj_dim must equal the cache dimension {text_dim}, got {proj_dim}")
            proj_dim = text_dim
        elif proj_dim is None:
            proj_dim = 1024
        if proj_dim < 1:
            raise ConfigError(f"proj_dim: must be positive, got {proj_dim}")
        self.text_dim, self.proj_dim, self.text_head_kind = text_dim, proj_dim, text_head
        self.trunk = trunk if trunk is not None else build_resnet50_trunk(init)
        self.projector = Projector(TRUNK_DIM, proj_dim, hidden)
        self.text_head = Projector(text_dim, proj_dim, hidden) if text_head == "mlp" else nn.Identity()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        zv = self.trunk(images)  # (B, 2048)
        return zv, self.projector(zv)  # (B, P)

    def project_text(self, t: Tensor) -> Tensor:
        if t.ndim != 2 or t.shape[1] != self.text_dim:
            raise ValueError(f"project_text expects (B, {self.text_dim}) embeddings, got {tuple(t.shape)}")
        return self.text_head(t)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``module`` (only those with requires_grad when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def encoder_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Plain torchvision ResNet50 state_dict without ``fc.*`` (CPU tensors) from an MFlagVision or a trunk.

    ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports only ``fc.*`` missing.
    """
    model = unwrap_model(model)
    trunk = unwrap_model(model.trunk) if isinstance(model, MFlagVision) else model
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trunk.state_dict().items()
            if not k.startswith("fc.")}


def save_encoder_files(out: Path, vision: nn.Module, text_head_kind: str, text_dim: int, hidden_dim: int) -> None:
    """train-vision's outputs for downstream use, each written atomically: ``encoder.pt`` (the trunk as a
    torchvision resnet50 state_dict without ``fc.*``), the same as ``encoder.safetensors``, and
    ``projector.pt`` (projector and text head with the dimensions that rebuild them)."""
    from safetensors.torch import save_file  # only a finished run needs safetensors

    encoder = encoder_state_dict(vision)
    torch_save(encoder, out / "encoder.pt")
    # The same weights as safetensors: loadable anywhere without unpickling anything.
    with atomic_path(out / "encoder.safetensors") as tmp:
        # One metadata key: safetensors writes several in a per-process random (hash) order, and the
        # file's bytes must depend on the tensors alone (eval hashes encoder files).
        save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp), metadata={"format": "pt"})
    proj = {"projector": {k: v.cpu() for k, v in vision.projector.state_dict().items()},
            "text_head": {k: v.cpu() for k, v in vision.text_head.state_dict().items()},
            "text_head_kind": text_head_kind, "text_dim": text_dim,
            "proj_dim": vision.proj_dim, "hidden_dim": hidden_dim}
    torch_save(proj, out / "projector.pt")
