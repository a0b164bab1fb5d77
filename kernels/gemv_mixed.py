"""Decode GEMV for format v1: one program per (8 or 16 rows of a row tile, K-split, activation row), CUDA cores.

Why this shape: every row tile holds the same number of 2-bit and 4-bit slots, so all programs do equal work,
and one slot of one row tile is a contiguous 512 B (2-bit) or 1 KB (4-bit, g=128) block. A warp reads S slots
per chunk, each thread one word of every row (whole 32-byte sectors per warp), so each activation value it
loads serves all the rows; the next chunk's codes, scale codes, zeros and outliers are loaded before this
chunk's arithmetic. Codes never go through an int->float conversion instruction: a masked, unshifted code
c*2^(b*j) ORed into the mantissa of 2^23 is exact as a float, and the power of two is folded into the
activation value instead. Scales are applied once per group to the partial dot products, zeros once per
group through the sum of x, 2-bit outliers in the same pass.
"""

import torch
import triton
import triton.language as tl

from kernels.exit_flag import skipped_tile
from kernels.splitk import finish_split

MAGIC = 0x4B000000  # bit pattern of the float 2**23; a runtime argument, so that ptxas keeps it in one register
MAGIC_F = tl.constexpr(8388608.0)  # and puts each code's mask in the LOP3's immediate (no MOV per code)


@triton.jit
def _load8(x_row, offs, W: tl.constexpr):
    """x at offs + k * W, k = 0..7, issued back to back: one cache latency per chunk, not one per slice."""
    return (tl.load(x_row + offs), tl.load(x_row + offs + W), tl.load(x_row + offs + 2 * W),
            tl.load(x_row + offs + 3 * W), tl.load(x_row + offs + 4 * W), tl.load(x_row + offs + 5 * W),
            tl.load(x_row + offs + 6 * W), tl.load(x_row + offs + 7 * W))


@triton.jit
def _fma4(p, xs, q, x0, x1, x2, x3, magic, J0: tl.constexpr, BITS: tl.constexpr):
    """p[r, s, w] += code_j(q) * x_j[s, w] for in-word codes j = J0..J0+3 of the low 16 bits of q; xs += x_j.

    code_j * 2^(BITS*j) = float(2^23 | (q & mask_j)) - 2^23: one LOP3 and one FADD per code, no conversion;
    the power of two goes into x_j instead (once per x value, shared by the rows)."""
    for k in tl.static_range(4):
        xk = (x0 if k == 0 else x1 if k == 1 else x2 if k == 2 else x3).to(tl.float32)
        xs += xk
        code = ((q & (((1 << BITS) - 1) << (BITS * (J0 + k)))) | magic).to(tl.float32, bitcast=True) - MAGIC_F
        p += code * (xk * (1.0 / (1 << (BITS * (J0 + k)))))[None, :, :]
    return p, xs


