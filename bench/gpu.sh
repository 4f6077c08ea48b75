#!/usr/bin/env bash
# One-shot GPU benchmark, sized to finish within about 8 minutes on one H100-class GPU (not yet run on one);
# prints one table.
#   train-vision images/s: cached targets vs the online frozen text encoder (bf16, channels_last,
#     batch 256 at 224 px); embed-text reports/s (fp16, BERT-base shape); the orthogonality loss fused
#     vs the original formulation; augmentation CPU cost with the warp on the GPU.
# Paste the table into the README's Benchmarks section with the name of the card it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
log=$(mktemp)
run() { echo "== $*" >&2; "$PY" "$@" | tee -a "$log"; }
run bench/train_step.py --device cuda --precision bf16 --batch 256 --steps 5
run bench/embed_text.py --gpu-only --gpu-reports 20000
run bench/orth_loss.py --rounds 5
run bench/loader.py --rounds 3
echo
echo "bench/gpu.sh results ($(date -u +%F)):"
grep '^RESULT ' "$log" | sed 's/^RESULT //' | "$PY" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    t = f">= {r[\"target\"]:g}x" if r.get("target") else ""
    extra = {k: v for k, v in r.items() if k not in ("bench", "what", "ratio", "target")}
    print(f"{r[\"bench\"]:<11} {r[\"what\"]:<78} {r[\"ratio\"]:>8.2f}x {t:>7}  {extra}")'
