"""Loading a ResNet50 image encoder from this tool's encoder.pt or a published baseline's checkpoint.

Layouts are told apart by their key prefixes (after stripping DataParallel/DDP ``module.`` and
torch.compile ``_orig_mod.``):
- ``torchvision``: plain torchvision resnet50 keys (``conv1.weight``, ``layer1.0.conv1.weight``, ...),
  which is also this tool's ``encoder.pt``;
- ``mflag-original``: the original M-FLAG code's model, ``encoder.*`` (plus ``proj_v``/``proj_t``/
  ``lm_model`` heads, dropped);
- ``mgca``: MGCA's Lightning checkpoint, ``img_encoder_q.model.*`` (``global_embed``/``local_embed``
  dropped);
- ``gloria``: GLoRIA's Lightning checkpoint, ``gloria.img_encoder.model.*``;
- ``convirt``: ConVIRT as MGCA's code trains and saves it (a Lightning checkpoint whose module holds
  ``img_encoder`` = MGCA's ImageEncoder): ``img_encoder.model.*`` (``global_embed``/``local_embed``
  and ``text_encoder.*`` dropped);
- ``mflag-checkpoint`` / ``mflag-vision``: this tool's training checkpoints (``vision.trunk.*`` under
  ``model``) and vision-model state_dicts (``trunk.*``).
Checkpoints may nest the weights under ``state_dict``, ``model`` or ``encoder`` (Lightning, common
trainers). Files may be torch zip or legacy files, plain pickles or ``.safetensors`` (train-vision
writes ``encoder.safetensors`` beside ``encoder.pt``); all are read by ``pipeline.safeload``, which
never runs code from a file: Lightning/OmegaConf hyper-parameters load as inert stubs, and a file
that would call anything outside its allow-list is refused. Weights with NaN or inf are refused too.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.common import MflagError, file_sha256
from pipeline.safeload import safe_load

log = logging.getLogger(__name__)

# (layout name, key prefix) tried in order; the first whose stripped keys cover the trunk wins.
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("gloria", "gloria.img_encoder.model."),
    ("mgca", "img_encoder_q.model."),
    ("convirt", "img_encoder.model."),  # MGCA's ConVIRT module: self.img_encoder = ImageEncoder(...)
    ("mflag-original", "encoder."),
    ("mflag-checkpoint", "vision.trunk."),  # train-vision's checkpoints/*.pt ("model" entry)
    ("mflag-vision", "trunk."),  # an MFlagVision state_dict
    ("torchvision", ""),
)
_NESTS = ("state_dict", "model", "model_state_dict", "network", "encoder")
# torchvision's ImageNet weights as the hub cache names them; V1 is what the field's baselines used.
IMAGENET_FILES = ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")


class CheckpointError(MflagError):
    """A checkpoint cannot be read as a ResNet50 encoder; the message names the file and keys."""


@functools.lru_cache(maxsize=1)
def _reference_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's resnet50 state_dict without fc.* (built once, no weights)."""
    from torchvision.models import resnet50

    return {k: tuple(v.shape) for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}


def _load_file(path: Path) -> Any:
    """Whatever ``path`` holds, read by the restricted loader (``pipeline.safeload``): nothing in the
    file is executed; a file that asks to run code is refused naming the global it wanted."""
    return safe_load(path, CheckpointError)


