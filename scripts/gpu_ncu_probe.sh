#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the M = 1 decode GEMV of each 7B step shape (scripts/gpu_gemv_ncu.py);
# full reports in $OUT/ncu_<shape>.txt, the headline metrics printed. ncu locks clocks to base, so its durations
# are longer than graph-timed ones; read it for occupancy, stalls and throughput, not for time.
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-.}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats
   --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
for v in qkv o gate_up down; do
  timeout 150 "$NCU" -k regex:gemv_h2 --launch-skip 3 --launch-count 1 $S python3 scripts/gpu_gemv_ncu.py $v \
      > "$OUT/ncu_$v.txt" 2>&1
  echo "== $v (rc $?)"
  grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Issue Slots Busy|Waves Per SM|Warp Cycles Per Issued|No Eligible" "$OUT/ncu_$v.txt"
done
