"""Temporary probe (device): does reading a slot's small metadata from five separate arrays (format v1: scale codes,
zero word, tile map, outlier values and indices) cost DRAM throughput against the same bytes in one record per slot?
One-warp programs streaming S slots each, the next slot's loads issued before this one's use (as the GEMV)."""
import torch
import triton
import triton.language as tl

from mpq.bench import kernels as bench


@triton.jit
def _slot(q_ptr, s_ptr, z_ptr, i_ptr, v_ptr, o_ptr, r_ptr, slot, g, t, lane, MODE: tl.constexpr):
    if MODE == 2:  # one 640-byte record: 512 bytes of codes, then 128 bytes of metadata
        a = tl.load(r_ptr + slot * 80 + lane)
        b = tl.load(r_ptr + slot * 80 + 32 + lane)
        m = tl.load(r_ptr.to(tl.pointer_type(tl.int32)) + slot * 160 + 128 + lane).to(tl.int64)
        return a, b, m
    a = tl.load(q_ptr + slot * 64 + lane)
    b = tl.load(q_ptr + slot * 64 + 32 + lane)
    m = a * 0
    if MODE == 1:
        m += tl.load(s_ptr + slot * 16 + g).to(tl.int64)
        m += tl.load(s_ptr + slot * 16 + g + 8).to(tl.int64)
        m += tl.load(z_ptr + slot + t * 0).to(tl.int64)
        m += tl.load(i_ptr + slot + t * 0).to(tl.int64)
        m += tl.load(v_ptr + slot * 16 + g + 8 * t, mask=t < 2, other=0).to(tl.int64)
        m += tl.load(o_ptr + slot * 16 + g + 8 * t, mask=t < 2, other=0).to(tl.int64)
    return a, b, m


@triton.jit
def probe_kernel(q_ptr, s_ptr, z_ptr, i_ptr, v_ptr, o_ptr, r_ptr, y_ptr, S, MODE: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    acc = tl.zeros([32], tl.int64)
    nxt = _slot(q_ptr, s_ptr, z_ptr, i_ptr, v_ptr, o_ptr, r_ptr, pid * S, g, t, lane, MODE)
    for i in range(0, S):
        a, b, m = nxt
        nxt = _slot(q_ptr, s_ptr, z_ptr, i_ptr, v_ptr, o_ptr, r_ptr, pid * S + tl.minimum(i + 1, S - 1), g, t,
                    lane, MODE)
        acc += ((a ^ b) & 0xFFFF) + m
    tl.store(y_ptr + pid * 32 + lane, acc)


for progs, S in ((1376, 16), (2752, 8), (4096, 16)):
    n = progs * S
    bufs = [dict(q=torch.randint(0, 1 << 30, (n * 64,), device="cuda"),
                 s=torch.randint(0, 255, (n * 16,), device="cuda", dtype=torch.uint8),
                 z=torch.randint(0, 1 << 30, (n,), device="cuda", dtype=torch.int32),
                 i=torch.randint(0, 1 << 14, (n,), device="cuda", dtype=torch.int16),
                 v=torch.randn(n * 16, device="cuda", dtype=torch.float16).view(torch.int16),
                 o=torch.randint(0, 255, (n * 16,), device="cuda", dtype=torch.uint8),
                 r=torch.randint(0, 1 << 30, (n * 80,), device="cuda")) for _ in range(8)]
    y = torch.empty(progs * 32, device="cuda", dtype=torch.int64)
    for mode, nbytes in ((0, 512), (1, 512 + 16 + 4 + 2 + 32 + 16), (2, 640)):
        def run():
            return [probe_kernel[(progs,)](b["q"], b["s"], b["z"], b["i"], b["v"], b["o"], b["r"], y, S, MODE=mode,
                                           num_warps=1) for b in bufs]
        us = bench._graph_us(run)
        print(f"programs {progs} x {S} slots, mode {mode} ({['codes only', 'codes + 5 metadata arrays', 'one record'][mode]}):"
              f" {us:.2f} us, {n * nbytes / us / 1e6:.2f} TB/s on {n * nbytes / 1e6:.1f} MB", flush=True)
