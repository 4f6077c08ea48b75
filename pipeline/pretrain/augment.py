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

Each sample's parameters are 16 float64 uniforms from a torch generator, turned into its warp by
plain Python arithmetic (closed-form homographies, no tensors): a few microseconds, and one code
path for ``augment_one`` (per sample, seeded per sample for exact resume: what train-vision's loader
workers run) and the batched ``Augmenter``, which therefore give the same pixels for the same draw (on
the CPU, bit for bit). Shard bytes are decoded by ``pipeline.pretrain.wds.decode_image``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

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
    "augment_one",
    "Augmenter",
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
# Every sample's parameters come from 16 uniforms (float64) drawn from a torch generator: one
# torch.rand call per sample or per batch keeps the stream seedable and checkpointable. Turning them
# into a warp is plain Python arithmetic on a handful of floats (a few microseconds), ONE code path
# for the per-sample and the batched augmenters, so both give bit-identical coefficients. Matrices
# are row-major 9-tuples mapping an OUTPUT point to the point it samples.
_N_UNIFORMS = 16
_EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class _Params(NamedTuple):
    """One sample's raw parameters, as drawn."""

    top: float  # crop window offset in the input (integer-valued for "original" and "none")
    left: float
    angle: float  # degrees, counter-clockwise as displayed (y down)
    zoom: float  # > 1 magnifies
    endpoints: tuple | None  # perspective corners TL, TR, BR, BL as (x, y); None: no perspective
    autocontrast: bool


class _Geom(NamedTuple):
    """One sample's warp in the form the warps need."""

    window: tuple[int, int] | None  # (top, left) of the out x out crop slice; None: sample the whole input
    local: tuple  # output -> window frame (or -> input when no window)
    persp: tuple | None  # output -> rotated-crop frame, whose out x out square must be hit (else zero)
    bilinear: bool  # False: nearest
    autocontrast: bool
    coef: tuple | None  # grid_sample plane coefficients (see _grid): 2 rows (affine) or 5 (projective);
    # None: the window itself, no resampling


def _mm(a: tuple, b: tuple) -> tuple:
    """3 x 3 matrix product of row-major 9-tuples."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = a
    b0, b1, b2, b3, b4, b5, b6, b7, b8 = b
    return (a0 * b0 + a1 * b3 + a2 * b6, a0 * b1 + a1 * b4 + a2 * b7, a0 * b2 + a1 * b5 + a2 * b8,
            a3 * b0 + a4 * b3 + a5 * b6, a3 * b1 + a4 * b4 + a5 * b7, a3 * b2 + a4 * b5 + a5 * b8,
            a6 * b0 + a7 * b3 + a8 * b6, a6 * b1 + a7 * b4 + a8 * b7, a6 * b2 + a7 * b5 + a8 * b8)


def _square_to_quad(pts) -> tuple:
    """The projective map taking the unit square's corners (0,0), (1,0), (1,1), (0,1) to ``pts``
    (closed form, Heckbert 1989: no linear solve)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = pts
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    if den == 0:
        raise ValueError(f"degenerate perspective corners {pts}")
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    return (x1 - x0 + g * x1, x3 - x0 + h * x3, x0,
            y1 - y0 + g * y1, y3 - y0 + h * y3, y0,
            g, h, 1.0)


def _perspective(start, end) -> tuple:
    """Startpoints and endpoints (4 (x, y) each) -> the map taking endpoints to startpoints, scaled
    so that its last entry is 1: torchvision's ``_get_perspective_coeffs`` (output corner -> input
    corner), in closed form instead of an 8 x 8 least-squares solve."""
    e0, e1, e2, e3, e4, e5, e6, e7, e8 = _square_to_quad(end)
    adj = (e4 * e8 - e5 * e7, e2 * e7 - e1 * e8, e1 * e5 - e2 * e4,  # inverse up to scale
           e5 * e6 - e3 * e8, e0 * e8 - e2 * e6, e2 * e3 - e0 * e5,
           e3 * e7 - e4 * e6, e1 * e6 - e0 * e7, e0 * e4 - e1 * e3)
    h = _mm(_square_to_quad(start), adj)
    s = h[8]
    return tuple(v / s for v in h[:8]) + (1.0,)


