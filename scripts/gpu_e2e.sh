#!/usr/bin/env bash
# On the GPU machine: the CUDA spot-checks of the decode engine, the quantized matmuls and the exit machinery, then
# `mpq bench e2e` and the trace-driven `mpq bench e2e --early-exit`. Results land in $OUT (the device tool's folder)
# or benchmarks/results/ when run by hand.
#   scripts/gpu_e2e.sh [all|engine|exits]
# all (default) takes ~13 minutes on an H100, more than one device call's 10: there, run `engine` (the tests and
# `mpq bench e2e`) and `exits` (`mpq bench e2e --early-exit`) as two calls.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PART=${1:-all}
case "$PART" in all|engine|exits) ;; *) echo "usage: $0 [all|engine|exits]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv | tee "$OUT/e2e-gpu.txt"
if [ "$PART" != exits ]; then
  python3 -m pytest -q -p no:cacheprovider tests/runtime/test_engine_cuda.py tests/kernels/test_exit_predictor.py \
      tests/specee/test_decode.py tests/specee/test_train_e2e.py tests/kernels/test_decode_attention.py \
      tests/kernels/test_step_ops.py tests/kernels/test_mixed_kernels.py::test_dispatch \
      tests/kernels/test_exit_flag.py tests/specee/test_flag_decode.py \
      tests/kernels/test_mixed_kernels.py::test_tc_config_takes_bf16_x 2>&1 | tee "$OUT/e2e-spotcheck.log"
  python3 -m mpq.cli bench e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e-bench.log"
fi
if [ "$PART" != engine ]; then
  python3 -m mpq.cli bench e2e --early-exit --trace benchmarks/results/specee-trace-smollm2.json \
      --json "$OUT/specee-e2e.json" 2>&1 | tee "$OUT/specee-bench.log"
fi
