"""Fused orthogonality loss vs the original D x D formulation: forward + backward, side by side.

Shapes: D=2048 with B=512 and B=128 (the Gram branch), on the CPU and, when available, on CUDA.
Rounds alternate the two implementations so machine load hits both alike; the median counts.

    python bench/orth_loss.py [--quick] [--rounds 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import emit  # noqa: E402
from pipeline.pretrain.losses import orthogonality_loss, orthogonality_loss_reference  # noqa: E402


def step(fn, z: torch.Tensor) -> None:
    z.grad = None
    fn(z).backward()


def time_once(fn, z: torch.Tensor, reps: int) -> float:
    sync = torch.cuda.synchronize if z.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        step(fn, z)
    sync()
    return (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 repetition")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="forward+backward passes per timed round")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (torch.set_num_threads); 1 is steadiest on a shared machine")
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 2, 1
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"orthogonality loss, forward+backward, D={args.dim}, lam=0.0051, {args.rounds} rounds x {args.reps} "
          f"reps, CPU threads {args.threads}")
    print(f"{'device':6s} {'B':>5s} {'original ms':>12s} {'fused ms':>9s} {'ratio':>7s}  check")
    worst = float("inf")
    for device in devices:
        for b in (512, 128):
            torch.manual_seed(0)
            z = torch.randn(b, args.dim, device=device).requires_grad_(True)
            # Same value and gradient before timing anything.
            step(orthogonality_loss_reference, z)
            g_ref = z.grad.clone()
            v_ref = orthogonality_loss_reference(z).item()
            step(orthogonality_loss, z)
            v = orthogonality_loss(z).item()
            rel_g = ((z.grad - g_ref).norm() / g_ref.norm()).item()
            check = f"value rel {abs(v - v_ref) / abs(v_ref):.1e}, grad rel {rel_g:.1e}"
            ref_t, fused_t = [], []
            for _ in range(args.rounds):
                ref_t.append(time_once(orthogonality_loss_reference, z, args.reps))
                fused_t.append(time_once(orthogonality_loss, z, args.reps))
            r, f = statistics.median(ref_t), statistics.median(fused_t)
            if device == "cpu":
                worst = min(worst, r / f)
            print(f"{device:6s} {b:5d} {r * 1e3:12.3f} {f * 1e3:9.3f} {r / f:6.1f}x  {check}")
            emit("orth_loss", f"{device} fwd+bwd B={b} D={args.dim}: fused vs D x D original", r / f,
                 4 if device == "cpu" else None, fused_ms=round(f * 1e3, 3), original_ms=round(r * 1e3, 3))
    print(f"ratio original / fused on the CPU, worst of B=512 and B=128: {worst:.1f}x (target >= 4x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
