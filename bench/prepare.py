"""Benchmark the prepare image path on 2048x2048 JPEGs: reduced-scale (draft) decoding vs full decoding.

Both sides run the same per-image work as a prepare worker (decode, border crop, resize, min-max,
PNG encode) on the same files, interleaved round by round so machine load hits both alike. The
baseline is prepare's own full-decode path: full decode, crop, one Lanczos resize. A third side,
full decode + Pillow's two-step resize (``reducing_gap``), shows what the fastest fair full-decode
path would give. Prints images/s for each, the ratio (target >= 3x) and how far the outputs differ,
on the benchmark inputs and on real anatomy (``--real``: radiographs enlarged to the input size).

    python bench/prepare.py                # 24 images x 3 rounds, PNG output (prepare's default)
    python bench/prepare.py --format raw   # .npy output: no encode cost on either side
    python bench/prepare.py --quick        # smoke run

Entropy (Huffman) decoding costs the same at every scale and dominates the decode of radiograph
JPEGs (about 1.6 bits per pixel), so "full path / reduced decode alone" bounds the speed-up.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import emit  # noqa: E402
from pipeline.corpora.shards import encode_image  # noqa: E402
from pipeline.imaging import RESAMPLE, UPSAMPLE_TOLERANCE, crop_zero_border, load_for_shard, minmax_uint8, read_image  # noqa: E402


def make_inputs(folder: Path, n: int, side: int, noise: float = 2.3, seed: int = 0) -> list[Path]:
    """``n`` chest-like 8-bit JPEGs: smooth anatomy-scale structure, film-grain noise, black border.

    Entropy decoding dominates JPEG decode time, so the noise level matters: the default gives about
    1.6 bits per pixel at quality 95, the density of MIMIC-CXR-JPG (about 570 GB for 377k images of
    roughly 2500 x 3000 pixels).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    paths = []
    for k in range(n):
        body = np.exp(-(((xx - 0.5) / 0.38) ** 4 + ((yy - 0.55) / 0.45) ** 4))
        lungs = sum(np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.45) / 0.25) ** 2)) for cx in (0.33, 0.67))
        ribs = 0.08 * np.sin(40 * yy + 6 * np.abs(xx - 0.5) + rng.uniform(0, 6))
        img = 40 + 170 * body - 90 * lungs * body + 30 * ribs * body
        img += rng.normal(0, noise, (side, side)).astype(np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        b = int(rng.integers(20, 80))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
        p = folder / f"img{k:03d}.jpg"
        Image.fromarray(img).save(p, quality=95)
        paths.append(p)
    return paths


def prepare_one(path: Path, size: int, mode: str, fmt: str = "png") -> tuple[np.ndarray, bytes]:
    """One prepare worker step; ``mode``: draft (prepare), full (baseline) or gap (two-step resize)."""
    if mode == "gap":
        a = crop_zero_border(read_image(path))
        arr = minmax_uint8(np.asarray(Image.fromarray(a).resize((size, size), RESAMPLE, reducing_gap=3.0)))
    else:
        arr, _ = load_for_shard(path, size, crop_border=True, draft=mode == "draft")
    return arr, encode_image(arr, fmt)


def real_inputs(folder: Path, real: Path, side: int, noise: float, seed: int = 1) -> list[Path]:
    """Real radiographs (``real``/*.png, *.jpg) enlarged to ``side`` with grain, with and without a
    black border, as quality probes: their anatomy keeps the edges that smooth phantoms lack."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, src in enumerate(sorted(p for p in real.iterdir() if p.suffix.lower() in (".png", ".jpg"))):
        big = np.asarray(Image.fromarray(read_image(src)).resize((side, side), RESAMPLE), dtype=np.float32)
        for b in (0, side // 50):
            img = np.clip(big + rng.normal(0, noise, big.shape), 0, 255).astype(np.uint8)
            if b:
                img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
            p = folder / f"real{k:02d}-b{b}.jpg"
            Image.fromarray(img).save(p, quality=95)
            paths.append(p)
    return paths


def mean_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b)]))


def decode_only(path: Path, size: int | None) -> None:
    with Image.open(path) as im:
        if size:
            im.draft("L", (size, size))
        im.load()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="number of input images")
    ap.add_argument("--side", type=int, default=2048, help="input image side in pixels")
    ap.add_argument("--size", type=int, default=256, help="output size (prepare --size)")
    ap.add_argument("--noise", type=float, default=2.3, help="grain sigma (sets the JPEG bits per pixel)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per side")
    ap.add_argument("--format", choices=("png", "raw"), default="png",
                    help="shard image encoding, as prepare --format (raw: no encode cost)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 images, 1 round")
    default_real = Path(__file__).resolve().parents[2] / "shared" / "realcxr"
    ap.add_argument("--real", type=Path, default=default_real if default_real.is_dir() else None,
                    help="folder of real radiographs for the quality probe (default: ../shared/realcxr if present)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 4, 1

    modes = ("draft", "full", "gap")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(Path(tmp), args.n, args.side, args.noise)
        bpp = 8 * sum(p.stat().st_size for p in paths) / (len(paths) * args.side ** 2)
        for p in paths[:2]:  # warm the page cache and code paths for every side
            for m in modes:
                prepare_one(p, args.size, m, args.format)
        times = dict.fromkeys(modes, 0.0)
        outputs: dict[str, list[np.ndarray]] = {}
        for r in range(args.rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                t0 = time.perf_counter()
                res = [prepare_one(p, args.size, m, args.format)[0] for p in paths]
                times[m] += time.perf_counter() - t0
                if r == 0:
                    outputs[m] = res
        # Decode alone at both scales: libjpeg's Huffman decoding is the same at every scale, so it
        # bounds what reduced-scale decoding can gain; printing it shows where the time goes.
        dec = {True: 0.0, False: 0.0}
        for draft in (True, False):
            t0 = time.perf_counter()
            for p in paths:
                decode_only(p, args.size if draft else None)
            dec[draft] = (time.perf_counter() - t0) / args.n
        real = []
        if args.real is not None and args.real.is_dir():
            for p in real_inputs(Path(tmp), args.real, args.side, args.noise)[:4 if args.quick else None]:
                real.append([prepare_one(p, args.size, m)[0] for m in modes])
        n_total = args.n * args.rounds
        rate = {m: n_total / times[m] for m in modes}
    print(f"prepare image path, {args.n} JPEGs {args.side}x{args.side} -> {args.size}x{args.size} {args.format}, "
          f"{args.rounds} interleaved rounds, 1 process; inputs {bpp:.2f} bits/pixel")
    print(f"  full decode + resize     : {rate['full']:8.1f} images/s  (baseline: one Lanczos resize)")
    print(f"  full decode + 2-step     : {rate['gap']:8.1f} images/s  (Lanczos with reducing_gap=3)")
    print(f"  reduced-scale (draft)    : {rate['draft']:8.1f} images/s  (upsample tolerance {UPSAMPLE_TOLERANCE:.0%})")
    emit("prepare", f"images/s, {args.side} px JPEG -> {args.size} {args.format}: reduced-scale vs full decode",
         rate["draft"] / rate["full"], 3, ours=round(rate["draft"], 1), original=round(rate["full"], 1))
    print(f"  speed-up                 : {rate['draft'] / rate['full']:8.2f}x  (target >= 3x); "
          f"{rate['draft'] / rate['gap']:.2f}x over the 2-step resize")
    print(f"  mean |draft - full|      : {mean_abs(outputs['draft'], outputs['full']):8.2f} grey levels (of 255); "
          f"2-step vs full {mean_abs(outputs['gap'], outputs['full']):.2f}")
    if real:
        print(f"  same on real anatomy     : {mean_abs([r[0] for r in real], [r[1] for r in real]):8.2f} grey levels; "
              f"2-step vs full {mean_abs([r[2] for r in real], [r[1] for r in real]):.2f} "
              f"({len(real)} radiographs from {args.real}, enlarged, half with a border)")
    print(f"  JPEG decode alone        : full {1000 * dec[False]:.1f} ms, reduced {1000 * dec[True]:.1f} ms per image;"
          f" whole full path {1000 / rate['full']:.1f} ms, whole draft path {1000 / rate['draft']:.1f} ms")
    print(f"  bound from entropy decoding (full path / reduced decode): {(1 / rate['full']) / dec[True]:.2f}x")


if __name__ == "__main__":
    main()
