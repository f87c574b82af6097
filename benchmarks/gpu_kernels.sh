#!/usr/bin/env bash
# Every GPU measurement of the Ben Graham kernels in one go (~10 min on an H100), for a session with a lent GPU:
# the GPU tests, the error sweep on real tensor cores, and the throughput sweep. Results land in RESULTS_DIR
# (default benchmarks/results; on the device tool pass "$OUT" and copy them back into the repo).
#   bash benchmarks/gpu_kernels.sh [RESULTS_DIR] [NAME]      NAME defaults to h100
# Needs torch + triton; DALI (for the DALI chain row), pytest and the rest are optional: missing ones are
# reported and skipped. tltrain is installed without dependencies when it is not importable yet.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
name=${2:-h100}
mkdir -p "$results"
export PYTHONUNBUFFERED=1

if ! python3 -c "import tltrain.kernels" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/tltrain-site . || exit 1
    export PYTHONPATH=/tmp/tltrain-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$results/gpu_$name.txt"

status=0
if python3 -c "import pytest" 2>/dev/null; then
    python3 -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$results/kernel_gpu_tests_$name.log"
    status=$((status || PIPESTATUS[0]))
else
    echo "pytest missing: GPU tests skipped" | tee "$results/kernel_gpu_tests_$name.log"
fi
python3 benchmarks/kernel_errors.py --batch 8 --out "$results/kernel_errors_$name.json" || status=1
python3 benchmarks/bench_kernels.py --sweep --quiet-wait 20 --out "$results/kernels_$name.json" || status=1
exit $status
