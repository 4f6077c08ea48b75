"""One M-FLAG training step with cached report embeddings vs the original online step.

Both sides run ``pipeline.pretrain.step.train_step`` (forward, alignment + orthogonality losses,
backward, AdamW step) on the same ResNet50 + projectors, the same batch and 224 px images. The online
side also runs a frozen BERT-base-shaped encoder (random init, 12 layers, 768 hidden) on reports
padded to 512 tokens inside the step, as the original code does; the cached side reads a (B, 768)
embedding instead. Steps of the two sides alternate so that machine load affects both alike.

    python bench/train_step.py            # batch 8, 3 timed steps each (~2-3 min on a 2-core CPU)
    python bench/train_step.py --quick    # smoke run: batch 2, 1 timed step each
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
from pipeline.pretrain.step import StepSettings, TrainModule, train_step  # noqa: E402
from pipeline.text.models import OnlineTextEncoder  # noqa: E402
from pipeline.vision.models import MFlagVision  # noqa: E402


def make_side(text_dim: int, online: OnlineTextEncoder | None, device: torch.device, seed: int):
    torch.manual_seed(seed)
    vision = MFlagVision(text_dim, 1024, "mlp", "random").to(device)
    vision.trunk.to(memory_format=torch.channels_last)
    module = TrainModule(vision, online).to(device)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return module, opt, scaler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--tokens", type=int, default=512, help="padded report length of the online side")
    ap.add_argument("--report-tokens", type=int, default=120, help="real (non-pad) tokens per report")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="autocast dtype [bf16 on CUDA, fp32 on CPU]")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 timed step")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.steps = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    settings = StepSettings(autocast_dtype=torch.bfloat16 if precision == "bf16" else None)

    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = BertModel(BertConfig(), add_pooling_layer=False)  # BERT-base shape: 110M parameters
    text = OnlineTextEncoder(bert, tokenizer=None, max_length=args.tokens, pooling="cls").to(device)
    dim = text.dim
    cached = make_side(dim, None, device, 0)
    online = make_side(dim, text, device, 0)

    g = torch.Generator().manual_seed(0)
    b = args.batch
    images = torch.randn(b, 3, args.size, args.size, generator=g).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randn(b, dim, generator=g).to(device)
    ids = torch.randint(1000, bert.config.vocab_size, (b, args.tokens), generator=g)
    mask = torch.zeros(b, args.tokens, dtype=torch.long)
    mask[:, : args.report_tokens] = 1
    ids[mask == 0] = bert.config.pad_token_id
    tokens = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
              "token_type_ids": torch.zeros_like(ids).to(device)}

    def timed(side, tgt) -> float:
        module, opt, scaler = side
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = train_step(module, opt, scaler, images, tgt, settings)
        out["loss"].item()  # wait for the step
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    n_vision = sum(p.numel() for p in cached[0].parameters() if p.requires_grad)
    print(f"device {device} ({torch.get_num_threads()} threads), precision {precision}, batch {b}, "
          f"{args.size} px, online text: BERT-base shape ({sum(p.numel() for p in bert.parameters()) / 1e6:.0f}M "
          f"params, frozen) at {args.tokens} padded tokens; trainable {n_vision / 1e6:.1f}M on both sides")
    timed(cached, target)  # warm-up (allocator, kernels)
    timed(online, tokens)
    t_cached, t_online = [], []
    for i in range(args.steps):
        t_cached.append(timed(cached, target))
        t_online.append(timed(online, tokens))
        print(f"  step {i + 1}: cached {t_cached[-1]:.3f} s   online {t_online[-1]:.3f} s", flush=True)
    # On a shared machine load only ever adds time, so the best of N is the usual estimate of a
    # step's own cost (timeit's convention); the median of the paired ratios is printed as well.
    bc, bo = min(t_cached), min(t_online)
    paired = statistics.median(o / c for c, o in zip(t_cached, t_online))
    print(f"cached-target step: best {bc:.3f} s ({b / bc:.1f} img/s), median {statistics.median(t_cached):.3f} s")
    print(f"online-text step:   best {bo:.3f} s ({b / bo:.1f} img/s), median {statistics.median(t_online):.3f} s")
    print(f"ratio online/cached: {bo / bc:.2f}x (best of {args.steps}); median of paired steps {paired:.2f}x")
    emit("train_step",
         f"{device.type} {precision} step, batch {b}, {args.size} px: cached vs online BERT-base@{args.tokens}",
         paired, 3 if device.type == "cpu" else 6, cached_img_s=round(b / statistics.median(t_cached), 2),
         online_img_s=round(b / statistics.median(t_online), 2), best_ratio=round(bo / bc, 3))


if __name__ == "__main__":
    main()
