"""Decode GEMV v3 for format v1: every weight and metadata load goes through Triton's cp.async pipeline.

GEMV2 (gemv_h2) prefetches one chunk in registers, so a warp has at most ~2 KB of loads in flight, and register
pressure caps the warps per SM: at ~1.1 TB/s it is latency-bound, not issue-bound. Here the slot loop is a
`tl.range(num_stages=NS)` loop whose loads Triton turns into cp.async copies into shared memory, NS - 1 chunks
ahead, without holding them in registers. A chunk is [S slots, R rows, P word pairs]: one (row tile, slot) is
R * P contiguous int64, so a warp reads whole 512 B (2-bit) or 1 KB (4-bit) blocks. cp.async needs >= 4
bytes, so the small per-(row, slot) fields (scale code, zero, outlier value and offset, tile map) are read as
the aligned int32 word that holds them and shifted out. x is read inside the decode PTX (ld.global.nc, it stays
in L1), out of the pipeliner's reach, so it is not staged through shared memory once per row. The decode is
GEMV2's packed fp16x2 arithmetic (kernels/gemv_h2.py, `_asm`); FAST=False is its plain fp32 twin for the
interpreter.
"""

import torch
import triton
import triton.language as tl

from kernels.gemv_h2 import _asm, _dot_plain
from kernels.splitk import finish_split

