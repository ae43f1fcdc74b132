#!/usr/bin/env bash
# Everything issues 4 and 19 ask of the GPU machine, in one call (device time is scarce: one start, one run):
#   bench/gpu_all.sh [WORK_DIR]        # WORK_DIR (default /tmp/bnb-gpu) gets the generated checkpoints
# Needs bitsandbytes 0.50.2 and transformers importable; PYTHON picks the interpreter (default python3).
# Each section prints its own table; a failing section does not stop the next.
set -u
py=${PYTHON:-python3}
work=${1:-/tmp/bnb-gpu}
cd "$(dirname "$0")/.." || exit 2
status=0
section() {
    echo "== $1"
    shift
    "$@" || status=1
}
section "GPU tests" "$py" -m pytest -q -m gpu tests/
section "CUDA kernels vs bitsandbytes" "$py" bench/bench_kernels_cuda.py
section "GPU stage on each set of GPUs" "$py" bench/bench_devices_cuda.py "$work/dev" --layers 8
section "bnb quantize vs transformers, end to end" "$py" bench/bench_quantize_cuda.py "$work/e2e"
section "bnb eval on the 8B-shaped checkpoint (issue 19)" "$py" bench/bench_eval_cuda.py "$work/e2e"
exit $status
