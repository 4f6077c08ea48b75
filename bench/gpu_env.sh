# Shared set-up of bench/gpu_smoke.sh and bench/gpu.sh (sourced, not run). After it:
#   ROOT  repository root          PY    the Python to run (env PY, else .venv/bin/python, else python3)
#   DRY   --dry-run or empty       ARGS  the other arguments, passed on to the Python driver
#   MFLAG_BENCH_OUT   figures and logs (kept; env, else a new temporary folder)
#   MFLAG_BENCH_WORK  synthetic data and runs (env, else a new temporary folder; the two scripts reuse
#                     each other's data when they share it, as bench/gpu_all.sh arranges)
# Missing packages are installed from ROOT/.whl into MFLAG_BENCH_WORK/site (bench/gpu_setup.py), which
# is put on PYTHONPATH together with ROOT; the versions in use are printed and written to versions.txt.
# SETUP_STATUS is bench/gpu_setup.py's exit status (non-zero: a required package is missing).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=""
ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then DRY="--dry-run"; else ARGS+=("$arg"); fi
done
if [ -z "${PY:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export MFLAG_BENCH_OUT=${MFLAG_BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mflag-bench-out.XXXXXX")}
export MFLAG_BENCH_WORK=${MFLAG_BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mflag-bench-work.XXXXXX")}
mkdir -p "$MFLAG_BENCH_OUT" "$MFLAG_BENCH_WORK"
export PYTHONPATH="$ROOT:$MFLAG_BENCH_WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
echo "figures and logs: $MFLAG_BENCH_OUT   data and runs: $MFLAG_BENCH_WORK"
SETUP_STATUS=0
"$PY" "$ROOT/bench/gpu_setup.py" --wheels "$ROOT/.whl" --site "$MFLAG_BENCH_WORK/site" --out "$MFLAG_BENCH_OUT" \
    || SETUP_STATUS=$?
