"""One decode-GEMV shape of the 7B step, launched 4 times (no graph), for Nsight Compute to profile the 4th launch
(scripts/gpu_ncu_probe.sh): python scripts/gpu_gemv_ncu.py {qkv,o,gate_up,down} [tc:SPLIT:UNROLL] (the table's row,
or the tensor-core GEMV with that configuration)."""

import sys

import torch

from kernels.dispatch import TENSOR_ORDER, KernelConfig, mixed_matmul
from mpq.bench.kernels import random_layer

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}

n, k = SHAPES[sys.argv[1]]
layer = random_layer(n, k, 1, "cuda", seed=1)
tensors = tuple(getattr(layer, t) for t in TENSOR_ORDER)
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
counters = torch.zeros(16 * n // 16, dtype=torch.int32, device="cuda")
config = None
if len(sys.argv) > 2:
    _, split, unroll = sys.argv[2].split(":")
    config = KernelConfig("tc", split=int(split), unroll=int(unroll))
for _ in range(4):
    mixed_matmul(x, tensors, group_size=128, outliers=1, counters=counters, config=config)
torch.cuda.synchronize()
