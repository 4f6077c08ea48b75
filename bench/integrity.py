"""What the read-time integrity checks cost (issue 22): train-vision hashes every text-cache shard
(``TextEmbeddingCache.check_files``) and every training tar (``wds.check_shard_files``) once per run
before training; ``cli.py status`` hashes the cache.

Measured on a scaled synthetic cache and shard set (hashing time is linear in the bytes, whatever they
hold), warm page cache (a second read of the same files) and cold where the OS lets us drop the file
from the page cache (``posix_fadvise(DONTNEED)``), then extrapolated to MIMIC-CXR: 227,835 reports at
768 dimensions (CXR-BERT) stored as float16, and 377,110 images at 256 px (PNG ~25 KiB each, raw 64 KiB).

    python bench/integrity.py [--reports 22784] [--shard-mb 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import emit_value  # noqa: E402
from cache import TextEmbeddingCache, write_cache  # noqa: E402
from pipeline.common import file_sha256  # noqa: E402
from pipeline.pretrain import wds  # noqa: E402

MIMIC_REPORTS, MIMIC_IMAGES = 227_835, 377_110
PNG_BYTES, RAW_BYTES = 25 * 1024, 64 * 1024 + 128  # per 256 px image and its tar member headers


def drop_cache(paths) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=MIMIC_REPORTS // 10, help="reports in the scaled cache")
    ap.add_argument("--shard-mb", type=int, default=256, help="MB of synthetic tars")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = [f"{i:08d}" for i in range(args.reports)]
        emb = np.random.default_rng(0).standard_normal((args.reports, 768), dtype=np.float32).astype(np.float16)
        cache = TextEmbeddingCache(write_cache(tmp / "cache", keys, emb, {"fingerprint": "bench"}))
        files = [cache.path / f"part-{i:05d}.h5" for i in range(cache.n_shards)]
        nbytes = sum(f.stat().st_size for f in files)
        drop_cache(files)
        cold = timed(cache.check_files)
        warm = min(timed(cache.check_files) for _ in range(3))
        scale = MIMIC_REPORTS / args.reports
        print(f"text cache: {args.reports} reports, {nbytes / 1e6:.0f} MB: cold {cold:.2f} s, warm {warm:.2f} s "
              f"({nbytes / 1e6 / warm:.0f} MB/s) -> MIMIC {nbytes * scale / 1e6:.0f} MB: cold ~{cold * scale:.1f} s, "
              f"warm ~{warm * scale:.1f} s")
        emit_value("integrity", "text cache check, MIMIC estimate (warm)", warm * scale, "s")

        shards = tmp / "shards"
        shards.mkdir()
        per = 64 << 20
        names, digests = [], {}
        rng = np.random.default_rng(1)
        for i in range(max(1, args.shard_mb * (1 << 20) // per)):
            p = shards / f"train-{i:06d}.tar"
            p.write_bytes(rng.integers(0, 256, per, dtype=np.uint8).tobytes())
            names.append(p.name)
            digests[p.name] = {"count": 1, "bytes": per, "sha256": file_sha256(p)}
        sset = wds.ShardSet(tuple(str(shards / n) for n in names), None, shards, {}, digests, tmp / "manifest.json")
        total = per * len(names)
        drop_cache([shards / n for n in names])
        cold = timed(lambda: wds.check_shard_files(sset, threads=args.threads))
        warm = min(timed(lambda: wds.check_shard_files(sset, threads=args.threads)) for _ in range(3))
        one = min(timed(lambda: wds.check_shard_files(sset, threads=1)) for _ in range(2))
        rate = total / warm
        print(f"image shards: {total / 1e6:.0f} MB: cold {cold:.2f} s, warm {warm:.2f} s ({rate / 1e6:.0f} MB/s with "
              f"{args.threads} threads, {total / one / 1e6:.0f} MB/s with 1)")
        for fmt, per_image in (("png", PNG_BYTES), ("raw", RAW_BYTES)):
            size = MIMIC_IMAGES * per_image
            print(f"  -> MIMIC {fmt} shards {size / 1e9:.1f} GB: ~{size / rate:.0f} s warm, "
                  f"~{size / (total / cold):.0f} s at this disk's cold rate, per run (split over the ranks)")
            emit_value("integrity", f"image shard check, MIMIC {fmt} estimate (warm)", size / rate, "s")


if __name__ == "__main__":
    main()
