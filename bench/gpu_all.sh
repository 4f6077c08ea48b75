#!/usr/bin/env bash
# One prepared call for a borrowed GPU: bench/gpu_smoke.sh, then bench/gpu.sh on the same data (the
# measurements run even when a smoke check fails; the exit status is 1 if either failed).
#   bash bench/gpu_all.sh [--dry-run]
# Under the device tool: MFLAG_BENCH_OUT=$OUT bash bench/gpu_all.sh, carrying .whl (README, "GPU machines").
set -uo pipefail
dry=()
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then dry=(--dry-run); else echo "bench/gpu_all.sh: unknown argument $arg" >&2; exit 2; fi
done
export MFLAG_BENCH_WORK=${MFLAG_BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mflag-bench-work.XXXXXX")}
export MFLAG_BENCH_OUT=${MFLAG_BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mflag-bench-out.XXXXXX")}
here=$(dirname "${BASH_SOURCE[0]}")
smoke=0
bash "$here/gpu_smoke.sh" ${dry[@]+"${dry[@]}"} || smoke=$?
bench=0
bash "$here/gpu.sh" ${dry[@]+"${dry[@]}"} || bench=$?
echo "bench/gpu_all.sh: smoke exit $smoke, measurements exit $bench; figures and logs in $MFLAG_BENCH_OUT"
[ "$smoke" = 0 ] && [ "$bench" = 0 ]