ASM = {(bits, g): tl.constexpr(_asm(bits, x_step=2 * (g * bits // 32))) for bits in (2, 4) for g in (64, 128, 256)}
ASM2_G64, ASM2_G128, ASM2_G256 = ASM[2, 64], ASM[2, 128], ASM[2, 256]
ASM4_G64, ASM4_G128, ASM4_G256 = ASM[4, 64], ASM[4, 128], ASM[4, 256]
CONS = tl.constexpr("=f,l,r,l")
CONS_X = tl.constexpr("=f,l")
ASM_X = tl.constexpr("{ .reg .b16 h; ld.global.nc.b16 h, [$1]; cvt.f32.f16 $0, h; }")
GROUP_SIZES = (64, 128, 256)


@triton.jit
def _field(ptr, elem, mask, BITS: tl.constexpr):
    """Element `elem` of a packed array of BITS-bit fields, read through its aligned int32 word (cp.async-able)."""
    PER: tl.constexpr = 32 // BITS
    word = tl.load(ptr.to(tl.pointer_type(tl.int32)) + elem // PER, mask=mask, other=0)
    return (word >> ((elem % PER) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _decode(q, zero, xa, BITS: tl.constexpr, G_SIZE: tl.constexpr):
    """sum over one word pair's codes of (c - z)/16 * x, fp32; xa is the address of the pair's first x pair."""
    if BITS == 2:
        if G_SIZE == 64:
            s = tl.inline_asm_elementwise(ASM2_G64, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
        elif G_SIZE == 128:
            s = tl.inline_asm_elementwise(ASM2_G128, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
        else:
            s = tl.inline_asm_elementwise(ASM2_G256, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
    else:
        if G_SIZE == 64:
            s = tl.inline_asm_elementwise(ASM4_G64, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
        elif G_SIZE == 128:
            s = tl.inline_asm_elementwise(ASM4_G128, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
        else:
            s = tl.inline_asm_elementwise(ASM4_G256, CONS, [q, zero, xa], dtype=tl.float32, is_pure=True, pack=1)
    return s


@triton.jit
def _stream(x_row, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, sp,
            BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr,
            OUTLIERS: tl.constexpr, NS: tl.constexpr, FAST: tl.constexpr):
    """This program's share of one stream (2- or 4-bit slots): (sum of scale code * dot, outlier dot), [R]."""
    P: tl.constexpr = G_SIZE * BITS // 64  # word pairs per group row
    offs_s = tl.arange(0, S)[:, None, None]
    offs_r = tl.arange(0, R)[None, :, None]
    offs_p = tl.arange(0, P)[None, None, :]
    per_split = tl.cdiv(tl.cdiv(n_slots, S), SPLIT) * S
    start = sp * per_split
    end = tl.minimum(start + per_split, n_slots)
    acc = tl.zeros([S, R, P], tl.float32)
    acc_o = tl.zeros([S, R, P], tl.float32)
    for c in tl.range(start, end, S, num_stages=NS):
        slot = c + offs_s
        valid = slot < end
        ts = t * n_slots + slot  # [S, 1, 1]
        e = ts * R + offs_r + offs_p * 0  # (row tile, slot, row) index, [S, R, P]
        q = tl.load(q_ptr + (ts * R + offs_r) * P + offs_p, mask=valid, other=0)
        col0 = _field(idx_ptr, ts + offs_r * 0 + offs_p * 0, valid, 16) * G_SIZE
        sc = _field(s_ptr, e, valid, 8).to(tl.float32)  # 0 on masked slots: they add nothing
        zero = _field(z_ptr, e, valid, BITS)
        for o in tl.static_range(OUTLIERS):
            ov = _field(ov_ptr, e * OUTLIERS + o, valid, 16).to(tl.int16).to(tl.float16, bitcast=True)
            oi = _field(oi_ptr, e * OUTLIERS + o, valid, 8)
            if FAST:
                xo = tl.inline_asm_elementwise(ASM_X, CONS_X, [x_row + col0 + oi], dtype=tl.float32, is_pure=True,
                                               pack=1)
            else:
                xo = tl.load(x_row + col0 + oi).to(tl.float32)
            acc_o += tl.where(offs_p == 0, ov.to(tl.float32) * xo, 0.0)  # each outlier once per (row, slot)
        if FAST:
            part = _decode(q, zero, x_row + col0 + 2 * offs_p, BITS, G_SIZE)
        else:
            part = _dot_plain(x_row, col0 // G_SIZE, tl.arange(0, P), q, zero, BITS, G_SIZE * BITS // 32, G_SIZE)
        acc += sc * part
    return tl.sum(tl.sum(acc, axis=2), axis=0) * 16.0, tl.sum(tl.sum(acc_o, axis=2), axis=0)


@triton.jit(do_not_specialize=["M", "n2", "n4"])
def _gemv_async_kernel(x_ptr, y_ptr, ws_ptr, cnt_ptr,
                       q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                       q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                       M, N, n2, n4, stride_xm, stride_ym,
                       G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr, S2: tl.constexpr,
                       S4: tl.constexpr, SPLIT: tl.constexpr, NS: tl.constexpr, FAST: tl.constexpr):
    t = tl.program_id(0)  # one row tile
    sp = tl.program_id(1)
    m = tl.program_id(2)
    x_row = x_ptr + m * stride_xm
    p2, o2 = _stream(x_row, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, t, n2, sp, 2, G_SIZE, R, S2, SPLIT,
                     OUTLIERS, NS, FAST)
    p4, _ = _stream(x_row, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, n4, sp, 4, G_SIZE, R, S4, SPLIT,
                    0, NS, FAST)
    rows = t * R + tl.arange(0, R)
    val = tl.load(ss2_ptr + rows).to(tl.float32) * p2 + tl.load(ss4_ptr + rows).to(tl.float32) * p4 + o2
    finish_split(val, y_ptr, m * stride_ym + rows, ws_ptr, m * N + rows, rows < N, cnt_ptr + m * tl.num_programs(0) + t,
                 sp, M * N, SPLIT)


def word_readable(t: torch.Tensor) -> bool:
    """True if every int32 word holding one of t's bytes lies inside t's storage (the kernel reads whole words)."""
    start = t.storage_offset() * t.element_size()
    return start % 4 == 0 and t.untyped_storage().nbytes() >= start + -(-t.numel() * t.element_size() // 4) * 4


def word_padded(t: torch.Tensor) -> torch.Tensor:
    """t itself if word-readable, else a copy of it at the start of a storage rounded up to whole int32 words."""
    if word_readable(t):
        return t
    padded = -(-t.numel() * t.element_size() // 4) * 4 // t.element_size()
    buf = torch.zeros(padded, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t.reshape(-1)
    return buf[: t.numel()].view(t.shape)


def gemv_async(x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *,
               group_size: int, outliers: int, slots2: int, slots4: int, split: int, num_warps: int, stages: int,
               fast: bool):
    """Same contract as gemv_h2; `slots2`/`slots4` slots per loop step, `stages` the pipeline depth. Requires
    every small tensor to be word-readable (`word_readable`; QuantLinear pads them) and g in GROUP_SIZES."""
    M, N, T, R = x.shape[0], y.shape[1], q2.shape[0], q2.shape[2]
    assert group_size in GROUP_SIZES and all(word_readable(t) for t in (s2, z2, idx2, ov, oi, s4, z4, idx4))
    _gemv_async_kernel[(T, split, M)](
        x, y, ws, counters, q2.view(torch.int64), s2, z2, ss2, idx2, ov, oi, q4.view(torch.int64), s4, z4, ss4, idx4,
        M, N, q2.shape[1], q4.shape[1], x.stride(0), y.stride(0),
        G_SIZE=group_size, R=R, OUTLIERS=outliers, S2=slots2, S4=slots4, SPLIT=split, NS=stages, FAST=fast,
        num_warps=num_warps,
    )
    return y
