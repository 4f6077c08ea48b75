"""pipeline.pretrain.augment: one projective warp of the grey channel vs the original torchvision recipe."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.pretrain import augment as A


def _smooth_image(size: int = 256) -> torch.Tensor:
    """(1, 1, size, size) float in 0..255, smooth so that resampling orders barely matter."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = 128 + 60 * torch.sin(xx / 13) + 50 * torch.cos(yy / 17 + xx / 40)
    return img.clamp(0, 255)[None, None]


def _uint8_batch(b: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, size, size), generator=g, dtype=torch.uint8)


def test_identity_and_centre_crop_are_exact():
    img = _uint8_batch(2, 64)
    eye = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    assert torch.equal(A.warp_batch(img, eye, 64), img.float() / 255)
    # A translation by the crop offset reproduces torchvision's centre crop bit for bit.
    shift = eye.clone()
    shift[:, :2, 2] = 8.0
    out = A.warp_batch(img.float(), shift, 48)
    assert torch.equal(out, TF.center_crop(img, [48, 48]).float())
    hmat, flags = A.sample_params(2, torch.Generator().manual_seed(0), "none", 64, 48)
    assert torch.equal(hmat, shift) and not flags.any()
    aug = A.Augmenter("none", seed=0, out_size=48)(img)
    assert torch.allclose(aug, ((TF.center_crop(img, [48, 48]).float() / 255 - 0.5) / 0.5).expand(-1, 3, -1, -1),
                          atol=1e-6)


@pytest.mark.parametrize("angle", [17.0, 63.5])
def test_rotation_matches_torchvision(angle):
    img = _smooth_image(128)
    rot = A._matrices([A._rotation(angle, 64.0, 64.0)])
    ours = A.warp_batch(img, rot, 128)
    ref = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR)
    inner = (slice(None), slice(None), slice(24, 104), slice(24, 104))  # away from the black corners
    assert (ours - ref)[inner].abs().max() < 0.05  # same sampling points, float rounding only
    wrong_way = A.warp_batch(img, A._matrices([A._rotation(-angle, 64.0, 64.0)]), 128)
    assert (wrong_way - ref)[inner].abs().mean() > 5


def test_perspective_matches_torchvision_coefficients():
    """The closed-form 4-point homography equals torchvision's least-squares coefficients, and maps
    each endpoint exactly onto its startpoint (float64)."""
    start = [[0, 0], [223, 0], [223, 223], [0, 223]]
    ends = [[[12, 40], [200, 3], [219, 190], [30, 220]], [[0, 0], [223, 0], [223, 223], [0, 223]]]
    g = torch.Generator().manual_seed(0)
    ends += [p.endpoints for p in A._draw_params(200, g, "original") if p.endpoints is not None][:20]
    irregular = [[5.5, -3.0], [250.25, 10.0], [190.0, 240.5], [-20.0, 200.0]]
    for s, end in [(start, e) for e in ends] + [(irregular, ends[0]), (ends[0], irregular)]:
        ours = torch.tensor(A._perspective(s, end), dtype=torch.float64)
        ref = torch.tensor(TF._get_perspective_coeffs([list(p) for p in s], [list(p) for p in end]),
                           dtype=torch.float64)
        assert ours[8] == 1 and torch.allclose(ours[:8], ref, rtol=1e-6, atol=1e-9)
        for (u, v), (x, y) in zip(end, s):
            h = ours.view(3, 3) @ torch.tensor([u, v, 1.0], dtype=torch.float64)
            assert abs(h[0] / h[2] - x) < 1e-9 and abs(h[1] / h[2] - y) < 1e-9


