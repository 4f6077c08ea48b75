"""What bench/gpu_smoke.py and bench/gpu_bench.py share: sizes, a command runner that logs and times out,
and the synthetic data both use (made once per work folder, reused by the other script).

The data are the tool's own: ``cli.py synth mimic`` -> ``cli.py prepare mimic --format raw`` (the shard
format recommended for GPU training), a small BERT built from the synthetic reports and saved in fp16,
and ``cli.py embed-text`` with it in fp16 on the device. Each step leaves a ``.done`` marker holding its
settings, so a second script (or a rerun) skips what is already there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.text.models import build_tiny_bert, quiet_transformers

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the GPU scripts use; ``DRY`` holds the toy sizes of ``--dry-run`` on the CPU."""

    studies: int  # synthetic MIMIC studies (about 2/3 of them give a frontal training image)
    image: int  # shard image size
    crop: int  # training crop
    shard: int  # images per shard
    workers: int  # DataLoader workers and drawing processes
    batch: int  # smoke-test training batch
    hidden: int  # projector hidden size
    proj: int  # projection size
    probe: int  # held-out probe images
    bert_hidden: int
    bert_layers: int
    max_length: int  # report tokens
    chexpert: int  # synthetic CheXpert images for the eval check
    eval_epochs: int
    smoke_steps: int  # smoke-test training steps (the resumed run)
    smoke_every: int  # its checkpoint interval (killed before the second checkpoint)
    bench_batch: int  # gpu.sh: train-vision and train-step batch
    bench_steps: int  # gpu.sh: train-vision steps per throughput run
    bench_workers: int  # gpu.sh: DataLoader workers of the throughput runs
    timeout: int  # seconds for one command


GPU = Sizes(studies=400, image=256, crop=224, shard=24, workers=4, batch=32, hidden=2048, proj=1024, probe=32,
            bert_hidden=256, bert_layers=4, max_length=128, chexpert=120, eval_epochs=2, smoke_steps=6,
            smoke_every=2, bench_batch=256, bench_steps=60, bench_workers=8, timeout=150)
DRY = Sizes(studies=48, image=48, crop=32, shard=4, workers=2, batch=4, hidden=64, proj=32, probe=8,
            bert_hidden=32, bert_layers=2, max_length=64, chexpert=40, eval_epochs=2, smoke_steps=3,
            smoke_every=1, bench_batch=4, bench_steps=3, bench_workers=2, timeout=900)


class CommandError(Exception):
    """A command exited with an unexpected status or ran out of time; the message says which and why."""


class Runner:
    """Runs commands from the repository root with the scripts' environment, appends each command's
    output to one log file, and kills the whole process group (DataLoader workers included) on timeout."""

    def __init__(self, log_path: Path, timeout: int, threads: int | None = None):
        self.log_path, self.timeout = log_path, timeout
        self.env = dict(os.environ)
        if threads:  # dry runs: a busy 2-core machine runs a CPU step ~5x slower with 2 OpenMP threads than with 1
            self.env["OMP_NUM_THREADS"] = str(threads)
        paths = [str(ROOT)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))

    def run(self, args: list, *, expect: int | None = 0, timeout: int | None = None,
            env: dict | None = None) -> tuple[int, str]:
        """Run ``args`` (``python`` is this interpreter); returns (exit status, output). Raises
        CommandError when the status is not ``expect`` (None: any) or on timeout."""
        cmd = [sys.executable if a == "python" else str(a) for a in args]
        limit = timeout or self.timeout
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        secs = time.monotonic() - t0
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n# exit {proc.returncode}, {secs:.1f} s"
                     f"{' (timed out)' if timed_out else ''}\n{out}")
        short = " ".join(str(a) for a in args[:4])
        if timed_out:
            raise CommandError(f"`{short} ...` timed out after {limit} s")
        if expect is not None and proc.returncode != expect:
            raise CommandError(f"`{short} ...` exited {proc.returncode} (expected {expect}): {last_error(out)}")
        return proc.returncode, out

    def cli(self, *args, **kw) -> tuple[int, str]:
        return self.run(["python", "cli.py", *args], **kw)


def last_error(output: str) -> str:
    """The most telling line of a failed command's output: the last error or exception line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


def tail(output: str, n: int = 25) -> str:
    return "\n".join(output.splitlines()[-n:])


def _done(folder: Path, settings: dict) -> bool:
    marker = folder / ".done"
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _clear(*folders: Path) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _mark(folder: Path, settings: dict) -> None:
    (folder / ".done").write_text(json.dumps(settings, sort_keys=True))


def make_shards(work: Path, s: Sizes, run: Runner) -> Path:
    """synth mimic -> prepare --format raw; returns the prepare folder (shards, reports.jsonl)."""
    mimic, prep = work / "mimic", work / "prepare"
    settings = {"studies": s.studies, "image": s.image, "shard": s.shard}
    if not _done(prep, settings):
        _clear(mimic, prep)  # made with other sizes (or cut short): synth refuses a folder of another world
        run.cli("synth", "mimic", "--out", mimic, "--n", s.studies, "--image-size", s.image, "--workers", s.workers)
        run.cli("prepare", "mimic", "--root", mimic, "--out", prep, "--format", "raw", "--size", s.image,
                "--shard-size", s.shard, "--workers", s.workers, "--force")
        _mark(prep, settings)
    return prep


def make_text_model(work: Path, s: Sizes, reports: Path) -> Path:
    """A small BERT learnt from the synthetic reports' words, saved with ``save_pretrained`` in fp16
    (as some published checkpoints are), so that fp16 loading is exercised by embed-text and online mode."""
    folder = work / "bert-fp16"
    settings = {"hidden": s.bert_hidden, "layers": s.bert_layers, "max_length": s.max_length}
    if _done(folder, settings):
        return folder
    _clear(folder)
    from transformers import BertModel


    texts = [json.loads(line)["text"] for line in reports.read_text(encoding="utf-8").splitlines() if line.strip()]
    build_tiny_bert(texts, folder, hidden=s.bert_hidden, layers=s.bert_layers, heads=max(2, s.bert_hidden // 64),
                    vocab_size=2000, max_position=max(64, s.max_length))
    with quiet_transformers():
        BertModel.from_pretrained(folder).half().save_pretrained(folder)
    _mark(folder, settings)
    return folder


def make_cache(work: Path, s: Sizes, run: Runner, reports: Path, model: Path, device: str) -> Path:
    """embed-text in fp16 on ``device``; returns the cache root (``--text-cache`` accepts it)."""
    out = work / "embed"
    settings = {"model": str(model), "device": device, "max_length": s.max_length}
    if not _done(out, settings):
        _clear(out)
        run.cli("embed-text", "--reports", reports, "--out", out, "--model", model, "--dtype", "fp16",
                "--device", device, "--max-length", s.max_length, "--shard-size", 200)
        _mark(out, settings)
    return out


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def throughput(rows: list[dict], skip: int = 1) -> dict:
    """Median images/s and data-wait share of the logged windows after the first ``skip`` (warm-up:
    worker start, cuDNN autotuning, compilation)."""
    import statistics

    train = [r for r in rows if "train/images_per_s" in r]
    use = train[skip:] or train
    if not use:
        return {}
    return {"images_per_s": round(statistics.median(r["train/images_per_s"] for r in use), 1),
            "data_wait": round(statistics.median(r["train/data_wait"] for r in use), 4),
            "windows": len(use)}
