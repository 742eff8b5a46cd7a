#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (a GPU machine is lent only now and then):
#   1. tests/gpu: the workflow with weights and minibatches on the GPU;
#   2. benchmarks/bench_training.py and bench_inference.py with --accelerator gpu, against
#      scvi-tools in the same interpreter when it imports (SCVI_PYTHON, default python3);
#   3. the model and analysis tests, whose accelerator="auto" then picks the GPU.
# Logs go to $OUT (default ./gpu_checks_out). Each step has its own time limit, so a slow or
# failing step leaves the others their time.
set -u
OUT=${OUT:-gpu_checks_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SCVI_PYTHON=${SCVI_PYTHON:-$PY}
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1  # SIGTERM may be caught
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
}
nvidia-smi -L
$PY -c "import torch, lightning, anndata; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'anndata', anndata.__version__, 'cuda', torch.cuda.is_available())"
# other versions of third-party packages there may deprecate things: report, do not fail
LENIENT=(-W "default::DeprecationWarning" -W "default::FutureWarning")
step gpu_tests "${GPU_TESTS_S:-170}" $PY -m pytest tests/gpu -q -p no:cacheprovider -rfEs \
    "${LENIENT[@]}"
SCVI_ARG=()
if $SCVI_PYTHON -c "import scvi" >"$OUT/scvi_import.log" 2>&1; then
    SCVI_ARG=(--scvi-python "$SCVI_PYTHON")
else
    echo "scvi-tools does not import; benchmarks run cellvi alone:"; tail -n 5 "$OUT/scvi_import.log"
fi
step bench_training "${BENCH_TRAIN_S:-150}" $PY benchmarks/bench_training.py \
    --accelerator gpu --epochs 3 --rounds 2 --sync-probe "${SCVI_ARG[@]}"
step bench_inference "${BENCH_INF_S:-100}" $PY benchmarks/bench_inference.py \
    --accelerator gpu --epochs 5 --rounds 3 "${SCVI_ARG[@]}"
PARALLEL=()  # pytest-xdist, where installed, runs the suite in 8 processes
$PY -c "import xdist" 2>/dev/null && PARALLEL=(-n 8 -p no:benchmark)
TAIL=40 step suite_on_gpu "${SUITE_S:-110}" $PY -m pytest tests/model tests/analysis -q \
    -p no:cacheprovider --maxfail=15 -rfE "${PARALLEL[@]}" "${LENIENT[@]}"
