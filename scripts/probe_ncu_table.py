"""Temporary probe (device, under ncu): one launch of the table's M = 1 kernel for a shape, PDL off."""
import sys

import torch

from kernels import mixed_matmul
from kernels.dispatch import TENSOR_ORDER, choose_config
from mpq.bench import kernels as bench

n, k = (int(v) for v in sys.argv[1].split("x"))
layer = bench.random_layer(n, k, 1, "cuda", seed=0)
args = tuple(getattr(layer, t) for t in TENSOR_ORDER)
counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
print(choose_config(1, n, k, 128, x.device, 1), flush=True)
for _ in range(3):
    mixed_matmul(x, args, group_size=128, outliers=1, counters=counters)
torch.cuda.synchronize()
