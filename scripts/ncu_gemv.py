"""Launch the decode GEMV a few times on one Llama-2-7B shape (random format-v1 layer, table config), for ncu:

    PYTHONPATH=. ncu --target-processes all -k regex:gemv --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats python3 scripts/ncu_gemv.py 11008x4096

(kernels-notes, version 10: what it showed).
"""

import sys

import torch

from kernels.dispatch import TENSOR_ORDER, mixed_matmul
from mpq.bench.kernels import random_layer

n, k = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "11008x4096").split("x"))
layer = random_layer(n, k, 1, "cuda", seed=0)
args = tuple(getattr(layer, t) for t in TENSOR_ORDER)
counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
for _ in range(4):
    mixed_matmul(x, args, group_size=128, outliers=1, counters=counters)
torch.cuda.synchronize()
print("done", n, k)
