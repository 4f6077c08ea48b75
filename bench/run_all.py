"""Run every CPU benchmark and print one table of ratios (this tool against the original approach).

Each benchmark measures both sides in one run and prints ``RESULT`` lines (bench/_result.py); this
script runs them one after another (never in parallel: they would disturb each other), collects the
lines and prints the table with the machine it ran on. ``--quick`` passes ``--quick`` to each
(smoke run, numbers not meaningful). Extra output of each benchmark goes to ``--log``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import result_cell  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHES = ["prepare.py", "embed_text.py", "orth_loss.py", "train_step.py", "loader.py"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run of each benchmark")
    ap.add_argument("--only", nargs="*", choices=BENCHES, help="run only these")
    ap.add_argument("--log", default=None, help="file for the benchmarks' full output")
    args = ap.parse_args()
    rows, failed = [], []
    log = open(args.log, "w") if args.log else None
    for name in args.only or BENCHES:
        cmd = [sys.executable, str(HERE / name)] + (["--quick"] if args.quick else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        secs = time.monotonic() - t0
        if log:
            log.write(f"===== {' '.join(cmd)} ({secs:.0f} s, exit {proc.returncode})\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                rows.append({**json.loads(line[7:]), "seconds": round(secs)})
    print(f"machine: {machine()}")
    print(f"{'benchmark':<16} {'measure':<64} {'ratio':>8} {'target':>8}")
    for r in rows:
        target = f">= {r['target']:g}x" if r.get("target") else ""
        print(f"{r['bench']:<16} {r['what']:<64} {result_cell(r):>8} {target:>8}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
