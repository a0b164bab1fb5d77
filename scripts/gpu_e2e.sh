#!/usr/bin/env bash
# On the GPU machine: the decode engine's CUDA spot-check (tests/runtime/test_engine_cuda.py), then `mpq bench e2e`.
# Results land in $OUT (the device tool's folder) or benchmarks/results/ when run by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv | tee "$OUT/e2e-gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_engine_cuda.py 2>&1 | tee "$OUT/e2e-spotcheck.log"
python3 -m mpq.cli bench e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e-bench.log"
