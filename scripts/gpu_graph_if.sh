#!/usr/bin/env bash
# On the GPU machine, branch graph-if: the IF-node probe (one process per variant), the CUDA tests of the
# one-graph exit decoder with and without device branches, then `mpq bench e2e --early-exit` (rows *_branches4).
# Results land in $OUT. About 9 minutes on an H100; `probe` or `bench` alone fit a call each with room to spare.
#   scripts/gpu_graph_if.sh [all|probe|bench]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-benchmarks/results}
PART=${1:-all}
mkdir -p "$OUT"
if [ "$PART" != bench ]; then
  for v in plain_nvrtc pdl_nvrtc pdl_triton pdl_triton_alloc; do
    timeout 120 python3 scripts/probe_graph_if.py "$OUT/graph-if-$v.json" "$v" > "$OUT/graph-if-$v.log" 2>&1
    echo "probe $v: rc=$?"; grep -v -i warn "$OUT/graph-if-$v.log" | tail -25
  done
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/specee/test_flag_decode.py tests/kernels/test_exit_flag.py \
      2>&1 | tee "$OUT/graph-if-tests.log" | tail -15
fi
if [ "$PART" != probe ]; then
  timeout 500 python3 -m mpq.cli bench e2e --early-exit --trace benchmarks/results/specee-trace-smollm2.json \
      --json "$OUT/specee-e2e.json" 2>&1 | tee "$OUT/specee-bench.log" | tail -30
fi
