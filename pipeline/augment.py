"""Image augmentation as ONE projective warp of the single grey channel, on CPU or batched on GPU.

The paper code's recipe is RandomCrop(224) -> RandomRotation((0, 90)) -> RandomPerspective(0.5, p=0.5)
-> RandomAutocontrast(p=0.5) -> ToTensor -> Normalize(0.5, 0.5), run on an RGB copy of a grey image:
three resamplings of three identical channels. Crop, rotation and perspective are all projective maps,
so here they are composed into one 3 x 3 homography per image and applied once (bilinear, zero fill)
to the one grey channel; the 3-channel input the ResNet expects is a stride-0 view made at the end.

Coordinates: continuous pixel coordinates with pixel centres at ``index + 0.5`` (PIL's and
torchvision's convention). A homography maps an OUTPUT point to the INPUT point it samples.

Recipes:
  - "original": the paper code's distribution (integer crop offset in [0, in-out], angle ~ U[0, 90]
    degrees counter-clockwise about the crop centre, torchvision's perspective corners with
    distortion 0.5 applied with p 0.5, autocontrast p 0.5). As in the original, the crop window and
    the perspective's 224 x 224 frame are zero-filled beyond their borders (the black corners of a
    rotated crop), and the interpolation is the original's: NEAREST when only rotating (torchvision
    RandomRotation's default), bilinear when the perspective is applied. The augmenters crop by
    slicing and resample once; ``warp_batch`` with the full homography and ``bounds`` gives the same
    geometry (bilinear) for arbitrary use. Intermediate uint8 rounding of the original is not kept.
  - "light": angle ~ U[-10, 10], zoom ~ U[0.9, 1.1], continuous translation within the crop margin,
    no perspective, autocontrast p 0.5.
  - "none": centre crop, no photometric change.
All recipes end with Normalize(mean 0.5, std 0.5).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RECIPES",
    "sample_params",
    "warp_batch",
    "autocontrast_batch",
    "normalize",
    "to_three_channels",
    "decode_grey",
    "augment_one",
    "Augmenter",
    "SampleAugmenter",
    "original_recipe_torchvision",
]

RECIPES = ("original", "light", "none")
MEAN, STD = 0.5, 0.5
_ORIG_MAX_ANGLE = 90.0
_ORIG_DISTORTION = 0.5
_ORIG_PERSPECTIVE_P = 0.5
_AUTOCONTRAST_P = 0.5
_LIGHT_MAX_ANGLE = 10.0
_LIGHT_ZOOM = (0.9, 1.1)


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"augmentation recipe must be one of {RECIPES}, got {recipe!r}")


# --------------------------------------------------------------------------- parameters
# Parameters are computed in numpy float64 from ONE torch.rand draw per batch: a torch generator
# keeps the stream seedable and checkpointable, while numpy's per-call overhead is ~10x lower than
# torch's for the tiny (B, 3, 3) arithmetic, which matters for per-sample use in DataLoader workers.
_N_UNIFORMS = 16


def _translation(tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    h = np.tile(np.eye(3), (len(tx), 1, 1))
    h[:, 0, 2], h[:, 1, 2] = tx, ty
    return h


def _rotation_matrices(angle_deg: np.ndarray, cx: float, cy: float, zoom: np.ndarray | None = None) -> np.ndarray:
    """Output->input maps (B,3,3) of a counter-clockwise rotation (y down, as displayed) about (cx, cy).

    ``zoom`` > 1 magnifies (the output samples a smaller input window).
    """
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    inv_zoom = 1.0 / np.asarray(zoom, dtype=np.float64) if zoom is not None else np.ones_like(a)
    cos, sin = np.cos(a) * inv_zoom, np.sin(a) * inv_zoom
    h = np.tile(np.eye(3), (len(a), 1, 1))
    h[:, 0, 0], h[:, 0, 1], h[:, 1, 0], h[:, 1, 1] = cos, -sin, sin, cos
    # x_in - c = M (x_out - c)  =>  translation c - M c
    h[:, 0, 2] = cx - (cos * cx - sin * cy)
    h[:, 1, 2] = cy - (sin * cx + cos * cy)
    return h


def _rotation_about(angle_deg: Tensor, cx: float, cy: float, zoom: Tensor | None = None) -> Tensor:
    """Tensor form of :func:`_rotation_matrices` (float64)."""
    z = zoom.numpy() if zoom is not None else None
    return torch.from_numpy(_rotation_matrices(angle_deg.double().numpy(), cx, cy, z))


def _perspective_matrices(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(B,4,2) startpoints and endpoints -> (B,3,3) maps taking endpoints to startpoints.

    The same linear system as torchvision's ``_get_perspective_coeffs`` (output corner -> input
    corner), solved batched in float64.
    """
    b = start.shape[0]
    x, y = end[..., 0], end[..., 1]  # (B, 4)
    u, v = start[..., 0], start[..., 1]
    zeros, ones = np.zeros_like(x), np.ones_like(x)
    rows_u = np.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], axis=-1)  # (B, 4, 8)
    rows_v = np.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], axis=-1)
    a = np.stack([rows_u, rows_v], axis=2).reshape(b, 8, 8)
    rhs = np.stack([u, v], axis=-1).reshape(b, 8, 1)
    coeffs = np.linalg.solve(a, rhs)[..., 0]  # (B, 8)
    return np.concatenate([coeffs, np.ones((b, 1))], axis=1).reshape(b, 3, 3)


