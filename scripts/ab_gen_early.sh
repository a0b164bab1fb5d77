#!/usr/bin/env bash
# Temporary A/B (device): A = the committed epilogue (generation read at the epilogue's start), B = the working tree
# (generation read right after the PDL wait). Alternating runs of gpu_outlier_cost.py, each in its own process.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
rm -rf /tmp/A && cp -r . /tmp/A && cp scripts/ab/gemv_tc_A.py /tmp/A/kernels/gemv_tc.py && cp scripts/ab/splitk_A.py /tmp/A/kernels/splitk.py
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
for r in 1 2; do
  for v in A B; do
    if [ $v = A ]; then d=/tmp/A; else d=$PWD; fi
    (cd $d && python3 scripts/gpu_outlier_cost.py "$OUT/ab-$v$r.json" 3 > "$OUT/ab-$v$r.log" 2>&1)
    echo "$v$r"; python3 -c "
import json,sys; d=json.load(open('$OUT/ab-$v$r.json'))
for s in d['shapes']: print(s['shape'], {k: round(v,2) for k,v in s['median_us'].items()})"
  done
done
