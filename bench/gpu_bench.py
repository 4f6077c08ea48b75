"""GPU measurements in one run, one table: what bench/gpu.sh runs after the smoke test.

Rows, in order (each one a command with its own time limit; a failed or timed-out row is reported and
the rest still run):
  train-vision  images/s and data-wait of real ``cli.py train-vision`` runs on raw shards at batch 256
                (bf16, channels_last, 8 DataLoader workers, cached targets): the warp batched on the GPU
                (--aug-device cuda, the recommended setting) and in the workers (--aug-device cpu)
  train_step    bench/train_step.py: the training step with cached targets vs a frozen BERT-base at 512
                tokens in the step, batch 256
  embed_text    bench/embed_text.py --gpu-only: embed-text reports/s in fp16 vs pad-512 in order
  orth_loss     bench/orth_loss.py: the fused orthogonality loss vs the D x D original (CPU and GPU)
  loader        bench/loader.py: CPU time per image, raw shards + batched GPU warp vs the original
  compile       (last, only with --compile: a minute or two) train-vision --compile images/s after compilation

Figures go to OUT/results.jsonl (one RESULT object per line, as they come), OUT/table.md (rewritten
after every row, so a run cut short still leaves its table) and OUT/gpu.log (every command's output).
``--dry-run``: the same commands on the CPU at toy sizes, --aug-device cpu, compilation disabled by
TORCH_COMPILE_DISABLE=1; the figures mean nothing, the commands are checked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import result_cell  # noqa: E402
from bench.gpu_common import (  # noqa: E402  # noqa: E402
    DRY,
    GPU,
    CommandError,
    Runner,
    Sizes,
    make_cache,
    make_shards,
    make_text_model,
    read_metrics,
    throughput,
)

ROWS = ("train_vision", "train_step", "embed_text", "orth_loss", "loader", "compile")


def results_of(output: str) -> list[dict]:
    return [json.loads(ln[len("RESULT "):]) for ln in output.splitlines() if ln.startswith("RESULT ")]


def format_table(rows: list[dict], machine: list[str], title: str) -> str:
    """A markdown table: benchmark, measure, result (ratio or value), target, the other figures."""
    skip = {"bench", "what", "ratio", "value", "unit", "target"}
    out = [f"### {title}", "", *[f"- {m}" for m in machine], "",
           "| benchmark | measure | result | target | figures |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['bench']} | {r['what']} | **{r['error']}** | | |")
            continue
        target = f">= {r['target']:g}x" if r.get("target") else ""
        figures = ", ".join(f"{k} {v}" for k, v in sorted(r.items()) if k not in skip)
        out.append(f"| {r['bench']} | {r['what']} | {result_cell(r)} | {target} | {figures} |")
    return "\n".join(out) + "\n"


class Bench:
    def __init__(self, out: Path, work: Path, dry: bool, budget: float | None, compile_: bool,
                 only: set[str] | None = None):
        self.out, self.work, self.dry, self.budget, self.compile = out, work, dry, budget, compile_
        self.only = only
        self.s: Sizes = DRY if dry else GPU
        self.device = "cpu" if dry else "cuda"
        self.run = Runner(out / "gpu.log", self.s.timeout, threads=1 if dry else None)
        self.rows: list[dict] = []
        self.t_start = time.monotonic()
        self.machine: list[str] = []

    def record(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        with open(self.out / "results.jsonl", "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        for r in rows:
            print(f"  {r['bench']:<12} {r['what']:<74} {r.get('error') or result_cell(r)}", flush=True)
        self.write_table()

    def write_table(self) -> None:
        title = f"bench/gpu.sh{' --dry-run (CPU, toy sizes: figures mean nothing)' if self.dry else ''}, " \
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
        (self.out / "table.md").write_text(format_table(self.rows, self.machine, title), encoding="utf-8")

    def step(self, name: str, bench: str, what: str, fn) -> None:
        """Run one row's measurement; a failure becomes a row saying so, and the next row runs."""
        if self.only is not None and name not in self.only:
            return
        if self.budget is not None and time.monotonic() - self.t_start > self.budget:
            self.record([{"bench": bench, "what": what, "error": f"not run: the {self.budget:.0f} s budget is spent"}])
            return
        print(f"== {bench}: {what}", flush=True)
        try:
            self.record(fn())
        except CommandError as e:
            self.record([{"bench": bench, "what": what, "error": str(e)[:300]}])

    # ------------------------------------------------------------------ rows
    def data(self) -> None:
        self.prep = make_shards(self.work, self.s, self.run)
        bert = make_text_model(self.work, self.s, self.prep / "reports.jsonl")
        self.cache = make_cache(self.work, self.s, self.run, self.prep / "reports.jsonl", bert,
                                "cpu" if self.dry else "cuda:0")

    def train_vision(self, name: str, aug_device: str, extra: tuple = (), env: dict | None = None,
                     timeout: int | None = None) -> dict:
        s = self.s
        out = self.work / f"bench-{name}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: a finished one would be skipped
        log_every = 1 if self.dry else 10
        self.run.cli("train-vision", "--shards", self.prep, "--text-cache", self.cache, "--out", out,
                     "--batch-size", s.bench_batch, "--max-steps", s.bench_steps, "--num-samples",
                     s.bench_batch * s.bench_steps, "--num-workers", s.bench_workers, "--image-size", s.image,
                     "--crop-size", s.crop, "--aug", "original", "--aug-device", aug_device, "--device", self.device,
                     "--precision", "auto", "--channels-last", "--hidden-dim", s.hidden, "--proj-dim", s.proj,
                     "--log-every", log_every, "--ckpt-every", s.bench_steps, "--keep-checkpoints", 1,
                     "--probe-size", 0, "--seed", 0, *extra, env=env, timeout=timeout)
        rows = [r for r in read_metrics(out) if "train/images_per_s" in r]
        fig = throughput(rows)
        if rows:
            fig["first_window_s"] = round(log_every * s.bench_batch / rows[0]["train/images_per_s"], 1)
        summary = json.loads((out / "summary.json").read_text())
        fig["precision"] = summary["precision"]
        return fig

    def train_rows(self) -> list[dict]:
        s, rows = self.s, []
        gpu_aug = "cpu" if self.dry else "cuda"
        a = self.train_vision("aug-gpu", gpu_aug)
        what = (f"train-vision img/s, batch {s.bench_batch}, raw shards, --aug-device {gpu_aug}, "
                f"{s.bench_workers} workers")
        rows.append({"bench": "train_vision", "what": what, "ratio": None, "value": a["images_per_s"],
                     "unit": "img/s", "target": None, **{k: v for k, v in a.items() if k != "images_per_s"}})
        b = self.train_vision("aug-workers", "cpu")
        rows.append({"bench": "train_vision", "what": what.replace(f"--aug-device {gpu_aug}", "--aug-device cpu"),
                     "ratio": None, "value": b["images_per_s"], "unit": "img/s", "target": None,
                     **{k: v for k, v in b.items() if k != "images_per_s"}})
        rows.append({"bench": "train_vision", "what": f"img/s: --aug-device {gpu_aug} vs cpu (warp in the workers)",
                     "ratio": round(a["images_per_s"] / b["images_per_s"], 3), "target": None,
                     "data_wait": f"{a['data_wait']} vs {b['data_wait']}"})
        return rows

    def compile_row(self) -> list[dict]:
        s = self.s
        env = {"TORCH_COMPILE_DISABLE": "1"} if self.dry else None  # minutes on 2 CPU cores; the flag is checked
        a = self.train_vision("compile", "cpu" if self.dry else "cuda", ("--compile",), env=env,
                              timeout=max(self.s.timeout, 420))
        return [{"bench": "train_vision", "what": f"train-vision --compile img/s after compilation, batch "
                 f"{s.bench_batch}", "ratio": None, "value": a["images_per_s"], "unit": "img/s", "target": None,
                 **{k: v for k, v in a.items() if k != "images_per_s"}}]

    def script(self, *args) -> list[dict]:
        _, out = self.run.run(["python", *args])
        rows = results_of(out)
        if not rows:
            raise CommandError(f"`{' '.join(map(str, args[:2]))}` printed no RESULT line")
        return rows

    def main(self) -> int:
        import torch

        from bench.gpu_setup import describe  # lazy: the driver checks its arguments before importing torch

        if not self.dry and not torch.cuda.is_available():
            print("bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU")
            return 1
        self.machine = describe()
        (self.out / "results.jsonl").write_text("")
        s, dev = self.s, self.device
        try:
            self.data()
        except CommandError as e:
            print(f"bench/gpu.sh: cannot make the synthetic data: {e}")
            return 1
        self.step("train_vision", "train_vision", "train-vision throughput", self.train_rows)
        if self.dry:
            ts = ["--device", dev, "--precision", "fp32", "--batch", s.bench_batch, "--steps", 1, "--size", 32,
                  "--tokens", 16, "--report-tokens", 8]
            et = ["--quick", "--gpu-only", "--device", dev, "--gpu-reports", 48]
            ol = ["--quick", "--dim", 64]
            ld = ["--quick", "--device", dev]
        else:
            ts = ["--device", dev, "--precision", "bf16", "--batch", s.bench_batch, "--steps", 5]
            et = ["--gpu-only", "--device", dev, "--gpu-reports", 20000]
            ol = ["--rounds", 5]
            ld = ["--rounds", 3, "--device", dev]
        self.step("train_step", "train_step", "training step, cached targets vs online BERT-base",
                  lambda: self.script("bench/train_step.py", *ts))
        self.step("embed_text", "embed_text", "embed-text reports/s", lambda: self.script("bench/embed_text.py", *et))
        self.step("orth_loss", "orth_loss", "orthogonality loss fwd+bwd",
                  lambda: self.script("bench/orth_loss.py", *ol))
        self.step("loader", "loader", "augmentation CPU time per image", lambda: self.script("bench/loader.py", *ld))
        if self.compile or (self.only and "compile" in self.only):
            self.step("compile", "train_vision", "train-vision --compile", self.compile_row)
        errors = [r for r in self.rows if "error" in r]
        print()
        print((self.out / "table.md").read_text(encoding="utf-8"))
        print(f"bench/gpu.sh: {len(self.rows) - len(errors)} figures, {len(errors)} rows failed, "
              f"{time.monotonic() - self.t_start:.0f} s; table in {self.out / 'table.md'}")
        return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("MFLAG_BENCH_OUT", "bench-out")),
                    help="folder for results.jsonl, table.md and gpu.log [$MFLAG_BENCH_OUT]")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("MFLAG_BENCH_WORK", "bench-work")),
                    help="folder for the synthetic data and runs [$MFLAG_BENCH_WORK]")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the same commands as on the GPU")
    ap.add_argument("--compile", action="store_true", help="add the train-vision --compile row (a minute or two)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no further row starts [240 on the GPU, none in a dry run]")
    ap.add_argument("--only", default=None, help=f"comma-separated rows to run, of {','.join(ROWS)}")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(ROWS):
        ap.error(f"--only: unknown rows {sorted(only - set(ROWS))}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (None if args.dry_run else 240.0)
    return Bench(args.out.resolve(), args.work.resolve(), args.dry_run, budget, args.compile, only).main()


if __name__ == "__main__":
    sys.exit(main())
