"""Temporary probe (device): the split-K epilogue's share of the tensor-core GEMV's time (MPQ_PROBE_EPI 0/1/2)."""
import os

import torch

from kernels import KernelConfig, mixed_matmul
from kernels.dispatch import TENSOR_ORDER, choose_config
from mpq.bench import kernels as bench

for n, k in ((4096, 11008), (4096, 4096), (11008, 4096), (12288, 4096)):
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
    for ko in (1, 0):
        sets = [tuple(getattr(bench.random_layer(n, k, ko, "cuda", seed=i), t) for t in TENSOR_ORDER) for i in range(8)]
        cfg = choose_config(1, n, k, 128, x.device, ko)
        if cfg.kind != "tc":
            cfg = KernelConfig("tc", split=4, unroll=2)
        res = {}
        for rep in range(3):
            for epi in ("0", "1", "3"):
                os.environ["MPQ_PROBE_EPI"] = epi
                fn = lambda: [mixed_matmul(x, a, group_size=128, outliers=ko, counters=counters, config=cfg) for a in sets]  # noqa: E731
                res.setdefault(epi, []).append(round(bench._graph_us(fn), 2))
        print(f"{n}x{k} outliers={ko} split={cfg.split} u={cfg.unroll} e4={cfg.early4}: full {res['0']}, relaxed {res['1']}, "
              f"release + last-arriver fence {res['3']}", flush=True)
