#!/usr/bin/env bash
# GPU measurements, one table (bench/gpu_bench.py lists the rows): train-vision images/s and data-wait
# at batch 256 on raw shards (warp on the GPU and in the workers), the training step with cached targets
# vs a frozen BERT-base in the step, embed-text fp16 reports/s, the orthogonality loss, the GPU
# augmentation's CPU cost, and (--compile) train-vision --compile. About 3 minutes on one H100/H200-class
# card, 2 more with --compile (estimated: not yet run on one); run bench/gpu_smoke.sh first
# (bench/gpu_all.sh runs both).
#   bash bench/gpu.sh [--dry-run] [--compile] [--budget SECONDS]
# --dry-run: the same commands on the CPU at toy sizes (the test suite runs it).
# Writes versions.txt, results.jsonl, table.md and gpu.log to $MFLAG_BENCH_OUT (default: a new temporary
# folder); reuses the smoke test's data when $MFLAG_BENCH_WORK is the same folder.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" "$@"
if [ "$SETUP_STATUS" != 0 ]; then
    echo "bench/gpu.sh: setup failed (bench/gpu_setup.py exited $SETUP_STATUS; see above)"
    exit 1
fi
"$PY" "$ROOT/bench/gpu_bench.py" $DRY --out "$MFLAG_BENCH_OUT" --work "$MFLAG_BENCH_WORK" ${ARGS[@]+"${ARGS[@]}"}
