#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the M = 1 decode GEMV of each 7B step shape (scripts/gpu_gemv_ncu.py);
# full reports in $OUT/ncu_<shape>.txt, the headline metrics printed. ncu locks clocks to base, so its durations
# are longer than graph-timed ones; read it for occupancy, stalls and throughput, not for time.
# Arguments: the shapes to profile, each optionally with a tensor-core configuration (default: the four with their
# table rows), e.g. `scripts/gpu_ncu_probe.sh qkv qkv:tc:4:1`.
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-.}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats
   --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(qkv o gate_up down)
for v in "${shapes[@]}"; do
  shape=${v%%:*}
  cfg=$([ "$v" != "$shape" ] && echo "${v#*:}")
  name=$(echo "$v" | tr ':' '_')
  timeout 150 "$NCU" -k regex:'gemv_h2|gemv_tc' --launch-skip 3 --launch-count 1 $S \
      python3 scripts/gpu_gemv_ncu.py $shape $cfg > "$OUT/ncu_$name.txt" 2>&1
  echo "== $v (rc $?)"
  grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Issue Slots Busy|Waves Per SM|Warp Cycles Per Issued|No Eligible|L1/TEX Hit|Mem Busy|Max Bandwidth|stalled waiting" "$OUT/ncu_$name.txt" | cut -c1-240
done