def _rotation(angle_deg: float, cx: float, cy: float, zoom: float = 1.0) -> tuple:
    """Output->input map of a counter-clockwise rotation (y down, as displayed) about (cx, cy);
    ``zoom`` > 1 magnifies (the output samples a smaller input window)."""
    a = math.radians(angle_deg)
    inv = 1.0 / zoom
    cos, sin = math.cos(a) * inv, math.sin(a) * inv
    # x_in - c = M (x_out - c)  =>  translation c - M c
    return (cos, -sin, cx - (cos * cx - sin * cy),
            sin, cos, cy - (sin * cx + cos * cy),
            0.0, 0.0, 1.0)


def _translation(tx: float, ty: float) -> tuple:
    return (1.0, 0.0, tx, 0.0, 1.0, ty, 0.0, 0.0, 1.0)


def _randint(u: float, lo: int, hi: int) -> int:
    """A uniform integer in [lo, hi) (torch.randint's range) from a uniform in [0, 1)."""
    return min(lo + math.floor(u * (hi - lo)), hi - 1)


def _corners(out_size: int) -> tuple:
    o = out_size - 1
    return ((0, 0), (o, 0), (o, o), (0, o))  # torchvision's startpoints


def _params(u, recipe: str, in_size: int, out_size: int) -> _Params:
    """16 uniforms in [0, 1) -> the raw parameters of one sample of ``recipe``."""
    margin = in_size - out_size
    if recipe == "none":
        off = int(round(margin / 2.0))  # torchvision's center_crop rounding
        return _Params(off, off, 0.0, 1.0, None, False)
    flip = u[0] < _AUTOCONTRAST_P
    if recipe == "original":
        ends = None
        if u[4] < _ORIG_PERSPECTIVE_P:
            # torchvision's RandomPerspective.get_params: each corner moves inward by up to d pixels.
            d = int(_ORIG_DISTORTION * (out_size // 2))
            near, far = (0, d + 1), (out_size - d - 1, out_size)
            ranges = ((near, near), (far, near), (far, far), (near, far))  # TL, TR, BR, BL as (x, y)
            ends = tuple((_randint(u[5 + 2 * k], *rx), _randint(u[6 + 2 * k], *ry))
                         for k, (rx, ry) in enumerate(ranges))
        return _Params(_randint(u[1], 0, margin + 1), _randint(u[2], 0, margin + 1), u[3] * _ORIG_MAX_ANGLE, 1.0,
                       ends, flip)
    lo, hi = _LIGHT_ZOOM
    return _Params(u[1] * margin, u[2] * margin, (u[3] * 2 - 1) * _LIGHT_MAX_ANGLE, lo + u[4] * (hi - lo), None, flip)


def _unit_rows(m: tuple, size: int) -> tuple:
    """Rows x, y of (pixel coordinates over a size x size frame -> grid_sample's [-1, 1]) ∘ m."""
    k = 2.0 / size
    return (k * m[0] - m[6], k * m[1] - m[7], k * m[2] - m[8],
            k * m[3] - m[6], k * m[4] - m[7], k * m[5] - m[8])


def _geometry(p: _Params, recipe: str, in_size: int, out_size: int) -> _Geom:
    """Compose crop ∘ rotation(+zoom) ∘ perspective of one sample."""
    c = out_size / 2.0
    rot = _rotation(p.angle, c, c, p.zoom)
    persp = _perspective(_corners(out_size), p.endpoints) if p.endpoints is not None else None
    local = _mm(rot, persp) if persp is not None else rot
    if recipe == "light":  # continuous, zoomed window: no slice, sample the whole input
        local = _mm(_translation(p.left, p.top), local)
        return _Geom(None, local, None, True, p.autocontrast, _unit_rows(local, in_size))
    window = (int(p.top), int(p.left))
    if recipe == "none":  # the centre crop itself: no resampling
        return _Geom(window, local, None, True, False, None)
    if persp is None:
        # "original" only rotates: NEAREST, RandomRotation's default.
        return _Geom(window, local, None, False, p.autocontrast, _unit_rows(local, out_size))
    # With perspective: rows x, y of the map to the window, x, y of the map to the perspective's
    # frame and the shared denominator (rotation is affine, so both maps have the same last row).
    coef = _unit_rows(local, out_size) + _unit_rows(persp, out_size) + persp[6:]
    return _Geom(window, local, persp, True, p.autocontrast, coef)


def _check_sizes(recipe: str, in_size: int, out_size: int) -> None:
    _check_recipe(recipe)
    if out_size > in_size:
        raise ValueError(f"augmentation output size {out_size} is larger than the input size {in_size}")


def _uniforms(batch_size: int, generator: torch.Generator) -> list[list[float]]:
    return torch.rand((batch_size, _N_UNIFORMS), generator=generator, dtype=torch.float64).tolist()


def _draw_params(batch_size: int, generator: torch.Generator, recipe: str, in_size: int = 256,
                 out_size: int = 224) -> list[_Params]:
    """``batch_size`` raw parameter sets of ``recipe`` from ``generator`` (one torch.rand call)."""
    _check_sizes(recipe, in_size, out_size)
    return [_params(u, recipe, in_size, out_size) for u in _uniforms(batch_size, generator)]


def _draw(batch_size: int, generator: torch.Generator, recipe: str, in_size: int, out_size: int) -> list[_Geom]:
    return [_geometry(p, recipe, in_size, out_size) for p in _draw_params(batch_size, generator, recipe, in_size,
                                                                          out_size)]


def _matrices(ms) -> Tensor:
    return torch.tensor(ms, dtype=torch.float64).view(-1, 3, 3)


def sample_params(batch_size: int, generator: torch.Generator, recipe: str = "original", in_size: int = 256,
                  out_size: int = 224, with_bounds: bool = False):
    """Draw ``batch_size`` augmentations of ``recipe`` from ``generator`` (a CPU torch.Generator).

    Returns ``(homographies (B,3,3) float64, autocontrast flags (B,) bool)``, all on the CPU; each
    homography composes crop, rotation and perspective and maps an output pixel coordinate of the
    out_size result to the in_size input image. ``with_bounds=True`` adds a third item for
    ``warp_batch(bounds=...)``: (B,2,3,3) stage maps for "original" (None otherwise) that reproduce
    its black corners. The same generator state gives the same parameters as the augmenters draw.
    """
    hmat, flags, bounds = _stack_maps(_draw(batch_size, generator, recipe, in_size, out_size), recipe)
    return (hmat, flags, bounds) if with_bounds else (hmat, flags)


def _stack_maps(geoms: list[_Geom], recipe: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Full output -> input homographies, autocontrast flags and (for "original") the stage bounds."""
    hmat = _matrices([g.local if g.window is None else _mm(_translation(g.window[1], g.window[0]), g.local)
                      for g in geoms])
    flags = torch.tensor([g.autocontrast for g in geoms], dtype=torch.bool)
    bounds = None
    if recipe == "original":
        bounds = torch.stack([_matrices([g.persp or _EYE for g in geoms]), _matrices([g.local for g in geoms])], 1)
    return hmat, flags, bounds


# --------------------------------------------------------------------------- image ops
_CENTRES: dict[tuple[int, str], Tensor] = {}


def _to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A small CPU tensor (indices, flags, coefficients) onto ``device`` without stalling the host:
    on CUDA it is pinned and copied asynchronously (a pageable or host-built tensor would make the
    copy synchronous and wait for all queued GPU work). The pinned block is not reused before the
    copy has finished (PyTorch's caching host allocator tracks it)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _compute_float(images: Tensor) -> Tensor:
    """The images in the dtype the warp computes in: float32 for uint8, float16 and bfloat16. The
    sampling grid takes this dtype too, and in half precision its coordinates near the border of
    [-1, 1] are off by up to a tenth of a pixel at 224 px (worse in bf16), and the projective map
    overflows; float32 and float64 input is used as it is."""
    return images if images.dtype in (torch.float32, torch.float64) else images.float()


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
    m = _to_device(maps.to(torch.float32), device)
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
    x = _compute_float(images)
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
                idx = _to_device(sel.cpu().nonzero().flatten(), x.device)
                out.index_copy_(0, idx, F.grid_sample(x.index_select(0, idx), grid.index_select(0, idx), mode=mode,
                                                      padding_mode="zeros", align_corners=False))
            return out
    return F.grid_sample(x, grid, mode="bilinear" if bilinear else "nearest", padding_mode="zeros",
                         align_corners=False)


def warp_batch(images: Tensor, homographies: Tensor, out_size: int = 224, bounds: Tensor | None = None) -> Tensor:
    """Warp (B,1,H,W) images by output->input homographies (B,3,3) into float (B,1,out,out).

    uint8 input gives float32 values in [0, 1] (like ToTensor); float input keeps its scale and its
    dtype, float16 and bfloat16 being warped in float32 (see :func:`_compute_float`). Bilinear, zero
    outside the image (torchvision's fill 0). ``bounds`` (B,K,3,3), optional: output pixels that any
    of these maps sends outside [0, out]² are zero too. Runs on the images' device (CPU or CUDA).
    """
    out = _warp_raw(images, homographies, out_size, bounds)
    if images.dtype == torch.uint8:
        return out.div_(255.0)
    return out if out.dtype == images.dtype else out.to(images.dtype)

def _grid(coef: Tensor, out_size: int) -> Tensor:
    """(B, K, 3) float32 plane coefficients -> the grid_sample grid (B, out, out, 2), a view.

    Row k gives plane_k = u c0 + (v c1 + c2) over the output pixel centres (u, v), one broadcast sum
    (contiguous planes vectorise; an interleaved layout or an (out², 3) matmul is ~20x slower on CPU).
    K = 2: the planes are grid x and y (an affine map). K = 5 (projective): x and y numerators of the
    map to the input, x and y numerators of the map to the perspective's frame, and their shared
    denominator. Pixels whose frame point lies outside [-1, 1]² get grid x = -4, far beyond the
    border, so grid_sample's zero padding blacks them (the original's zero-filled 224 x 224
    intermediate) without another pass.
    """
    b, k, _ = coef.shape
    r = _pixel_centres(out_size, coef.device)
    c = coef.unsqueeze(-1)  # (B, K, 3, 1)
    planes = r.view(1, 1, 1, -1) * c[:, :, 0:1] + (r.view(1, 1, -1, 1) * c[:, :, 1:2] + c[:, :, 2:3])
    if k == 2:
        return planes.permute(0, 2, 3, 1)
    # |n / w| > 1 without dividing: max(|nx|, |ny|) > |w|.
    if planes.device.type == "cpu":  # numpy's compare and masked copy are several times faster than torch's
        pn = planes.numpy()
        outside = np.maximum(np.abs(pn[:, 2]), np.abs(pn[:, 3])) > np.abs(pn[:, 4])
        np.divide(pn[:, :2], pn[:, 4:5], out=pn[:, :2])
        np.copyto(pn[:, 0], np.float32(-4.0), where=outside)
    else:
        outside = torch.maximum(planes[:, 2].abs(), planes[:, 3].abs()) > planes[:, 4].abs()
        planes[:, :2].div_(planes[:, 4:5])
        planes[:, 0].masked_fill_(outside, -4.0)
    return planes[:, :2].permute(0, 2, 3, 1)


_CPU_CHUNK = 8


def _warp_group(images: Tensor, geoms: list[_Geom], out_size: int) -> Tensor:
    """(b,1,S,S) images warped by their ``geoms`` (all of one kind: window or not, interpolation,
    plane count) -> raw float (b,1,out,out) in the input's scale.

    The crop is a slice (no resampling); the one resampling is rotation ∘ perspective of the crop,
    zero outside it and outside the perspective's frame, like the original's zero-filled
    intermediates. The same code for one image or a batch, so both give identical pixels.
    """
    g0 = geoms[0]
    if g0.window is not None:
        if len(geoms) == 1:  # a view, no copy
            top, left = g0.window
            images = images[..., top:top + out_size, left:left + out_size]
        else:
            images = torch.stack([img[..., t:t + out_size, l:l + out_size]
                                  for img, (t, l) in zip(images, (g.window for g in geoms))])  # noqa: E741
    x = _compute_float(images)
    if g0.coef is None:  # identity ("none"): the crop itself, exact
        return x.clone(memory_format=torch.contiguous_format) if x is images else x
    coef = torch.tensor([g.coef for g in geoms], dtype=torch.float32).view(len(geoms), -1, 3)
    mode = "bilinear" if g0.bilinear else "nearest"
    if x.device.type != "cpu" or len(geoms) <= _CPU_CHUNK:
        grid = _grid(_to_device(coef, x.device), out_size)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    # On the CPU, a few images at a time keep the coordinate planes in cache (~2x faster at B = 64).
    out = x.new_empty((x.shape[0], x.shape[1], out_size, out_size))
    for s in range(0, len(geoms), _CPU_CHUNK):
        part = slice(s, s + _CPU_CHUNK)
        out[part] = F.grid_sample(x[part], _grid(coef[part], out_size), mode=mode, padding_mode="zeros",
                                  align_corners=False)
    return out


def _warp_geoms(images: Tensor, geoms: list[_Geom], out_size: int) -> Tensor:
    """:func:`_warp_group` over a batch that mixes kinds (each kind warped on its own)."""
    kinds = [(g.window is None, g.bilinear, 0 if g.coef is None else len(g.coef)) for g in geoms]
    groups = list(dict.fromkeys(kinds))
    if len(groups) == 1:
        return _warp_group(images, geoms, out_size)
    out = None
    for kind in groups:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        sel = _to_device(torch.tensor(idx), images.device)
        part = _warp_group(images.index_select(0, sel), [geoms[i] for i in idx], out_size)
        if out is None:
            out = part.new_empty((images.shape[0],) + tuple(part.shape[1:]))
        out.index_copy_(0, sel, part)
    return out


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
        on = _to_device(flags.to(torch.bool), x.device).view(-1, *([1] * (x.ndim - 1)))
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


def _finish(raw: Tensor, flags: Tensor, value_max: float) -> Tensor:
    """autocontrast (where flagged) + ToTensor scaling + normalize, fused into one in-place affine pass.

    ``raw``: warped (B,1,H,W) float in [0, value_max]. The min/max stretch already lands in [0, 1],
    so no clamp is needed and the three steps collapse to raw * a + b per image, with a and b
    computed in float64 exactly as :func:`_finish_one` does (so both give identical pixels).
    """
    b = raw.shape[0]
    a = torch.full((b,), 1.0 / (value_max * STD), dtype=torch.float64, device=raw.device)
    off = torch.full((b,), -MEAN / STD, dtype=torch.float64, device=raw.device)
    if bool(flags.any()):  # flags are built on the CPU: testing them costs no device sync
        flags = _to_device(flags.to(torch.bool), raw.device).view(b)
        mn = raw.amin(dim=(1, 2, 3)).double()
        span = raw.amax(dim=(1, 2, 3)).double() - mn
        on = flags & (span > 0)  # constant images stay unchanged, as in torchvision
        scale = torch.where(on, span, torch.ones_like(span)) * STD
        a = torch.where(on, 1.0 / scale, a)
        off = torch.where(on, -mn / scale - MEAN / STD, off)
    return raw.mul_(a.float().view(b, 1, 1, 1)).add_(off.float().view(b, 1, 1, 1))


def _finish_one(raw: Tensor, autocontrast: bool, value_max: float) -> Tensor:
    """:func:`_finish` of a batch of one, with Python scalars (no small tensors)."""
    a, off = 1.0 / (value_max * STD), -MEAN / STD
    if autocontrast:
        mn, mx = torch.aminmax(raw)
        mn = mn.item()
        span = mx.item() - mn
        if span > 0:
            scale = span * STD
            a, off = 1.0 / scale, -mn / scale - MEAN / STD
    return raw.mul_(a).add_(off)


def _as_batch(images: Tensor | np.ndarray) -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected grey images (B,1,H,W) or (B,H,W), or colour (B,3,H,W), got shape "
                         f"{tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images, got {tuple(images.shape[-2:])}")
    return images


def _value_max(images: Tensor) -> float:
    return 255.0 if images.dtype == torch.uint8 else 1.0


# --------------------------------------------------------------------------- augmenters
def _as_single(image: Tensor | np.ndarray) -> Tensor:
    """A grey (H,W) array or (1,H,W)/(H,W) tensor -> a (1,1,S,S) tensor view; a colour (H,W,3) array
    or (3,H,W) tensor -> (1,3,S,S)."""
    if isinstance(image, np.ndarray):
        colour = image.ndim == 3 and image.shape[2] == 3
        image = torch.from_numpy(np.ascontiguousarray(image))
        if colour:
            image = image.permute(2, 0, 1)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected one grey image (H,W) or (1,H,W), or colour (H,W,3), got shape "
                         f"{tuple(image.shape)}")
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(f"expected a square image, got {tuple(image.shape[-2:])}")
    return image[None]


def _augment_single(image: Tensor, u: list[float], recipe: str, out_size: int) -> Tensor:
    size = image.shape[-1]
    g = _geometry(_params(u, recipe, size, out_size), recipe, size, out_size)
    return _finish_one(_warp_group(image, [g], out_size), g.autocontrast, _value_max(image))[0]


def augment_one(image: Tensor | np.ndarray, generator: torch.Generator, recipe: str = "original",
                out_size: int = 224) -> Tensor:
    """One grey image (uint8 (H,W) array or (1,H,W)/(H,W) tensor) -> normalized float (1,out,out).

    Parameters come from ``generator`` (seed it per sample for augmentation that a resumed run
    repeats exactly): the result is a pure function of the image and the generator's state, and
    equals what :class:`Augmenter` gives for the same draw. The fast per-sample path: parameters in
    plain Python arithmetic, crop by slicing, one resampling, fused autocontrast + normalize.
    Collate, then :func:`to_three_channels`.
    """
    image = _as_single(image)
    _check_sizes(recipe, image.shape[-1], out_size)
    u = torch.rand(_N_UNIFORMS, generator=generator, dtype=torch.float64).tolist()
    return _augment_single(image, u, recipe, out_size)


class Augmenter:
    """Batched augmentation: uint8 (B,1,S,S) or (B,S,S) -> normalized float (B,3,out,out) on ``device``.

    Float input is taken to be in [0, 1]. The 3-channel result is a stride-0 view of one channel.
    Parameters come from a CPU generator seeded with ``seed``; ``state_dict``/``load_state_dict``
    carry it across checkpoints. ``device="cuda"`` moves the uint8 batch to the GPU and warps it
    there, so CPU workers only decode. Per image, the same parameters and pixels as
    :func:`augment_one` with a generator in the same state (on the CPU, bit for bit).
    """

    def __init__(self, recipe: str = "original", device: str | torch.device = "cpu", seed: int = 0,
                 out_size: int = 224):
        _check_recipe(recipe)
        self.recipe, self.device, self.out_size = recipe, torch.device(device), out_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        images = _as_batch(images)
        geoms = _draw(images.shape[0], self.generator, self.recipe, images.shape[-1], self.out_size)
        images = images.to(self.device, non_blocking=True)
        raw = _warp_geoms(images, geoms, self.out_size)
        flags = torch.tensor([g.autocontrast for g in geoms], dtype=torch.bool)
        out = _finish(raw, flags, _value_max(images))
        return to_three_channels(out) if out.shape[1] == 1 else out  # colour: already 3 channels

    def state_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("recipe") != self.recipe:
            raise ValueError(f"augmenter state is for recipe {state.get('recipe')!r}, not {self.recipe!r}")
        self.generator.set_state(state["generator"])


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