def _tensor_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state_dict inside ``obj`` (itself or nested under state_dict/model/...), else None."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            return None
        if obj and any(isinstance(v, torch.Tensor) for v in obj.values()) and \
                not any(k in obj and isinstance(obj[k], Mapping) for k in _NESTS):
            return obj
        nxt = next((obj[k] for k in _NESTS if isinstance(obj.get(k), Mapping)), None)
        if nxt is None:
            return None
        obj = nxt
    return None


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state.items():
        if not isinstance(k, str):
            continue  # not a parameter name (a crafted or foreign mapping)
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def extract_encoder_state(state: Mapping[str, torch.Tensor], source: str = "state_dict"
                          ) -> tuple[dict[str, torch.Tensor], str]:
    """(torchvision resnet50 state_dict without fc.*, layout name) from a raw state_dict.

    Strict: every trunk key must be present with the right shape (``num_batches_tracked`` may be absent
    in old checkpoints and is filled with 0); an unknown layout lists the first keys.
    """
    ref = _reference_shapes()
    flat = _strip_wrappers(state)
    for layout, prefix in LAYOUTS:
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        trunk = {k: v for k, v in sub.items() if k in ref}
        required = {k for k in ref if not k.endswith("num_batches_tracked")}
        if not required <= set(trunk):
            if layout != "torchvision" and len(trunk) >= len(required) // 2:
                missing = sorted(required - set(trunk))
                raise CheckpointError(f"{source}: {layout} layout ({prefix}*) is missing {len(missing)} ResNet50 "
                                      f"key(s), e.g. {missing[:5]}")
            continue
        extra = sorted(k for k in sub if k not in ref and not k.startswith("fc."))
        if extra and layout == "torchvision":
            raise CheckpointError(f"{source}: plain torchvision layout has unexpected key(s) {extra[:5]}; "
                                  f"not a ResNet50 state_dict")
        if extra:
            # Anything under the trunk prefix that resnet50 lacks means a different architecture.
            raise CheckpointError(f"{source}: {layout} layout has key(s) under {prefix!r} that ResNet50 lacks: "
                                  f"{extra[:5]}")
        for k, v in trunk.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{source}: {prefix}{k} is a {type(v).__name__}, not a tensor")
            if tuple(v.shape) != ref[k]:
                raise CheckpointError(f"{source}: {prefix}{k} has shape {tuple(v.shape)}, ResNet50 expects {ref[k]}")
        # NaN/inf weights (a diverged run, a damaged file) would only surface later as a crash deep in a
        # downstream solver or as NaN metrics; refuse them here, naming the tensors.
        bad = [f"{prefix}{k}" for k, v in trunk.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf, e.g. {bad[:3]}; the "
                                  f"checkpoint comes from a diverged run or is damaged")
        out = {k: trunk[k].detach().clone() if k in trunk else torch.tensor(0, dtype=torch.long) for k in ref}
        return out, layout
    first = list(flat)[:10]
    raise CheckpointError(f"{source}: unknown checkpoint layout; expected torchvision ResNet50 keys, optionally under "
                          f"{', '.join(p for _, p in LAYOUTS if p)}; first keys: {first}")


def load_encoder_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load ``path`` and return (torchvision resnet50 state_dict without fc.*, layout name)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    obj = _load_file(path)
    state = _tensor_dict(obj)
    if state is None:
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no state_dict found (top level: {keys})")
    return extract_encoder_state(state, source=str(path))


def _resnet50_trunk() -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Identity()
    return model


def imagenet_weights_path() -> Path | None:
    """The torchvision ImageNet resnet50 weights in the local torch hub cache, if present."""
    d = Path(torch.hub.get_dir()) / "checkpoints"
    return next((d / f for f in IMAGENET_FILES if (d / f).is_file()), None)


def load_encoder(init: str) -> tuple[nn.Module, dict]:
    """(ResNet50 trunk with fc = Identity, info) for ``init`` = random | imagenet | PATH.

    ``info``: {"init", "layout", "path", "sha256"} for results.json. ImageNet weights are read from the
    local torch hub cache only (no download); their absence is a MflagError naming the expected path.
    """
    if init == "random":
        return _resnet50_trunk(), {"init": "random", "layout": None, "path": None, "sha256": None}
    if init == "imagenet":
        path = imagenet_weights_path()
        if path is None:
            expected = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[0]
            raise MflagError(
                f"--init imagenet: ImageNet ResNet50 weights not found at {expected}. This tool never downloads "
                f"at run time; on a machine with network access run once `python -c \"import torchvision; "
                f"torchvision.models.resnet50(weights='IMAGENET1K_V1')\"` (it fills the torch hub cache; "
                f"TORCH_HOME moves it) and copy {IMAGENET_FILES[0]} to {expected}, or pass a weights file as "
                f"--init PATH.")
    else:
        path = Path(init).expanduser()
    state, layout = load_encoder_state(path)
    model = _resnet50_trunk()
    model.load_state_dict(state, strict=True)
    return model, {"init": init if init == "imagenet" else str(path), "layout": layout, "path": str(path),
                   "sha256": file_sha256(path)}


def build_encoder(init: str) -> nn.Module:
    """ResNet50 trunk (torchvision, fc = Identity, 2048-d output) initialised from random|imagenet|PATH."""
    return load_encoder(init)[0]
