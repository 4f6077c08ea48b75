#!/usr/bin/env bash
# GPU smoke test: every CUDA path of the tool once on synthetic data (bench/gpu_smoke.py lists the
# checks), a few minutes on one GPU; the last line is "GPU SMOKE: PASS" or "GPU SMOKE: FAIL (...)".
#   bash bench/gpu_smoke.sh [--dry-run] [--compile] [--budget SECONDS]
# --dry-run: the same commands on the CPU at toy sizes (the test suite runs it).
# Installs missing packages from .whl/ (bench/gpu_setup.py), prints the versions in use, and writes
# versions.txt, smoke.json and smoke.log to $MFLAG_BENCH_OUT (default: a new temporary folder); data and
# runs go to $MFLAG_BENCH_WORK (default: a new temporary folder). README, "GPU machines", has more.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" "$@"
if [ "$SETUP_STATUS" != 0 ]; then
    echo "GPU SMOKE: FAIL (setup: bench/gpu_setup.py exited $SETUP_STATUS; see above)"
    exit 1
fi
"$PY" "$ROOT/bench/gpu_smoke.py" $DRY --out "$MFLAG_BENCH_OUT" --work "$MFLAG_BENCH_WORK" ${ARGS[@]+"${ARGS[@]}"}