def _perspective_from_corners(start: Tensor, end: Tensor) -> Tensor:
    """Tensor form of :func:`_perspective_matrices` (float64)."""
    return torch.from_numpy(_perspective_matrices(start.double().numpy(), end.double().numpy()))


def _randint(u: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Uniform integers in [lo, hi) (torch.randint's range) from uniforms in [0, 1), as float64."""
    return np.minimum(lo + np.floor(u * (hi - lo)), hi - 1)


def _components_np(batch_size: int, generator: torch.Generator, recipe: str, in_size: int,
                   out_size: int) -> dict[str, np.ndarray]:
    _check_recipe(recipe)
    if out_size > in_size:
        raise ValueError(f"augmentation output size {out_size} is larger than the input size {in_size}")
    n = batch_size
    u = torch.rand((n, _N_UNIFORMS), generator=generator, dtype=torch.float64).numpy()
    margin = in_size - out_size
    corners = np.array([[0, 0], [out_size - 1, 0], [out_size - 1, out_size - 1], [0, out_size - 1]], np.float64)
    comp = {
        "zoom": np.ones(n),
        "perspective": np.zeros(n, dtype=bool),
        "startpoints": np.broadcast_to(corners, (n, 4, 2)).copy(),
        "endpoints": np.broadcast_to(corners, (n, 4, 2)).copy(),
        "autocontrast": np.zeros(n, dtype=bool),
    }
    if recipe == "none":
        off = float(int(round(margin / 2.0)))  # torchvision's center_crop rounding
        comp.update(top=np.full(n, off), left=np.full(n, off), angle=np.zeros(n))
        return comp
    comp["autocontrast"] = u[:, 0] < _AUTOCONTRAST_P
    if recipe == "original":
        comp["top"], comp["left"] = _randint(u[:, 1], 0, margin + 1), _randint(u[:, 2], 0, margin + 1)
        comp["angle"] = u[:, 3] * _ORIG_MAX_ANGLE
        comp["perspective"] = u[:, 4] < _ORIG_PERSPECTIVE_P
        # torchvision's RandomPerspective.get_params: each corner moves inward by up to d pixels.
        d = int(_ORIG_DISTORTION * (out_size // 2))
        near = (0, d + 1)
        far = (out_size - d - 1, out_size)
        ranges = [(near, near), (far, near), (far, far), (near, far)]  # TL, TR, BR, BL as (x, y)
        end = np.empty((n, 4, 2))
        for k, (rx, ry) in enumerate(ranges):
            end[:, k, 0] = _randint(u[:, 5 + 2 * k], *rx)
            end[:, k, 1] = _randint(u[:, 6 + 2 * k], *ry)
        comp["endpoints"] = np.where(comp["perspective"][:, None, None], end, comp["startpoints"])
    else:  # light
        comp["top"], comp["left"] = u[:, 1] * margin, u[:, 2] * margin
        comp["angle"] = (u[:, 3] * 2 - 1) * _LIGHT_MAX_ANGLE
        lo, hi = _LIGHT_ZOOM
        comp["zoom"] = lo + u[:, 4] * (hi - lo)
    return comp


def _sample_components(batch_size: int, generator: torch.Generator, recipe: str, in_size: int,
                       out_size: int) -> dict[str, Tensor]:
    """The raw parameters of ``recipe`` (crop offset, angle, zoom, perspective corners, flags) as tensors."""
    return {k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in _components_np(batch_size, generator, recipe, in_size, out_size).items()}


@dataclasses.dataclass
class _Draw:
    """Parameters of a batch in the forms the warps need (all CPU; maps are output -> somewhere)."""

    hmat: Tensor  # (B,3,3) output -> input image
    local: Tensor  # (B,3,3) output -> window frame (rotation ∘ perspective); == hmat when no window
    window: Tensor | None  # (B,2) int64 (top, left) of the out x out crop window, None when no window
    persp: Tensor  # (B,3,3) output -> rotated-crop frame (identity where no perspective)
    has_persp: Tensor  # (B,) bool
    autocontrast: Tensor  # (B,) bool

    def warp(self, images: Tensor, out_size: int, recipe: str, index: slice = slice(None)) -> Tensor:
        """Warp (b,1,S,S) images with the draws at ``index``: raw float (b,1,out,out) in the input's scale.

        The crop is a slice (no resampling); the one resampling is rotation ∘ perspective of the crop,
        zero outside it, like the original's zero-filled intermediates. For "original" the
        interpolation is the original's: nearest where it only rotates (RandomRotation's default),
        bilinear where perspective is applied; other recipes are bilinear.
        """
        local, persp, has_persp = self.local[index], self.persp[index], self.has_persp[index]
        win = self.window[index].tolist() if self.window is not None else None
        if recipe != "original" or bool(has_persp.all()) or not bool(has_persp.any()):
            return self._warp_group(images, local, persp, has_persp, win, out_size, recipe)
        # Mixed interpolation: warp each group on its own (cheaper than selecting from full grids).
        out = None
        for sel in (has_persp, ~has_persp):
            idx = sel.nonzero().flatten()
            part = self._warp_group(images.index_select(0, idx.to(images.device)), local[idx], persp[idx],
                                    has_persp[idx], [win[i] for i in idx.tolist()] if win else None,
                                    out_size, recipe)
            if out is None:
                out = part.new_empty((images.shape[0],) + tuple(part.shape[1:]))
            out.index_copy_(0, idx.to(out.device), part)
        return out

    @staticmethod
    def _warp_group(images: Tensor, local: Tensor, persp: Tensor, has_persp: Tensor, win: list | None,
                    out_size: int, recipe: str) -> Tensor:
        if win is not None:
            if len(win) == 1:  # a view, no copy
                (top, left), = win
                images = images[..., top:top + out_size, left:left + out_size]
            else:
                images = torch.stack([img[..., t:t + out_size, l:l + out_size] for img, (t, l) in zip(images, win)])
        any_persp = bool(has_persp.any())
        bounds = persp[:, None] if any_persp else None
        bilinear = any_persp if recipe == "original" else True
        return _warp_raw(images, local, out_size, bounds, bilinear)

    def bounds(self, recipe: str) -> Tensor | None:
        """Stage maps that must land in [0, out]² (the original's zero-filled 224 x 224 intermediates)."""
        if recipe != "original":
            return None
        return torch.stack([self.persp, self.local], dim=1)


def _draw(batch_size: int, generator: torch.Generator, recipe: str, in_size: int, out_size: int) -> _Draw:
    return _draw_from(_components_np(batch_size, generator, recipe, in_size, out_size), recipe, out_size)


def _draw_from(comp: dict, recipe: str, out_size: int) -> _Draw:
    """Compose raw parameters (numpy arrays or tensors): crop ∘ rotation(+zoom) ∘ perspective."""
    comp = {k: v.numpy() if isinstance(v, Tensor) else v for k, v in comp.items()}
    n = len(comp["angle"])
    c = out_size / 2.0
    rot = _rotation_matrices(comp["angle"], c, c, comp["zoom"])
    persp = np.tile(np.eye(3), (n, 1, 1))
    has_persp = comp["perspective"]
    if has_persp.any():
        persp[has_persp] = _perspective_matrices(comp["startpoints"][has_persp], comp["endpoints"][has_persp])
    local = rot @ persp
    hmat = _translation(comp["left"], comp["top"]) @ local
    # The light recipe samples beyond its (continuous, zoomed) window, so it has no crop window.
    window = None if recipe == "light" else torch.from_numpy(np.stack([comp["top"], comp["left"]], 1).astype(np.int64))
    hmat_t = torch.from_numpy(hmat)
    return _Draw(hmat=hmat_t, local=hmat_t if window is None else torch.from_numpy(local), window=window,
                 persp=torch.from_numpy(persp), has_persp=torch.from_numpy(has_persp.copy()),
                 autocontrast=torch.from_numpy(np.asarray(comp["autocontrast"]).copy()))


def sample_params(batch_size: int, generator: torch.Generator, recipe: str = "original", in_size: int = 256,
                  out_size: int = 224, with_bounds: bool = False):
    """Draw ``batch_size`` augmentations of ``recipe`` from ``generator`` (a CPU torch.Generator).

    Returns ``(homographies (B,3,3) float64, autocontrast flags (B,) bool)``, all on the CPU; each
    homography composes crop, rotation and perspective and maps an output pixel coordinate of the
    out_size result to the in_size input image. ``with_bounds=True`` adds a third item for
    ``warp_batch(bounds=...)``: (B,2,3,3) stage maps for "original" (None otherwise) that reproduce
    its black corners. The same generator state gives the same parameters.
    """
    d = _draw(batch_size, generator, recipe, in_size, out_size)
    if with_bounds:
        return d.hmat, d.autocontrast, d.bounds(recipe)
    return d.hmat, d.autocontrast


# --------------------------------------------------------------------------- image ops
_CENTRES: dict[tuple[int, str], Tensor] = {}


def _pixel_centres(n: int, device: torch.device) -> Tensor:
    key = (n, str(device))
    r = _CENTRES.get(key)
    if r is None:
        r = _CENTRES[key] = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    return r


def _is_identity(maps: Tensor) -> bool:
    return bool((maps == torch.eye(3, dtype=maps.dtype, device=maps.device)).all())


def _coords(maps: Tensor, out_size: int, device: torch.device) -> Tensor:
    """Map the output pixel centres by (B,3,3) maps: (B, 2, out, out) float32 planes of x and y.

    Each plane is one broadcast sum of a row term and a column term (plus a division when
    projective). Contiguous planes vectorise; an interleaved (..., 2) layout or an (out², 3) matmul
    is ~20x slower on CPU. ``planes.permute(0, 2, 3, 1)`` is the grid_sample layout, no copy needed.
    """
    affine = bool((maps[:, 2, :2] == 0).all()) and bool((maps[:, 2, 2] == 1).all())
    m = maps.to(device=device, dtype=torch.float32)
    b = m.shape[0]
    r = _pixel_centres(out_size, device)
    u, v = r.view(1, 1, 1, -1), r.view(1, 1, -1, 1)
    rows = 2 if affine else 3
    terms_u = u * m[:, :rows, 0].view(b, rows, 1, 1)  # (B, rows, 1, out)
    terms_v = v * m[:, :rows, 1].view(b, rows, 1, 1) + m[:, :rows, 2].view(b, rows, 1, 1)  # (B, rows, out, 1)
    planes = terms_u + terms_v  # (B, rows, out, out)
    if affine:
        return planes
    return planes[:, :2].div_(planes[:, 2:])


def _warp_raw(images: Tensor, homographies: Tensor, out_size: int, bounds: Tensor | None,
              bilinear: bool | Tensor = True) -> Tensor:
    """warp_batch without the uint8 rescale: values keep the input's scale (0..255 for uint8).

    ``bilinear``: True/False for the whole batch, or a (B,) bool tensor (False = nearest) per image.
    """
    if images.ndim != 4:
        raise ValueError(f"warp_batch expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if homographies.shape != (b, 3, 3):
        raise ValueError(f"warp_batch: {b} images but homographies of shape {tuple(homographies.shape)}")
    x = images if images.is_floating_point() else images.float()
    homographies = homographies.detach().to("cpu", torch.float64)
    if bounds is not None:
        bounds = bounds.detach().to("cpu", torch.float64)
        # Identity stages cannot send an output pixel outside the output frame: skip them.
        keep = [k for k in range(bounds.shape[1]) if not _is_identity(bounds[:, k])]
        bounds = bounds[:, keep] if keep else None
    if bounds is None and h == w == out_size and _is_identity(homographies):
        return x.clone() if x is images else x  # exact, and no resampling pass
    # Fold continuous pixel coordinates -> grid_sample's [-1, 1] (align_corners=False) into the map.
    to_unit = torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    planes = _coords(to_unit @ homographies, out_size, x.device)  # (B, 2, out, out)
    if bounds is not None:
        # Stage coordinates scaled to [-1, 1] over the out x out frame: outside when |q| > 1.
        to_frame = torch.tensor([[2.0 / out_size, 0.0, -1.0], [0.0, 2.0 / out_size, -1.0], [0.0, 0.0, 1.0]],
                                dtype=torch.float64)
        outside = None
        for k in range(bounds.shape[1]):
            q = _coords(to_frame @ bounds[:, k], out_size, x.device).abs_()
            q = torch.maximum(q[:, 0], q[:, 1])
            outside = q if outside is None else torch.maximum(outside, q)
        # Far outside [-1, 1]: grid_sample's zero padding blacks these pixels without another pass.
        planes.masked_fill_((outside > 1.0).unsqueeze(1), -4.0)
    grid = planes.to(x.dtype).permute(0, 2, 3, 1)  # (B, out, out, 2), a view
    if isinstance(bilinear, Tensor):
        if bool(bilinear.all()) or not bool(bilinear.any()):
            bilinear = bool(bilinear.all())
        else:
            out = x.new_empty((b, x.shape[1], out_size, out_size))
            for mode, sel in (("bilinear", bilinear), ("nearest", ~bilinear)):
                idx = sel.nonzero().flatten().to(x.device)
                out.index_copy_(0, idx, F.grid_sample(x.index_select(0, idx), grid.index_select(0, idx), mode=mode,
                                                      padding_mode="zeros", align_corners=False))
            return out
    return F.grid_sample(x, grid, mode="bilinear" if bilinear else "nearest", padding_mode="zeros",
                         align_corners=False)


def warp_batch(images: Tensor, homographies: Tensor, out_size: int = 224, bounds: Tensor | None = None) -> Tensor:
    """Warp (B,1,H,W) images by output->input homographies (B,3,3) into float (B,1,out,out).

    uint8 input gives values in [0, 1] (like ToTensor); float input keeps its scale. Bilinear, zero
    outside the image (torchvision's fill 0). ``bounds`` (B,K,3,3), optional: output pixels that any
    of these maps sends outside [0, out]² are zero too. Runs on the images' device (CPU or CUDA).
    """
    out = _warp_raw(images, homographies, out_size, bounds)
    return out.div_(255.0) if images.dtype == torch.uint8 else out


def autocontrast_batch(x: Tensor, flags: Tensor | None = None, bound: float = 1.0) -> Tensor:
    """Per-image, per-channel min/max stretch to [0, bound] of float (B,C,H,W), where ``flags`` (B,) is True.

    Constant images are left unchanged (torchvision's rule). Returns a new tensor.
    """
    mn = x.amin(dim=(-2, -1), keepdim=True)
    mx = x.amax(dim=(-2, -1), keepdim=True)
    span = mx - mn
    flat = span <= 0
    scale = torch.where(flat, torch.ones_like(span), bound / torch.where(flat, torch.ones_like(span), span))
    mn = torch.where(flat, torch.zeros_like(mn), mn)
    if flags is not None:
        on = flags.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.ndim - 1)))
        scale = torch.where(on, scale, torch.ones_like(scale))
        mn = torch.where(on, mn, torch.zeros_like(mn))
    return ((x - mn) * scale).clamp_(0, bound)


def normalize(x: Tensor, mean: float = MEAN, std: float = STD) -> Tensor:
    """(x - mean) / std, a new tensor (the original's Normalize(0.5, 0.5) maps [0, 1] to [-1, 1])."""
    return (x - mean) / std


def to_three_channels(x: Tensor) -> Tensor:
    """(B,1,H,W) or (1,H,W) -> the same storage viewed with 3 channels (stride 0, no copy)."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.ndim == 3 and x.shape[0] == 1:
        return x.expand(3, -1, -1)
    raise ValueError(f"to_three_channels expects one channel, (B,1,H,W) or (1,H,W); got {tuple(x.shape)}")


def decode_grey(data: bytes) -> Tensor:
    """PNG or JPEG bytes -> (1, H, W) uint8 tensor of the grey image (Pillow; colour is converted to L)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            im = im.convert("L")
        arr = np.asarray(im)
    return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)[None]


def _finish(raw: Tensor, flags: Tensor, value_max: float) -> Tensor:
    """autocontrast (where flagged) + ToTensor scaling + normalize, fused into one in-place affine pass.

    ``raw``: warped (B,1,H,W) float in [0, value_max]. The min/max stretch already lands in [0, 1],
    so no clamp is needed and the three steps collapse to raw * a + b per image.
    """
    b = raw.shape[0]
    a = torch.full((b, 1, 1, 1), 1.0 / (value_max * STD), device=raw.device)
    off = torch.full((b, 1, 1, 1), -MEAN / STD, device=raw.device)
    on = flags.to(raw.device).view(b, 1, 1, 1)
    if bool(flags.any()):
        mn = raw.amin(dim=(-2, -1), keepdim=True)
        span = raw.amax(dim=(-2, -1), keepdim=True) - mn
        on = on & (span > 0)  # constant images stay unchanged, as in torchvision
        span = torch.where(on, span, torch.ones_like(span))
        a = torch.where(on, 1.0 / (span * STD), a)
        off = torch.where(on, -mn / (span * STD) - MEAN / STD, off)
    return raw.mul_(a).add_(off)


def _as_batch(images: Tensor | np.ndarray) -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (B,1,H,W) or (B,H,W), got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images, got {tuple(images.shape[-2:])}")
    return images


def _value_max(images: Tensor) -> float:
    return 255.0 if images.dtype == torch.uint8 else 1.0


# --------------------------------------------------------------------------- augmenters
def augment_one(image: Tensor | np.ndarray, generator: torch.Generator, recipe: str = "original",
                out_size: int = 224) -> Tensor:
    """One grey image (uint8 (H,W) array or (1,H,W)/(H,W) tensor) -> normalized float (1,out,out).

    Parameters come from ``generator`` (seed it per sample for augmentation that a resumed run
    repeats exactly). The fast per-sample path: crop by slicing, one resampling, fused
    autocontrast + normalize. Collate, then :func:`to_three_channels`.
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if image.ndim == 2:
        image = image.unsqueeze(0)
    batch = _as_batch(image.unsqueeze(0))  # (1, 1, S, S)
    d = _draw(1, generator, recipe, batch.shape[-1], out_size)
    return _finish(d.warp(batch, out_size, recipe), d.autocontrast, _value_max(batch))[0]


class Augmenter:
    """Batched augmentation: uint8 (B,1,S,S) or (B,S,S) -> normalized float (B,3,out,out) on ``device``.

    Float input is taken to be in [0, 1]. The 3-channel result is a stride-0 view of one channel.
    Parameters come from a CPU generator seeded with ``seed``; ``state_dict``/``load_state_dict``
    carry it across checkpoints. ``device="cuda"`` moves the uint8 batch to the GPU and warps it
    there, so CPU workers only decode.
    """

    def __init__(self, recipe: str = "original", device: str | torch.device = "cpu", seed: int = 0,
                 out_size: int = 224):
        _check_recipe(recipe)
        self.recipe, self.device, self.out_size = recipe, torch.device(device), out_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        images = _as_batch(images)
        d = _draw(images.shape[0], self.generator, self.recipe, images.shape[-1], self.out_size)
        images = images.to(self.device, non_blocking=True)
        raw = d.warp(images, self.out_size, self.recipe)
        return to_three_channels(_finish(raw, d.autocontrast, _value_max(images)))

    def state_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("recipe") != self.recipe:
            raise ValueError(f"augmenter state is for recipe {state.get('recipe')!r}, not {self.recipe!r}")
        self.generator.set_state(state["generator"])


class SampleAugmenter:
    """Per-sample CPU augmentation for DataLoader workers: one grey image -> normalized float (1,out,out).

    Accepts a uint8 (H,W) numpy array or a (1,H,W)/(H,W) tensor (float taken to be in [0, 1]).
    Collate the results, then call :func:`to_three_channels` on the batch. Same distribution and warp
    code as :class:`Augmenter`; the crop is a slice, so only rotation/perspective are resampled.
    Parameters are drawn ``block`` at a time (one set of small tensor ops per block, not per image).
    Inside a worker the generator is seeded from ``seed`` and the worker's seed (which DataLoader
    derives from the main process RNG), so workers draw different, reproducible streams. Picklable.
    """

    def __init__(self, recipe: str = "original", seed: int = 0, out_size: int = 224, block: int = 64):
        _check_recipe(recipe)
        self.recipe, self.seed, self.out_size, self.block = recipe, seed, out_size, block
        self._reset()

    def _reset(self) -> None:
        self._generator: torch.Generator | None = None
        self._worker_seed: int | None = None
        self._draws: _Draw | None = None
        self._next = 0
        self._in_size = -1

    def _params(self, in_size: int) -> tuple[_Draw, int]:
        info = torch.utils.data.get_worker_info()
        worker_seed = info.seed if info is not None else 0
        if self._generator is None or worker_seed != self._worker_seed:
            self._generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + worker_seed) % (2 ** 63))
            self._worker_seed, self._draws = worker_seed, None
        if self._draws is None or self._next >= self.block or in_size != self._in_size:
            self._draws = _draw(self.block, self._generator, self.recipe, in_size, self.out_size)
            self._next, self._in_size = 0, in_size
        i = self._next
        self._next += 1
        return self._draws, i

    def __call__(self, image: Tensor | np.ndarray) -> Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 2:
            image = image.unsqueeze(0)
        batch = _as_batch(image.unsqueeze(0))  # (1, 1, S, S)
        d, i = self._params(batch.shape[-1])
        raw = d.warp(batch, self.out_size, self.recipe, slice(i, i + 1))
        return _finish(raw, d.autocontrast[i:i + 1], _value_max(batch))[0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # torch.Generator does not pickle; each worker re-seeds its own from seed + worker seed.
        state.update(_generator=None, _worker_seed=None, _draws=None, _next=0, _in_size=-1)
        return state


# --------------------------------------------------------------------------- baseline
def original_recipe_torchvision(out_size: int = 224):
    """The paper code's sequential torchvision transforms, applied to a PIL RGB copy of the grey image.

    The baseline for ``bench/loader.py`` and the reference distribution for tests:
    ``original_recipe_torchvision()(PIL.Image.fromarray(grey).convert("RGB")) -> (3, out, out)``.
    """
    import torchvision.transforms as T

    return T.Compose([
        T.RandomCrop(out_size),
        T.RandomRotation(degrees=(0, _ORIG_MAX_ANGLE)),
        T.RandomPerspective(distortion_scale=_ORIG_DISTORTION, p=_ORIG_PERSPECTIVE_P),
        T.RandomAutocontrast(p=_AUTOCONTRAST_P),
        T.ToTensor(),
        T.Normalize(mean=[MEAN] * 3, std=[STD] * 3),
    ])
