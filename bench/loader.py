"""CPU time per image: this loader's augmentation path vs the paper code's recipe, side by side.

Baseline (the original): uint8 array -> PIL RGB copy -> RandomCrop(224) -> RandomRotation((0, 90))
-> RandomPerspective(0.5, p=0.5) -> RandomAutocontrast(p=0.5) -> ToTensor -> Normalize.
Ours: a shard member -> uint8 grey array (``pipeline.pretrain.wds.decode_image``) -> one projective warp of the
one channel, seeded per sample as train-vision does for exact resume (``augment.augment_one``); with
CUDA, also the batched GPU path where the CPU only decodes. Shard members are ``.npy`` (``prepare
--format raw``: no decoding, like the original's uint8 arrays) or PNG (the default format, which
costs a decode the original never paid). Inputs are synthetic 256 x 256 grey images.

The headline ratio compares like with like: raw shards against the original's uint8 arrays. The
PNG rows show what the smaller default format costs.

Each variant runs on one thread (as in a DataLoader worker), timed by process CPU time, in rounds
that alternate the variants so machine load hits all of them alike; the median round counts.

    python bench/loader.py [--quick] [--n 256] [--batch 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import emit  # noqa: E402
from pipeline.corpora.shards import encode_image  # noqa: E402
from pipeline.pretrain.augment import Augmenter, augment_one, original_recipe_torchvision  # noqa: E402
from pipeline.pretrain.wds import decode_image  # noqa: E402


def npy_bytes(arrays) -> list[bytes]:
    out = []
    for arr in arrays:
        buf = io.BytesIO()
        np.save(buf, arr)
        out.append(buf.getvalue())
    return out


def run_loader(members, ext: str, gen: torch.Generator) -> None:
    """What a train-vision DataLoader worker does per sample (decode + per-sample seeded warp)."""
    for i, data in enumerate(members):
        augment_one(decode_image(data, ext), gen.manual_seed(i), "original")


def _pinned(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the DataLoader hands over with pin_memory=True (only meaningful for a GPU)."""
    return batch.pin_memory() if device.type == "cuda" else batch


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loader_gpu(members, ext: str, aug: Augmenter, batch: int) -> None:
    for s in range(0, len(members), batch):
        imgs = torch.stack([torch.from_numpy(decode_image(d, ext)) for d in members[s:s + batch]])
        aug(_pinned(imgs[:, None], aug.device))
    _wait(aug.device)


def synthetic_pngs(n: int, size: int = 256, seed: int = 0) -> tuple[list[bytes], list[np.ndarray]]:
    """Chest-X-ray-like grey images (smooth body, ribs, noise) as PNG shard bytes and uint8 arrays."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pngs, arrays = [], []
    for _ in range(n):
        body = np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2))
        ribs = 0.15 * np.sin(yy * rng.uniform(25, 40) + np.sin(xx * 6)) * body
        img = 40 + 170 * body + 255 * ribs + rng.normal(0, 6, (size, size))
        arr = np.clip(img, 0, 255).astype(np.uint8)
        pngs.append(encode_image(arr, "png"))  # the bytes prepare writes into a PNG shard
        arrays.append(arr)
    return pngs, arrays


def run_original(arrays, tf) -> None:
    for arr in arrays:
        tf(Image.fromarray(arr).convert("RGB"))


def run_original_decode(pngs, tf) -> None:
    for data in pngs:
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        tf(Image.fromarray(arr).convert("RGB"))


def run_ours_aug_only(arrays, gen: torch.Generator) -> None:
    for i, arr in enumerate(arrays):
        augment_one(arr, gen.manual_seed(i), "original")


def run_decode_only(pngs) -> None:
    for data in pngs:
        decode_image(data, "png")


def _decoded_batch(members) -> torch.Tensor:
    """(B, 1, H, W) uint8: the shard members decoded as train-vision's loader does."""
    return torch.stack([torch.from_numpy(decode_image(d, "png")) for d in members])[:, None]


def run_ours_batched(pngs, aug: Augmenter, batch: int) -> None:
    for s in range(0, len(pngs), batch):
        aug(_decoded_batch(pngs[s:s + batch]))


def run_ours_gpu(pngs, aug: Augmenter, batch: int) -> None:
    for s in range(0, len(pngs), batch):
        aug(_pinned(_decoded_batch(pngs[s:s + batch]), aug.device))
    _wait(aug.device)


