"""Temporary probe (device): why the pipeliner-staged tensor-core GEMV is slow. (1) a plain streaming loop of
one-warp programs, loads in registers vs staged by tl.range(num_stages); (2) occupancy and shared-memory carveout of
the staged GEMV."""
import ctypes

import torch
import triton
import triton.language as tl

from kernels import KernelConfig, mixed_matmul
from kernels.dispatch import TENSOR_ORDER
from mpq.bench import kernels as bench

cuda = ctypes.CDLL("libcuda.so.1")


@triton.jit
def stream_kernel(q_ptr, y_ptr, n, NS: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, 32)
    acc = tl.zeros([32], tl.int64)
    base = q_ptr + pid * n * 64
    if NS > 0:
        for i in tl.range(0, n, num_stages=NS):
            a = tl.load(base + i * 64 + lane)
            b = tl.load(base + i * 64 + 32 + lane)
            acc += (a ^ b) & 0xFFFF
    else:
        for i in range(0, n):
            a = tl.load(base + i * 64 + lane)
            b = tl.load(base + i * 64 + 32 + lane)
            acc += (a ^ b) & 0xFFFF
    tl.store(y_ptr + pid * 32 + lane, acc)


def occupancy(kernel) -> int:
    kernel._init_handles()
    out = ctypes.c_int()
    cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(out), ctypes.c_void_p(kernel.function), 32,
                                                     ctypes.c_size_t(kernel.metadata.shared))
    return out.value


def set_carveout(kernel, pct):
    kernel._init_handles()
    r = cuda.cuFuncSetAttribute(ctypes.c_void_p(kernel.function), 9, pct)  # PREFERRED_SHARED_MEMORY_CARVEOUT
    assert r == 0, r


progs, slots = 4096, 32
q = torch.randint(0, 1 << 30, (8, progs * slots * 64), device="cuda", dtype=torch.int64)
y = torch.empty(progs * 32, device="cuda", dtype=torch.int64)
for ns in (0, 2, 3, 4, 6):
    for carve in (None, 100):
        k = stream_kernel[(progs,)](q[0], y, slots, NS=ns, num_warps=1)
        if carve is not None:
            set_carveout(k, carve)
        us = bench._graph_us(lambda: [stream_kernel[(progs,)](q[i], y, slots, NS=ns, num_warps=1) for i in range(8)])
        gbs = q[0].numel() * 8 / us / 1e3
        print(f"stream NS={ns} carveout={carve}: {us:.1f} us, {gbs:.0f} GB/s, shared {k.metadata.shared}, "
              f"occupancy {occupancy(k)} blocks/SM", flush=True)

n, kk = 11008, 4096
layers = [bench.random_layer(n, kk, 1, "cuda", seed=i) for i in range(8)]
args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
x = torch.randn(1, kk, device="cuda", dtype=torch.float16)
from kernels.gemv_tc import _gemv_tc_kernel
for cfg in (KernelConfig("tc", split=2, unroll=2, early4=True), KernelConfig("tc", split=2, stages=3),
            KernelConfig("tc", split=2, stages=4), KernelConfig("tc", split=2, stages=4, xfrag=True)):
    for carve in (None, 100):
        run = lambda: [mixed_matmul(x, a, group_size=128, outliers=1, counters=counters, config=cfg) for a in args]
        run()
        kern = [v for c in _gemv_tc_kernel.device_caches.values() for v in c[0].values()]
        if carve is not None:
            for kn in kern:
                set_carveout(kn, carve)
        us = bench._graph_us(run)
        occ = [(kn.metadata.shared, occupancy(kn)) for kn in kern]
        print(f"gemv_tc {cfg.split} st={cfg.stages} xf={cfg.xfrag} carveout={carve}: {us:.2f} us; (shared, blocks/SM) "
              f"of cached variants {occ}", flush=True)
