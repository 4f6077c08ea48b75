"""Reports/s of embed-text's embedding path vs the original approach, side by side in one run.

Original approach (M-FLAG research code): every report padded to 512 tokens, original order, no
deduplication. Ours (``pipeline.text.embedding.embed_texts``): distinct texts once, sorted by length,
each batch padded to its longest member, tokenization in a background thread, inference_mode.
Both use the same randomly initialised BERT-base-shaped encoder (BertConfig defaults: 12 layers,
768 hidden) on the same synthetic reports with MIMIC-like lengths (median ~60 words, long tail past
300, ~20% duplicates). The original's cost per report does not depend on the text (all are 512
tokens), so it is timed on the first ``--baseline-reports`` reports to keep the run short.

    python bench/embed_text.py            # ~3 min on a busy 2-core CPU (BERT-base, 160 reports)
    python bench/embed_text.py --quick    # smoke run: small model, few reports
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._result import emit  # noqa: E402
from pipeline.text.embedding import embed_texts  # noqa: E402
from pipeline.text.models import TextEncoder, random_bert, train_wordpiece_tokenizer  # noqa: E402

VOCAB = ("the heart size is normal mediastinal and hilar contours are unremarkable lungs are clear "
         "without focal consolidation pleural effusion or pneumothorax there is mild bibasilar "
         "atelectasis small left effusion unchanged from prior radiograph endotracheal tube "
         "terminates cm above the carina nasogastric catheter courses below diaphragm right "
         "internal jugular central venous line tip projects over cavoatrial junction moderate "
         "pulmonary edema cardiomegaly retrocardiac opacity may reflect pneumonia aspiration "
         "degenerative changes thoracic spine no acute cardiopulmonary process comparison "
         "interval improvement worsening bilateral interstitial markings hyperinflated").split()
NORMAL = "No acute cardiopulmonary process."


def synthetic_reports(n: int, seed: int = 0) -> list[str]:
    """Lengths lognormal (median ~60 words overall, ~1% past 300 words); ~20% exact repeats."""
    rng = random.Random(seed)
    out: list[str] = []
    for _i in range(n):
        if out and rng.random() < 0.2:
            out.append(NORMAL if rng.random() < 0.5 else rng.choice(out))
            continue
        words = min(700, max(3, int(rng.lognormvariate(np.log(66), 0.75))))
        text = " ".join(rng.choice(VOCAB) for _ in range(words))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def original_approach(enc: TextEncoder, texts: list[str], batch_size: int, device: str) -> np.ndarray:
    """The research code's path: pad every report to 512, original order, one forward per batch."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            b = enc.tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True,
                              max_length=512, return_tensors="pt")
            out.append(enc.pool(b["input_ids"].to(device), b["attention_mask"].to(device), "cls").cpu())
    return torch.cat(out).numpy()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and few reports (smoke run)")
    ap.add_argument("--reports", type=int, default=None, help="reports for our path [160; quick 60]")
    ap.add_argument("--baseline-reports", type=int, default=None, help="reports for the original [20; quick 12]")
    ap.add_argument("--batch-size", type=int, default=8, help="original approach's batch size")
    ap.add_argument("--gpu-reports", type=int, default=20000, help="reports for the device run (CUDA fp16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="device of the fp16 throughput run [cuda when available, else none]; bench/gpu.sh "
                         "--dry-run passes cpu (then in fp32, at toy sizes)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU comparison (bench/gpu.sh)")
    ap.add_argument("--budget", type=int, default=None, help="token budget of the device run [65536 CUDA, 8192 CPU]")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.reports or (60 if args.quick else 160)
    n_base = min(n, args.baseline_reports or (12 if args.quick else 20))
    shape = (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
             if args.quick else {})  # {}: BertConfig defaults = BERT-base

    texts = synthetic_reports(max(n, args.gpu_reports if args.device else 0))
    # A small WordPiece vocabulary splits the words like BERT's does MIMIC text (~1.3 tokens/word).
    tokenizer = train_wordpiece_tokenizer(texts[:2000], vocab_size=345)
    model = random_bert(tokenizer, seed=0, **shape).eval().requires_grad_(False)
    enc = TextEncoder(model=model, tokenizer=tokenizer, model_id="bench", revision="random",
                      config_hash="", tokenizer_hash="", hidden_size=model.config.hidden_size,
                      max_positions=model.config.max_position_embeddings)
    lengths = np.array([len(ids) for ids in tokenizer(texts[:n])["input_ids"]])
    words = np.array([len(t.split()) for t in texts[:n]])
    print(f"model: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; threads {torch.get_num_threads()}")
    print(f"reports: {n} (words median {np.median(words):.0f}, max {words.max()}; tokens median "
          f"{np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, >512: {(lengths > 512).sum()}; "
          f"distinct {len(set(texts[:n]))})")

    if not args.gpu_only:
        _cpu_comparison(enc, texts, n, n_base, args)
    if args.device:
        _device_run(enc, texts[:args.gpu_reports], args.device, args.budget)


