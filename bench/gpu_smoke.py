"""GPU smoke test: every CUDA path of the tool once, on synthetic data, in a few minutes on one GPU.

Run it through ``bench/gpu_smoke.sh`` (which installs missing packages from ``.whl/`` and prints the
versions in use). The checks, in order (each names the command lines it runs in OUT/smoke.log):

  data          synth mimic -> prepare --format raw
  text-model    a small BERT saved in fp16 with save_pretrained
  embed-text    --dtype fp16 --device cuda:0; embeddings finite and close to a float32 CPU pass
  train-bf16    bf16 (--precision auto) + channels_last + --aug-device cuda, SIGKILLed right before its second
                checkpoint, then resumed: steps 1..N logged once each, finite losses, a torchvision encoder.pt
  train-fp16    --precision fp16 (GradScaler; its state is in the checkpoint)
  train-online  --text-mode online with the fp16 checkpoint and --unfreeze-last 1: float32 text weights
  no-sync       steady-state steps (GPU augmentation, bf16 step, NaN watch) under
                torch.cuda.set_sync_debug_mode("error"): no host synchronisation between log steps
  device-check  --device cuda:99 gives one 'error: --device ...' line and exit 2 (train-vision, embed-text)
  pytest-cuda   the test suite's tests marked ``cuda`` (skipped on CPU machines)
  eval-cls      cli.py eval --task cls (linear probe) on a synthetic CheXpert, on the GPU
  compile       only with --compile: train-vision --compile

The last line is ``GPU SMOKE: PASS`` or ``GPU SMOKE: FAIL (<check>: <reason>; ...)``; the exit status
is 0 or 1. ``--dry-run`` runs the same commands on the CPU at toy sizes (the test suite does, so a
wrong flag, import or path is caught before GPU time is spent); only the sizes, the device and the
device-bound flag values differ (--device cpu, --aug-device cpu, --precision fp16 -> fp32; --precision
auto is bf16 on CUDA and fp32 on the CPU).
OUT/smoke.json holds each check's status, seconds and figures; OUT/smoke.log every command's output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    tail,
    throughput,
)


class CheckFailed(Exception):
    """A check's outcome is wrong; the message is the reason shown on the FAIL line."""


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


