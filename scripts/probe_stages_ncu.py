"""Temporary probe (device, under ncu): one launch each of the register-prefetch and the staged tensor-core GEMV."""
import sys

import torch

from kernels import KernelConfig, mixed_matmul
from kernels.dispatch import TENSOR_ORDER
from mpq.bench import kernels as bench

n, k = 11008, 4096
layer = bench.random_layer(n, k, 1, "cuda", seed=0)
args = tuple(getattr(layer, t) for t in TENSOR_ORDER)
counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
for st in [int(a) for a in sys.argv[1].split(",")]:
    cfg = KernelConfig("tc", split=2, stages=st)
    for _ in range(2):
        mixed_matmul(x, args, group_size=128, outliers=1, counters=counters, config=cfg)
    torch.cuda.synchronize()