def _device_run(enc: TextEncoder, g: list[str], device: str, budget: int | None) -> None:
    """fp16 reports/s on ``device`` (a GPU: float32 on the CPU), ours against the pad-512 original."""
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    label = f"{dev.type.upper() if dev.type == 'cuda' else 'CPU'} {'fp16' if dtype == torch.float16 else 'fp32'}"
    budget = budget or (65536 if dev.type == "cuda" else 8192)
    enc.to(dev, dtype)
    embed_texts(enc, g[:2000], max_length=512, token_budget=budget, device=device)  # warm-up
    _, t_ours = timed(embed_texts, enc, g, max_length=512, token_budget=budget, device=device)
    gb = g[:2048]
    original_approach(enc, gb[:64], 64, device)
    _, t_base = timed(original_approach, enc, gb, 64, device)
    ours, base = len(g) / t_ours, len(gb) / t_base
    print(f"{label} original: {base:10.0f} reports/s ({len(gb)} reports, batch 64)")
    print(f"{label} embed-text: {ours:10.0f} reports/s ({len(g)} reports, {name})")
    print(f"{label} speed-up: {ours / base:.2f}x")
    emit("embed_text", f"{label} reports/s: embed-text vs pad-512", ours / base, None, ours=round(ours),
         original=round(base), device=name)
    emit("embed_text", f"{label} reports/s of embed-text against the 5,000/s target", ours / 5000, 1,
         ours=round(ours))


def _cpu_comparison(enc, texts, n, n_base, args) -> None:
    device = "cpu"
    embed_texts(enc, texts[:8], max_length=512, token_budget=8192, device=device)  # warm-up
    (ours_emb, _), t_ours = timed(embed_texts, enc, texts[:n], max_length=512, token_budget=8192,
                                  device=device)
    base_emb, t_base = timed(original_approach, enc, texts[:n_base], args.batch_size, device)
    diff = np.abs(ours_emb[:n_base] - base_emb).max()
    r_ours, r_base = n / t_ours, n_base / t_base
    print(f"CPU fp32  original (pad 512, in order, no dedupe): {r_base:8.2f} reports/s "
          f"({n_base} reports, {t_base:.1f} s)")
    print(f"CPU fp32  embed-text (sort, pad to batch max, dedupe): {r_ours:8.2f} reports/s "
          f"({n} reports, {t_ours:.1f} s)")
    print(f"speed-up: {r_ours / r_base:.2f}x   (max |difference| of embeddings {diff:.2e})")
    emit("embed_text", "CPU reports/s: embed-text vs pad-512, in order, no dedupe", r_ours / r_base, 4,
         ours=round(r_ours, 2), original=round(r_base, 2))


if __name__ == "__main__":
    main()