def test_single_warp_equals_the_sequential_original_geometry():
    """crop -> rotate -> perspective (torchvision, bilinear, zero fill) vs our one warp with bounds."""
    img = _smooth_image()
    params = A._draw_params(6, torch.Generator().manual_seed(3), "original", 256, 224)
    rng = np.random.default_rng(4)
    start = [list(p) for p in A._corners(224)]
    # Perspective on every sample, corners from torchvision's ranges (0..56 inward), never the identity.
    params = [p._replace(endpoints=tuple((abs(x - int(rng.integers(1, 57))), abs(y - int(rng.integers(1, 57))))
                                         for x, y in start)) for p in params]
    geoms = [A._geometry(p, "original", 256, 224) for p in params]
    hmat, _, bounds = A._stack_maps(geoms, "original")
    for k, p in enumerate(params):
        ref = TF.crop(img, int(p.top), int(p.left), 224, 224)
        ref = TF.rotate(ref, p.angle, interpolation=InterpolationMode.BILINEAR)
        ref = TF.perspective(ref, start, [list(e) for e in p.endpoints], interpolation=InterpolationMode.BILINEAR)
        # The augmenters' path (slice + one resampling) and the general warp with explicit bounds.
        for ours in (A._warp_group(img, [geoms[k]], 224), A.warp_batch(img, hmat[k:k + 1], 224, bounds[k:k + 1])):
            diff = (ours - ref).abs()
            assert diff.mean() < 1.5  # of 255: two bilinear passes vs one
            assert (diff > 10).float().mean() < 0.03  # only a one-pixel rim at the black borders differs
            assert ((ours == 0) != (ref == 0)).float().mean() < 0.03  # same black corners
            assert (ours == 0).float().mean() > 0.05  # there are black corners to compare


def test_black_corner_share_matches_the_original_recipe():
    """Distribution check on a white image: the share of zero-filled pixels (rotation corners and
    perspective borders) of our augmenter equals that of the torchvision recipe."""
    n = 800  # per-image shares have sd ~0.2: the difference of the two means has sd ~0.01
    torch.manual_seed(0)
    tf = A.original_recipe_torchvision(out_size=56)
    white = Image.fromarray(np.full((64, 64), 255, np.uint8)).convert("RGB")
    theirs = torch.stack([tf(white)[0] for _ in range(n)])
    ours = A.Augmenter("original", seed=1, out_size=56)(torch.full((n, 1, 64, 64), 255, dtype=torch.uint8))[:, 0]
    black_theirs = (theirs < -0.99).float().mean().item()
    black_ours = (ours < -0.99).float().mean().item()
    assert 0.2 < black_theirs < 0.4  # ~0.31
    assert abs(black_ours - black_theirs) < 0.03  # sampling beyond the crop window gives ~0.17


def test_parameter_distributions():
    g = torch.Generator().manual_seed(0)
    n = 4000
    c = A._draw_params(n, g, "original", 256, 224)
    assert {p.top for p in c} == set(range(33)) and {p.left for p in c} == set(range(33))
    angle = torch.tensor([p.angle for p in c])
    assert 0 <= angle.min() and angle.max() <= 90 and abs(angle.mean() - 45) < 2
    assert abs(np.mean([p.endpoints is not None for p in c]) - 0.5) < 0.04
    assert abs(np.mean([p.autocontrast for p in c]) - 0.5) < 0.04
    end = torch.tensor([p.endpoints for p in c if p.endpoints is not None], dtype=torch.float64)
    # torchvision's RandomPerspective(0.5) corner ranges for 224 px: 0..56 and 167..223, all values hit.
    assert end[:, [0, 3], 0].min() == 0 and end[:, [0, 3], 0].max() == 56
    assert end[:, [1, 2], 0].min() == 167 and end[:, [1, 2], 0].max() == 223
    assert end[:, [0, 1], 1].max() == 56 and end[:, [2, 3], 1].min() == 167
    assert len(end[:, 0, 0].unique()) == 57
    light = A._draw_params(n, g, "light", 256, 224)
    angle = torch.tensor([p.angle for p in light])
    zoom = torch.tensor([p.zoom for p in light])
    assert angle.abs().max() <= 10 and angle.min() < -9 and angle.max() > 9
    assert 0.9 <= zoom.min() and zoom.max() <= 1.1 and all(p.endpoints is None for p in light)
    assert 0 <= min(p.top for p in light) and max(p.top for p in light) <= 32
    hmat, _ = A.sample_params(n, g, "original", 256, 224)
    # Without perspective the map is a rigid motion: last row (0, 0, 1), rotation block orthonormal.
    rigid = hmat[(hmat[:, 2, :2] == 0).all(1)]
    assert 0.4 < len(rigid) / n < 0.6
    blk = rigid[:, :2, :2]
    assert torch.allclose(blk @ blk.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand_as(blk), atol=1e-12)


