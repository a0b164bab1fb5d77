#!/usr/bin/env bash
# On the GPU machine, branch next-gpu (temporary): the CUDA checks of the ragged stack and of the split linears'
# own side streams, then scripts/gpu_ragged_probe.py. Then, as a second call, `scripts/gpu_e2e.sh exits` (the live
# decoder's branched rows) and, if both hold, `scripts/gpu_e2e.sh engine`. Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/next-gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mixed_kernels.py -k "ragged" 2>&1 | tail -3 \
    | tee "$OUT/next-ragged-tests.log"
python3 -m pytest -q -p no:cacheprovider tests/specee/test_flag_decode.py tests/runtime/test_engine_cuda.py 2>&1 \
    | tail -3 | tee "$OUT/next-decoder-tests.log"
python3 scripts/gpu_ragged_probe.py 2>&1 | grep -v -i warn | tee "$OUT/next-ragged-probe.log"