class Smoke:
    """The checks and what they share (sizes, device, paths, the runner)."""

    def __init__(self, out: Path, work: Path, dry: bool, compile_: bool):
        self.out, self.work, self.dry = out, work, dry
        self.s: Sizes = DRY if dry else GPU
        self.device = "cpu" if dry else "cuda"
        self.embed_device = "cpu" if dry else "cuda:0"  # cuda:N: the explicit-index path
        self.aug_device = "cpu" if dry else "cuda"
        # auto: bf16 on CUDA, fp32 on the CPU (where bf16 is emulated and 100x slower); fp16 needs CUDA.
        self.fp16 = "fp32" if dry else "fp16"
        self.run = Runner(out / "smoke.log", self.s.timeout, threads=1 if dry else None)
        self.paths: dict[str, Path] = {}
        self.checks = [("data", self.data, ()), ("text-model", self.text_model, ("data",)),
                       ("embed-text", self.embed_text, ("text-model",)),
                       ("train-bf16", self.train_bf16, ("embed-text",)),
                       ("train-fp16", self.train_fp16, ("embed-text",)),
                       ("train-online", self.train_online, ("text-model",)),
                       ("no-sync", self.no_sync, ()), ("device-check", self.device_check, ("embed-text",)),
                       ("pytest-cuda", self.pytest_cuda, ()), ("eval-cls", self.eval_cls, ("train-bf16",))]
        if compile_:
            self.checks.append(("compile", self.compile, ("embed-text",)))

    def fresh(self, name: str) -> Path:
        """A run folder emptied first: a rerun of the smoke test in the same work folder checks anew
        (the data are reused; a finished run would be skipped by the tool)."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ data
    def data(self) -> dict:
        prep = self.paths["prepare"] = make_shards(self.work, self.s, self.run)
        sizes = json.loads((prep / "shards" / "sizes.json").read_text())
        train = {k: v for k, v in sizes.items() if k.startswith("train-")}
        need(len(train) >= self.s.bench_workers, f"{len(train)} training shards, the benchmarks need "
                                                 f"{self.s.bench_workers}")
        return {"train_images": sum(train.values()), "train_shards": len(train)}

    def text_model(self) -> dict:
        self.paths["bert"] = make_text_model(self.work, self.s, self.paths["prepare"] / "reports.jsonl")
        from safetensors import safe_open

        with safe_open(str(self.paths["bert"] / "model.safetensors"), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        need(dtypes == {"F16"}, f"saved weights are {dtypes}, expected F16")
        return {"hidden": self.s.bert_hidden, "layers": self.s.bert_layers}

    def embed_text(self) -> dict:
        import numpy as np
        import torch

        reports = self.paths["prepare"] / "reports.jsonl"
        t0 = time.perf_counter()
        root = self.paths["embed"] = make_cache(self.work, self.s, self.run, reports, self.paths["bert"],
                                                self.embed_device)
        secs = time.perf_counter() - t0
        from cache import TextEmbeddingCache  # lazy: an import error fails this check only
        from pipeline.text.embedding import embed_texts  # lazy: an import error fails this check only
        from pipeline.text.models import load_text_model  # lazy: an import error fails this check only

        cache = TextEmbeddingCache(root)
        rows = [json.loads(ln) for ln in reports.read_text().splitlines() if ln.strip()]
        need(cache.attrs.get("dtype") == "fp16", f"cache dtype {cache.attrs.get('dtype')!r}, expected fp16")
        keys = [r["study_id"] for r in rows if r["text"].strip()][:64]
        got = cache.lookup(keys)
        need(bool(np.isfinite(got).all()), "non-finite embeddings in the cache")
        ref_enc = load_text_model(str(self.paths["bert"]), "cls", device="cpu", dtype=torch.float32)
        texts = {r["study_id"]: r["text"] for r in rows}
        ref, _ = embed_texts(ref_enc, [texts[k] for k in keys], max_length=self.s.max_length, device="cpu")
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        need(float(cos.min()) > 0.999, f"fp16 embeddings differ from float32 ones (min cosine {cos.min():.5f})")
        return {"reports": len(cache), "seconds_with_startup": round(secs, 1),
                "min_cosine_vs_fp32": round(float(cos.min()), 6)}

    # ------------------------------------------------------------------ training
    def train_args(self, out: Path, steps: int, ckpt_every: int, precision: str = "auto",
                   text: str = "cache", device: str | None = None) -> list:
        s = self.s
        args = ["train-vision", "--shards", self.paths["prepare"], "--out", out, "--batch-size", s.batch,
                "--max-steps", steps, "--num-samples", s.batch * steps, "--num-workers", s.workers,
                "--image-size", s.image, "--crop-size", s.crop, "--aug", "original", "--aug-device", self.aug_device,
                "--device", device or self.device, "--precision", precision, "--channels-last",
                "--hidden-dim", s.hidden,
                "--proj-dim", s.proj, "--lr", "1e-4", "--log-every", 1, "--ckpt-every", ckpt_every,
                "--probe-every", steps, "--probe-size", s.probe, "--shuffle-buffer", 4 * s.batch, "--seed", 0]
        if text == "cache":
            args += ["--text-cache", self.paths["embed"]]
        else:
            args += ["--text-mode", "online", "--text-model", self.paths["bert"], "--reports",
                     self.paths["prepare"] / "reports.jsonl", "--unfreeze-last", 1, "--text-max-length", s.max_length]
        return args

    @staticmethod
    def finished(out: Path, steps: int) -> dict:
        """Checks every finished run gets: summary, one metrics line per step, finite losses."""
        summary = json.loads((out / "summary.json").read_text())
        need(summary["steps"] == steps, f"{out.name}: summary says {summary['steps']} steps, expected {steps}")
        rows = [r for r in read_metrics(out) if "train/loss" in r]
        need([r["step"] for r in rows] == list(range(1, steps + 1)),
             f"{out.name}: metrics steps {[r['step'] for r in rows]}, expected 1..{steps} once each")
        need(all(math.isfinite(r["train/loss"]) for r in rows), f"{out.name}: non-finite loss in metrics.jsonl")
        return {**throughput(rows), "loss_first": round(rows[0]["train/loss"], 4),
                "loss_last": round(rows[-1]["train/loss"], 4), "precision": summary["precision"]}

    def train_bf16(self) -> dict:
        import torch
        import torchvision

        out, steps, every = self.fresh("train-bf16"), self.s.smoke_steps, self.s.smoke_every
        args = self.train_args(out, steps, every)
        # Killed as it is about to write its second checkpoint: the resume starts from the first.
        code, _ = self.run.run(["python", "bench/train_killed.py", 2 * every, *args], expect=None)
        need(code == -signal.SIGKILL, f"the run to be killed exited {code} before its second checkpoint")
        ck = torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
        need(ck["step"] == every, f"latest.pt after the kill is step {ck['step']}, expected {every}")
        if self.aug_device == "cuda":
            need(bool(ck.get("augmenter")) and ck["augmenter"][0] is not None,
                 "no GPU augmenter state in the checkpoint")
        need(not (out / "encoder.pt").exists(), "encoder.pt exists after the kill")
        self.run.cli(*args, "--resume", "auto")
        figures = self.finished(out, steps)
        want = "fp32" if self.dry else "bf16"
        need(figures["precision"] == want, f"--precision auto ran in {figures['precision']}, expected {want}")
        sd = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)
        missing, unexpected = torchvision.models.resnet50().load_state_dict(sd, strict=False)
        need(sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected,
             f"encoder.pt does not load into torchvision's resnet50 (missing {missing[:3]}, "
             f"unexpected {unexpected[:3]})")
        self.paths["encoder"] = out / "encoder.pt"
        return figures

    def train_fp16(self) -> dict:
        import torch

        out, steps = self.fresh("train-fp16"), self.s.smoke_steps
        self.run.cli(*self.train_args(out, steps, steps, precision=self.fp16))
        figures = self.finished(out, steps)
        need(figures["precision"] == self.fp16, f"ran in {figures['precision']}, asked for {self.fp16}")
        if self.fp16 == "fp16":
            scaler = torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["scaler"]
            need(math.isfinite(float(scaler.get("scale", float("nan")))) and scaler["scale"] > 0,
                 f"GradScaler state in the checkpoint: {scaler}")
            figures["grad_scale"] = float(scaler["scale"])
        return figures

    def train_online(self) -> dict:
        import torch

        out, steps = self.fresh("train-online"), self.s.smoke_steps
        self.run.cli(*self.train_args(out, steps, steps, text="online"))
        figures = self.finished(out, steps)
        state = torch.load(out / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["model"]
        text = {k: v.dtype for k, v in state.items() if k.startswith("text.encoder.") and v.is_floating_point()}
        need(bool(text) and set(text.values()) == {torch.float32},
             f"text encoder weights in the checkpoint: {sorted(set(map(str, text.values())))}, expected float32")
        return figures

    def compile(self) -> dict:
        out, steps = self.fresh("train-compile"), self.s.smoke_steps
        env = {"TORCH_COMPILE_DISABLE": "1"} if self.dry else None  # compiling ResNet50 on 2 CPU cores takes minutes
        self.run.cli(*self.train_args(out, steps, steps), "--compile", env=env, timeout=max(self.s.timeout, 300))
        return self.finished(out, steps)

    # ------------------------------------------------------------------ in-process and error paths
    def no_sync(self) -> dict:
        """A steady-state step as train-vision runs it, under CUDA's sync debug mode set to "error": a
        blocking copy or a read of a device value between log steps raises and names the operation."""
        import torch

        from pipeline.pretrain.augment import Augmenter  # lazy: an import error fails this check only
        from pipeline.pretrain.step import (  # lazy: an import error fails this check only
            NonFiniteWatch,
            StepSettings,
            TrainModule,
            prepare_images,
            train_step,
        )
        from pipeline.vision.models import MFlagVision  # lazy: an import error fails this check only

        s, dev = self.s, torch.device(self.device)
        if dev.type == "cpu":
            torch.set_num_threads(1)  # as the Runner's OMP_NUM_THREADS=1 for the dry run's commands
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        vision = MFlagVision(64, s.proj, "mlp", "random", s.hidden)
        vision.trunk.to(memory_format=torch.channels_last)
        module = TrainModule(vision).to(dev)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler(dev.type, enabled=False)
        aug = Augmenter("original", device=dev, seed=0, out_size=s.crop)
        settings = StepSettings(autocast_dtype=torch.bfloat16 if dev.type == "cuda" else None)  # as --precision auto
        images = torch.randint(0, 256, (s.batch, 1, s.image, s.image), dtype=torch.uint8)
        target = torch.randn(s.batch, 64)
        if dev.type == "cuda":  # as the DataLoader hands them over (pin_memory=True)
            images, target = images.pin_memory(), target.pin_memory()
        watch = NonFiniteWatch(dev)

        def step():
            x = prepare_images(images, aug, dev, True)
            out = train_step(module, opt, scaler, x, target.to(dev, non_blocking=True), settings)
            watch.update(out)

        for _ in range(2):  # warm-up: cuDNN autotuning, allocator, pinned pool
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        t0 = time.perf_counter()
        try:
            for _ in range(3):
                step()
        except RuntimeError as e:
            raise CheckFailed(f"a host synchronisation inside the training step: {str(e).splitlines()[0][:300]}") from e
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        need(watch.first_bad() is None, f"non-finite loss at step {watch.first_bad()}")
        return {"images_per_s": round(3 * s.batch / secs, 1), "batch": s.batch}

    def device_check(self) -> dict:
        _, out = self.run.cli(*self.train_args(self.fresh("train-badgpu"), 1, 1, device="cuda:99"), expect=2)
        need("error: --device" in out and "cuda:99" in out, f"train-vision said: {out.strip().splitlines()[-1:]}")
        need(not (self.work / "train-badgpu").exists(), "train-vision wrote its output folder before the device check")
        _, out2 = self.run.cli("embed-text", "--reports", self.paths["prepare"] / "reports.jsonl", "--out",
                               self.fresh("embed-badgpu"), "--model", self.paths["bert"], "--device", "cuda:99",
                               expect=2)
        need("error: --device" in out2 and "cuda:99" in out2, f"embed-text said: {out2.strip().splitlines()[-1:]}")
        need(not (self.work / "embed-badgpu").exists(), "embed-text wrote its output folder before the device check")
        return {"message": out.strip().splitlines()[-1][:160]}

    def pytest_cuda(self) -> dict:
        _, out = self.run.run(["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                               "tests/test_cuda_paths.py", "tests/test_augment.py"])
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if not self.dry:
            need("passed" in last and "skipped" not in last, f"CUDA tests did not all run: {last}")
        return {"result": last.strip("= ")}

    def eval_cls(self) -> dict:
        s = self.s
        chexpert, out = self.work / "chexpert", self.fresh("eval-cls")
        if not (chexpert / "train.csv").is_file():
            self.run.cli("synth", "chexpert", "--out", chexpert, "--n", s.chexpert, "--image-size", s.image,
                         "--workers", s.workers)
        self.run.cli("eval", "--task", "cls", "--dataset", "chexpert", "--root", chexpert, "--init",
                     self.paths["encoder"], "--out", out, "--device", self.device, "--epochs", s.eval_epochs,
                     "--batch-size", s.batch, "--image-size", s.crop, "--workers", s.workers, "--seeds", 0)
        res = json.loads((out / "results.json").read_text())
        summary = res.get("summary", {})
        means = {k: v.get("mean") for k, v in summary.items() if isinstance(v, dict)}
        need(bool(means) and all(isinstance(m, (int, float)) and math.isfinite(m) for m in means.values()),
             f"results.json summary {summary}")
        return {k: round(v, 4) for k, v in means.items()}

    # ------------------------------------------------------------------ driver
    def main(self, budget: float | None) -> int:
        import torch

        t_start = time.monotonic()
        results: list[dict] = []
        status: dict[str, str] = {}
        if not self.dry and not torch.cuda.is_available():
            print("GPU SMOKE: FAIL (no CUDA device: torch.cuda.is_available() is False; --dry-run runs on the CPU)")
            return 1
        print(f"GPU smoke test{' (dry run on the CPU, toy sizes)' if self.dry else ''}: device {self.device}, "
              f"work {self.work}, log {self.out / 'smoke.log'}", flush=True)
        for name, fn, deps in self.checks:
            t0 = time.monotonic()
            rec = {"name": name, "status": "pass", "seconds": 0.0, "figures": {}, "reason": ""}
            blocked = [d for d in deps if status.get(d) != "pass"]
            if blocked:
                rec.update(status="skipped", reason=f"needs {', '.join(blocked)}")
            elif budget is not None and t0 - t_start > budget:
                rec.update(status="fail", reason=f"not started: the {budget:.0f} s budget is spent")
            else:
                try:
                    rec["figures"] = fn() or {}
                except (CheckFailed, CommandError) as e:
                    rec.update(status="fail", reason=str(e))
                except Exception as e:  # a bug in the check or the tool: keep going, name it
                    rec.update(status="fail", reason=f"{type(e).__name__}: {e}")
                    with open(self.out / "smoke.log", "a", encoding="utf-8") as fh:
                        fh.write(f"\n# {name}: {traceback.format_exc()}")
            rec["seconds"] = round(time.monotonic() - t0, 1)
            status[name] = rec["status"]
            results.append(rec)
            shown = ", ".join(f"{k}={v}" for k, v in rec["figures"].items())
            print(f"[{rec['status']:>7}] {name:<13} {rec['seconds']:6.1f} s  {rec['reason'] or shown}", flush=True)
            if rec["status"] == "fail":
                log = (self.out / "smoke.log").read_text(encoding="utf-8") if (self.out / "smoke.log").is_file() else ""
                print("          last lines of smoke.log:\n" + tail(log, 15), flush=True)
        failed = [r for r in results if r["status"] != "pass"]
        total = round(time.monotonic() - t_start, 1)
        summary = {"dry_run": self.dry, "device": self.device, "seconds": total, "checks": results,
                   "result": "fail" if failed else "pass"}
        (self.out / "smoke.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"{len(results) - len(failed)} of {len(results)} checks passed in {total:.0f} s")
        suffix = " (dry run on the CPU)" if self.dry else ""
        if failed:
            what = "; ".join(f"{r['name']}: {r['reason'][:160]}" for r in failed)
            print(f"GPU SMOKE: FAIL ({what}){suffix}")
            return 1
        print(f"GPU SMOKE: PASS{suffix}")
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("MFLAG_BENCH_OUT", "bench-out")),
                    help="folder for smoke.json and smoke.log [$MFLAG_BENCH_OUT]")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("MFLAG_BENCH_WORK", "bench-work")),
                    help="folder for the synthetic data and runs [$MFLAG_BENCH_WORK]")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the same commands as on the GPU")
    ap.add_argument("--compile", action="store_true", help="also check train-vision --compile (a minute or two)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no further check starts [240 on the GPU, none in a dry run]")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (None if args.dry_run else 240.0)
    return Smoke(args.out.resolve(), args.work.resolve(), args.dry_run, args.compile).main(budget)


if __name__ == "__main__":
    sys.exit(main())