def test_determinism_by_seed_and_state_round_trip():
    imgs = _uint8_batch(4, 64)
    a1 = A.Augmenter("original", seed=7, out_size=48)
    a2 = A.Augmenter("original", seed=7, out_size=48)
    assert torch.equal(a1(imgs), a2(imgs))
    assert not torch.equal(a1(imgs), A.Augmenter("original", seed=8, out_size=48)(imgs))
    state = a1.state_dict()
    first = a1(imgs)
    a1.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert torch.equal(a1(imgs), first)
    with pytest.raises(ValueError, match="recipe"):
        A.Augmenter("light").load_state_dict(state)
    h1, _ = A.sample_params(3, torch.Generator().manual_seed(5), "light")
    h2, _ = A.sample_params(3, torch.Generator().manual_seed(5), "light")
    assert torch.equal(h1, h2)


def test_to_three_channels_shares_storage():
    x = torch.randn(2, 1, 8, 8)
    y = A.to_three_channels(x)
    assert y.shape == (2, 3, 8, 8) and y.stride(1) == 0 and y.data_ptr() == x.data_ptr()
    x[0, 0, 0, 0] = 42.0
    assert (y[0, :, 0, 0] == 42.0).all()
    single = A.to_three_channels(x[0])
    assert single.shape == (3, 8, 8) and single.data_ptr() == x.data_ptr()
    with pytest.raises(ValueError, match="one channel"):
        A.to_three_channels(torch.randn(2, 3, 8, 8))


def test_autocontrast_and_fused_finish_match_torchvision():
    x = torch.rand(3, 1, 16, 16) * 0.5 + 0.2
    x[2] = 0.3  # constant image: unchanged
    flags = torch.tensor([True, False, True])
    out = A.autocontrast_batch(x, flags)
    assert torch.allclose(out[0], TF.autocontrast(x[0]), atol=1e-6)
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], x[2])
    raw = x * 255
    fused = A._finish(raw.clone(), flags, 255.0)
    assert torch.allclose(fused, A.normalize(A.autocontrast_batch(raw / 255, flags)), atol=1e-5)
    assert torch.allclose(A.normalize(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_augmenters_shapes_and_per_sample_equals_batched():
    imgs = _uint8_batch(24, 64, seed=1)  # groups of more than 8: the CPU warps them in chunks
    out = A.Augmenter("original", seed=0, out_size=48)(imgs[:, 0])  # (B, H, W) accepted too
    assert out.shape == (24, 3, 48, 48) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    for recipe in A.RECIPES:
        # The batched augmenter (one draw, grouped warps, tensor finish) and augment_one per image
        # (scalar finish) from a generator in the same state: bit for bit.
        batched = A.Augmenter(recipe, seed=2, out_size=48)(imgs)
        g = torch.Generator().manual_seed(2)
        single = torch.stack([A.augment_one(imgs[i, 0], g, recipe, 48) for i in range(24)])
        assert torch.equal(batched[:, :1], single)
        if recipe == "original":  # both kinds of warp (nearest rotation, bilinear perspective) occur
            kinds = {g.bilinear for g in A._draw(24, torch.Generator().manual_seed(2), recipe, 64, 48)}
            assert kinds == {True, False}
    g = torch.Generator()
    one = [A.augment_one(imgs[i, 0], g.manual_seed(100 + i), "original", 48) for i in range(3)]
    # A pure function of the seed: whatever was drawn before, whatever the input type.
    assert torch.equal(one[1], A.augment_one(imgs[1, 0].numpy(), g.manual_seed(101), "original", 48))
    assert not torch.equal(one[1], A.augment_one(imgs[1, 0], g.manual_seed(102), "original", 48))
    with pytest.raises(ValueError, match="grey"):  # 1 (grey) or 3 (prepare pairs --channels 3) channels only
        A.Augmenter("original")(torch.zeros(2, 2, 64, 64, dtype=torch.uint8))
    colour = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = A.Augmenter("none", out_size=48)(colour)
    assert out.shape == (2, 3, 48, 48) and out.stride(1) != 0  # three real channels, not a view of one
    assert torch.equal(out[1], A.augment_one(colour[1].permute(1, 2, 0).numpy(), g, "none", 48))
    with pytest.raises(ValueError, match="recipe"):
        A.Augmenter("heavy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_augmenter_matches_cpu():
    imgs = _uint8_batch(16, 256)
    cpu = A.Augmenter("original", device="cpu", seed=4)(imgs)
    gpu = A.Augmenter("original", device="cuda", seed=4)(imgs.pin_memory())
    assert gpu.device.type == "cuda"
    diff = (gpu.cpu() - cpu).abs()
    assert (diff > 1e-3).float().mean() < 1e-3  # rare nearest/bound ties at float rounding
