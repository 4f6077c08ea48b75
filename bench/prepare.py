"""Benchmark the prepare image path on 2048x2048 JPEGs: reduced-scale (draft) decoding vs full decoding.

Both sides run the same per-image work as a prepare worker (decode, border crop, resize, min-max,
PNG encode) on the same files, interleaved round by round so machine load hits both alike. Prints
images/s for each side, the ratio (target >= 3x) and how far the two outputs differ.

    python bench/prepare.py            # 24 images x 3 rounds
    python bench/prepare.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.imaging import load_for_shard  # noqa: E402
from stages.prepare import PNG_LEVEL  # noqa: E402


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


def prepare_one(path: Path, size: int, draft: bool) -> tuple[np.ndarray, bytes]:
    arr, _ = load_for_shard(path, size, crop_border=True, draft=draft)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return arr, buf.getvalue()


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
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 images, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 4, 1

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(Path(tmp), args.n, args.side, args.noise)
        bpp = 8 * sum(p.stat().st_size for p in paths) / (len(paths) * args.side ** 2)
        for p in paths[:2]:  # warm the page cache and code paths for both sides
            prepare_one(p, args.size, True), prepare_one(p, args.size, False)
        times = {True: 0.0, False: 0.0}
        outputs: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for r in range(args.rounds):
            for draft in ((True, False) if r % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                res = [prepare_one(p, args.size, draft)[0] for p in paths]
                times[draft] += time.perf_counter() - t0
                if r == 0:
                    outputs[draft] = res
        # Decode alone at both scales: libjpeg's Huffman decoding is the same at every scale, so it
        # bounds what reduced-scale decoding can gain; printing it shows where the time goes.
        dec = {True: 0.0, False: 0.0}
        for draft in (True, False):
            t0 = time.perf_counter()
            for p in paths:
                decode_only(p, args.size if draft else None)
            dec[draft] = (time.perf_counter() - t0) / args.n
        n_total = args.n * args.rounds
        fast, slow = n_total / times[True], n_total / times[False]
        diff = float(np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                              for a, b in zip(outputs[True], outputs[False])]))
    print(f"prepare image path, {args.n} JPEGs {args.side}x{args.side} -> {args.size}x{args.size} PNG, "
          f"{args.rounds} interleaved rounds, 1 process; inputs {bpp:.2f} bits/pixel")
    print(f"  full decode + resize     : {slow:8.1f} images/s")
    print(f"  reduced-scale (draft)    : {fast:8.1f} images/s")
    print(f"  speed-up                 : {fast / slow:8.2f}x  (target >= 3x)")
    print(f"  mean |draft - full|      : {diff:8.2f} grey levels (of 255)")
    print(f"  JPEG decode alone        : full {1000 * dec[False]:.1f} ms, reduced {1000 * dec[True]:.1f} ms per image;"
          f" whole full path {1000 / slow:.1f} ms")
    print(f"  bound from entropy decoding (full path / reduced decode): {(1 / slow) / dec[True]:.2f}x")


if __name__ == "__main__":
    main()