@triton.jit
def _load_chunk(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, slot, end, offs_r, offs_w,
                BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
                OUTLIERS: tl.constexpr, KO_PAD: tl.constexpr):
    """Codes [RB, S, W], first column [S], scale code and zero [RB, S], outliers [RB, S, KO] of S slots.

    Rows lead so that each thread holds all RB rows of its (slot, word): one x value serves them all."""
    ZPB: tl.constexpr = 8 // BITS
    valid = slot < end
    ts = t * n_slots + slot
    q = tl.load(q_ptr + (ts[None, :, None] * R + offs_r[:, None, None]) * W + offs_w[None, None, :],
                mask=valid[None, :, None], other=0)
    col0 = tl.load(idx_ptr + ts, mask=valid, other=0).to(tl.int32) * G_SIZE
    sc = tl.load(s_ptr + ts[None, :] * R + offs_r[:, None], mask=valid[None, :], other=0).to(tl.float32)
    zb = tl.load(z_ptr + ts[None, :] * (R // ZPB) + offs_r[:, None] // ZPB, mask=valid[None, :], other=0)
    zero = ((zb.to(tl.int32) >> ((offs_r[:, None] % ZPB) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    offs_k = tl.arange(0, KO_PAD)
    if OUTLIERS > 0:
        o_offs = (ts[None, :, None] * R + offs_r[:, None, None]) * OUTLIERS + offs_k[None, None, :]
        o_mask = valid[None, :, None] & (offs_k < OUTLIERS)[None, None, :]
        ov = tl.load(ov_ptr + o_offs, mask=o_mask, other=0.0)
        oi = tl.load(oi_ptr + o_offs, mask=o_mask, other=0).to(tl.int32)
    else:
        ov = tl.zeros([offs_r.shape[0], slot.shape[0], KO_PAD], tl.float16)
        oi = tl.zeros([offs_r.shape[0], slot.shape[0], KO_PAD], tl.int32)
    return q, col0, sc, zero, ov, oi


@triton.jit
def _stream(x_row, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, offs_r, n_slots, sp, magic, unit,
            BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr,
            SPLIT: tl.constexpr, OUTLIERS: tl.constexpr, KO_PAD: tl.constexpr):
    """This program's share of one stream (2- or 4-bit slots): (sum of code-scale * dot, outlier dot), [RB].

    The next chunk's loads (codes, scales, zeros, outliers) are issued before this chunk's arithmetic, so
    one chunk is always in flight. Word offsets are scaled by `unit` (1, unknown to the compiler), so each
    thread takes one word of each of the RB rows rather than 4 contiguous words of one row: every x value is
    then reused by all RB rows, and with S * W = 32 * num_warps the x slices load in the codes' layout.
    (Loads stay coalesced: a warp reads whole 32-byte sectors.)"""
    W: tl.constexpr = G_SIZE * BITS // 32
    offs_s = tl.arange(0, S)
    offs_w = tl.arange(0, W) * unit
    per_split = tl.cdiv(tl.cdiv(n_slots, S), SPLIT) * S
    start = sp * per_split
    end = tl.minimum(start + per_split, n_slots)
    chunks = tl.cdiv(tl.maximum(end - start, 0), S)
    acc = tl.zeros([RB, S, W], tl.float32)
    acc_sr = tl.zeros([RB, S], tl.float32)
    acc_o = tl.zeros([RB, S], tl.float32)
    q_n, col0_n, sc_n, zero_n, ov_n, oi_n = _load_chunk(
        q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, start + offs_s, end, offs_r, offs_w,
        BITS, G_SIZE, R, W, OUTLIERS, KO_PAD)
    for c in range(chunks):
        q, col0, sc, zero, ov, oi = q_n, col0_n, sc_n, zero_n, ov_n, oi_n
        q_n, col0_n, sc_n, zero_n, ov_n, oi_n = _load_chunk(
            q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, start + (c + 1) * S + offs_s, end, offs_r,
            offs_w, BITS, G_SIZE, R, W, OUTLIERS, KO_PAD)
        base = col0[:, None] + offs_w[None, :]
        xa0, xa1, xa2, xa3, xa4, xa5, xa6, xa7 = _load8(x_row, base, W)
        if OUTLIERS > 0:
            xo = tl.load(x_row + col0[None, :, None] + oi).to(tl.float32)
            acc_o += tl.sum(ov.to(tl.float32) * xo, axis=2)
        p = tl.zeros([RB, S, W], tl.float32)
        xs = tl.zeros([S, W], tl.float32)
        if BITS == 2:
            xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7 = _load8(x_row, base + 8 * W, W)
            p, xs = _fma4(p, xs, q, xa0, xa1, xa2, xa3, magic, 0, BITS)
            p, xs = _fma4(p, xs, q, xa4, xa5, xa6, xa7, magic, 4, BITS)
            p, xs = _fma4(p, xs, q >> 16, xb0, xb1, xb2, xb3, magic, 0, BITS)
            p, xs = _fma4(p, xs, q >> 16, xb4, xb5, xb6, xb7, magic, 4, BITS)
        else:
            p, xs = _fma4(p, xs, q, xa0, xa1, xa2, xa3, magic, 0, BITS)
            p, xs = _fma4(p, xs, q >> 16, xa4, xa5, xa6, xa7, magic, 0, BITS)
        acc += sc[:, :, None] * p
        acc_sr -= sc * zero * tl.sum(xs, axis=1)[None, :]
    return tl.sum(tl.sum(acc, axis=2) + acc_sr, axis=1), tl.sum(acc_o, axis=1)


@triton.jit(do_not_specialize=["M", "n2", "n4", "magic", "unit", "keep_tiles"])
def _gemv_kernel(x_ptr, y_ptr, ws_ptr, cnt_ptr, skip_ptr, keep_tiles,
                 q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                 q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                 M, N, n2, n4, stride_xm, stride_ym, magic, unit,
                 G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr, KO_PAD: tl.constexpr,
                 RB: tl.constexpr, S2: tl.constexpr, S4: tl.constexpr, SPLIT: tl.constexpr, SKIP: tl.constexpr):
    pid = tl.program_id(0)  # RB rows of one row tile
    sp = tl.program_id(1)
    m = tl.program_id(2)
    t = pid // (R // RB)
    if SKIP:
        if skipped_tile(skip_ptr, t, keep_tiles):
            return
    offs_r = (pid % (R // RB)) * RB + tl.arange(0, RB)
    x_row = x_ptr + m * stride_xm
    p2, o2 = _stream(x_row, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, t, offs_r, n2, sp, magic, unit,
                     2, G_SIZE, R, RB, S2, SPLIT, OUTLIERS, KO_PAD)
    p4, _ = _stream(x_row, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, offs_r, n4, sp, magic, unit,
                    4, G_SIZE, R, RB, S4, SPLIT, 0, KO_PAD)
    rows = t * R + offs_r
    val = tl.load(ss2_ptr + rows).to(tl.float32) * p2 + tl.load(ss4_ptr + rows).to(tl.float32) * p4 + o2
    mask = rows < N
    finish_split(val, y_ptr, m * stride_ym + rows, ws_ptr, m * N + rows, mask,
                 cnt_ptr + m * tl.num_programs(0) + pid, sp, M * N, SPLIT)


def gemv_mixed(x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *,
               group_size: int, outliers: int, rows: int, split: int, num_warps: int,
               skip: torch.Tensor | None = None, keep_tiles: int = 0):
    """y[M, N] = x[M, K] @ W.T; ws fp32 [split, M, N] (unused when split == 1); counters int32, zero, at least
    M * N / rows of them when split > 1. Each program takes `rows` rows of a row tile and 32 * num_warps / W
    slots per chunk of each stream (W = words per group row), the size at which x needs no layout change.
    `skip`, `keep_tiles`: the exit flag (`kernels.exit_flag`); skipped row tiles leave y unwritten."""
    M, N, T, R = x.shape[0], y.shape[1], q2.shape[0], q2.shape[2]
    slots = lambda bits: max(1, 32 * num_warps // (group_size * bits // 32))  # noqa: E731
    _gemv_kernel[(T * (R // rows), split, M)](
        x, y, ws, counters, counters if skip is None else skip, keep_tiles, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4,
        ss4, idx4,
        M, N, q2.shape[1], q4.shape[1], x.stride(0), y.stride(0), MAGIC, 1,
        G_SIZE=group_size, R=R, OUTLIERS=outliers, KO_PAD=triton.next_power_of_2(max(outliers, 1)),
        RB=rows, S2=slots(2), S4=slots(4), SPLIT=split, SKIP=skip is not None, num_warps=num_warps,
    )
    return y