def timed(fn, n_images: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per image."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) / n_images, (time.perf_counter() - w0) / n_images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few images, 2 rounds")
    ap.add_argument("--n", type=int, default=256, help="images per round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="device of the batched-warp rows [cuda when available, else none]; bench/gpu.sh "
                         "--dry-run passes cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.batch = 32, 2, 16
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pngs, arrays = synthetic_pngs(args.n)
    tf = original_recipe_torchvision()
    batch_aug = Augmenter("original", device="cpu", seed=0)
    gen = torch.Generator()
    npys = npy_bytes(arrays)
    variants = {
        "original (uint8 array -> RGB PIL -> torchvision)": lambda: run_original(arrays, tf),
        "ours: raw shard member (npy) -> 1 warp, per sample": lambda: run_loader(npys, "npy", gen),
        "ours: PNG shard member -> decode -> 1 warp, per sample": lambda: run_loader(pngs, "png", gen),
        "original + PNG decode": lambda: run_original_decode(pngs, tf),
        "PNG decode alone": lambda: run_decode_only(pngs),
        "ours augmentation alone (uint8 array -> 1 warp)": lambda: run_ours_aug_only(arrays, gen),
        f"ours batched CPU (decode + 1 warp, B={args.batch})": lambda: run_ours_batched(pngs, batch_aug, args.batch),
    }
    device = torch.device(args.device) if args.device else None
    on = f"{device.type.upper() if device.type == 'cuda' else 'CPU'}" if device else ""
    if device is not None:
        gpu_aug = Augmenter("original", device=device, seed=0)
        run_ours_gpu(pngs[: args.batch], gpu_aug, args.batch)  # warm-up: CUDA context, kernels
        variants[f"ours batched {on} (CPU decodes, B={args.batch})"] = lambda: run_ours_gpu(pngs, gpu_aug, args.batch)
        variants[f"ours: raw shard member, batched {on} warp (B={args.batch})"] = (
            lambda: run_loader_gpu(npys, "npy", gpu_aug, args.batch))
    for fn in variants.values():  # warm-up (allocator, first-call overheads)
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            c, w = timed(fn, len(pngs))
            cpu[name].append(c)
            wall[name].append(w)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    base = med["original (uint8 array -> RGB PIL -> torchvision)"]
    print(f"{len(pngs)} images/round, {args.rounds} rounds, torch threads 1, device "
          f"{(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu') if device else 'cpu only'}")
    print(f"{'variant':58s} {'CPU ms/img':>11s} {'wall ms/img':>12s} {'vs original':>12s}")
    for name in variants:
        w = statistics.median(wall[name])
        print(f"{name:58s} {med[name] * 1e3:11.3f} {w * 1e3:12.3f} {base / med[name]:11.2f}x")
    raw = med["ours: raw shard member (npy) -> 1 warp, per sample"]
    png = med["ours: PNG shard member -> decode -> 1 warp, per sample"]
    emit("loader", "CPU ms/img: raw shards + 1 warp vs original uint8 + torchvision", base / raw, 2,
         ours_ms=round(raw * 1e3, 3), original_ms=round(base * 1e3, 3))
    emit("loader", "CPU ms/img: PNG shards + decode + 1 warp vs original uint8", base / png, None,
         ours_ms=round(png * 1e3, 3), original_ms=round(base * 1e3, 3))
    if device is not None:
        g = med[f"ours: raw shard member, batched {on} warp (B={args.batch})"]
        emit("loader", f"CPU ms/img: raw shards + batched {on} warp vs original on CPU", base / g,
             8 if device.type == "cuda" else None, ours_ms=round(g * 1e3, 3), original_ms=round(base * 1e3, 3),
             wall_ms=round(statistics.median(wall[f"ours: raw shard member, batched {on} warp (B={args.batch})"]) * 1e3,
                           3))
    print(f"ratio original / ours on raw shards (both start from uint8 arrays): {base / raw:.2f}x (target >= 2x)")
    print(f"ratio original / ours on PNG shards (ours also decodes): {base / png:.2f}x")
    print(f"ratio augmentation alone, both from uint8 arrays: "
          f"{base / med['ours augmentation alone (uint8 array -> 1 warp)']:.2f}x")
    if device is not None:
        print(f"ratio original / ours raw shards + batched {on} warp, CPU time per image: {base / g:.2f}x"
              f"{' (target >= 8x)' if device.type == 'cuda' else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
