#!/usr/bin/env bash
# Everything the issues ask of the GPU machine (device time is scarce: few starts, few calls):
#   bench/gpu_all.sh [WORK_DIR] [SECTION ...]   # WORK_DIR (default /tmp/bnb-gpu) gets the generated checkpoints
# SECTIONs (default: all, in this order): table tests kernels devices e2e e2e-int8 eval startup
#   table     the planner table against this machine's transformers/diffusers (recorded in checked_with when
#             every entry agrees, so that the runs after it use the table); the sections below need it first
#   tests     the GPU tests;  kernels  CUDA kernels vs bitsandbytes;  devices  the GPU stage on each set of GPUs
#   e2e       bnb quantize vs transformers end to end, nf4-dq;  e2e-int8  the same, int8
#   eval      bnb eval on the 8B-shaped checkpoint;  startup  where the start of a run goes
# Needs bitsandbytes 0.50.2 and transformers importable; PYTHON picks the interpreter (default python3).
# Each section prints its own table; a failing section does not stop the next.
set -u
py=${PYTHON:-python3}
work=${1:-/tmp/bnb-gpu}
shift || true
sections=${*:-table tests kernels devices e2e e2e-int8 eval startup}
cd "$(dirname "$0")/.." || exit 2
status=0
section() {
    echo "== $1"
    shift
    "$@" || status=1
}
for name in $sections; do
    case $name in
    table) section "planner table vs this machine's libraries" "$py" scripts/make_planner_table.py --check-only --record ;;
    tests) section "GPU tests" "$py" -m pytest -q -m gpu tests/ ;;
    kernels) section "CUDA kernels vs bitsandbytes" "$py" bench/bench_kernels_cuda.py ;;
    devices) section "GPU stage on each set of GPUs" "$py" bench/bench_devices_cuda.py "$work/dev" --layers 8 ;;
    e2e) section "bnb quantize vs transformers, end to end, nf4-dq" "$py" bench/bench_quantize_cuda.py "$work/e2e" ;;
    e2e-int8) section "bnb quantize vs transformers, end to end, int8" "$py" bench/bench_quantize_cuda.py "$work/e2e" --scheme int8 ;;
    eval) section "bnb eval on the 8B-shaped checkpoint" "$py" bench/bench_eval_cuda.py "$work/e2e" ;;
    startup) section "start-up probe" "$py" bench/bench_startup.py "$work/e2e/llama8b-shaped-32L" ;;
    *) echo "unknown section $name"; status=2 ;;
    esac
done
exit $status
