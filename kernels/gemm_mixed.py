"""Skinny tensor-core GEMM (M up to ~64) and the dequantize-to-workspace kernel for prefill (large M).

Skinny GEMM: one program per (row tile, K-split, block of BM activation rows). For each slot it unpacks the
16 x g tile of (code - zero), exact small integers in fp16/bf16, and multiplies it with the gathered activation
columns on tensor cores; the scale is applied once per group to that [16, BM] partial product, so no
per-weight multiply by a scale. Prefill: dequantizing once into an fp16/bf16 workspace and calling cuBLAS
costs one extra pass over N*K*2 bytes, small next to a large-M matmul.
"""

import torch
import triton
import triton.language as tl

from kernels.splitk import finish_split


@triton.jit
def _unpack(q, BITS: tl.constexpr, W: tl.constexpr):
    """int32 [R, W] words -> int32 [R, 32 // BITS, W] codes; [r, j, w] is column j * W + w of the group."""
    shifts = tl.arange(0, 32 // BITS) * BITS
    return (q[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)


@triton.jit
def _codes_minus_zero(q, zero, dtype: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr):
    """(code - zero) as exact fp16/bf16 [R, 32 // BITS, W], without int->float conversion instructions: a code
    ORed into the mantissa of 1024.0 (fp16) or 128.0 (bf16) is that number plus the code."""
    if dtype == tl.bfloat16:
        bias: tl.constexpr = 128.0
        bits: tl.constexpr = 0x4300
    else:
        bias: tl.constexpr = 1024.0
        bits: tl.constexpr = 0x6400
    w = (_unpack(q, BITS, W).to(tl.int16) | bits).to(dtype, bitcast=True)
    return w - (zero + bias).to(dtype)[:, None, None]


@triton.jit
def _scale_zero(s_ptr, z_ptr, ts, offs_r, BITS: tl.constexpr, R: tl.constexpr):
    """Scale code (float) and zero (float) of the R rows of slot `ts`."""
    ZPB: tl.constexpr = 8 // BITS
    sc = tl.load(s_ptr + ts * R + offs_r).to(tl.float32)
    zb = tl.load(z_ptr + ts * (R // ZPB) + offs_r // ZPB).to(tl.int32)
    return sc, ((zb >> ((offs_r % ZPB) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _dot_stream(acc, acc_o, x_ptr, offs_m, m_ok, stride_xm, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr,
                t, n_slots, sp, BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr,
                SPLIT: tl.constexpr, OUTLIERS: tl.constexpr, KO_PAD: tl.constexpr):
    W: tl.constexpr = G_SIZE * BITS // 32
    offs_r = tl.arange(0, R)
    offs_w = tl.arange(0, W)
    offs_k = tl.arange(0, G_SIZE)
    offs_o = tl.arange(0, KO_PAD)
    per = tl.cdiv(n_slots, SPLIT)
    start = sp * per
    end = tl.minimum(start + per, n_slots)
    for s in range(start, end):
        ts = t * n_slots + s
        q = tl.load(q_ptr + (ts * R + offs_r[:, None]) * W + offs_w[None, :])
        col0 = tl.load(idx_ptr + ts).to(tl.int32) * G_SIZE
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + col0 + offs_k[:, None], mask=m_ok[None, :], other=0.0)
        sc, zero = _scale_zero(s_ptr, z_ptr, ts, offs_r, BITS, R)
        wt = tl.reshape(_codes_minus_zero(q, zero, xt.dtype, BITS, W), [R, G_SIZE])
        acc += sc[:, None] * tl.dot(wt, xt)
        if OUTLIERS > 0:
            o_offs = (ts * R + offs_r[:, None]) * OUTLIERS + offs_o[None, :]
            o_mask = (offs_o < OUTLIERS)[None, :]
            ov = tl.load(ov_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
            oi = tl.load(oi_ptr + o_offs, mask=o_mask, other=0).to(tl.int32)
            xo = tl.load(x_ptr + offs_m[None, None, :] * stride_xm + col0 + oi[:, :, None],
                         mask=m_ok[None, None, :], other=0.0).to(tl.float32)
            acc_o += tl.sum(ov[:, :, None] * xo, axis=1)
    return acc, acc_o


@triton.jit(do_not_specialize=["M", "n2", "n4"])
def _gemm_kernel(x_ptr, y_ptr, ws_ptr, cnt_ptr,
                 q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                 q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                 M, N, n2, n4, stride_xm, stride_ym,
                 G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr, KO_PAD: tl.constexpr,
                 BM: tl.constexpr, SPLIT: tl.constexpr):
    t = tl.program_id(0)
    sp = tl.program_id(1)
    mb = tl.program_id(2)
    offs_m = mb * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    zero = tl.zeros([R, BM], tl.float32)
    a2, o2 = _dot_stream(zero, zero, x_ptr, offs_m, m_ok, stride_xm, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr,
                         oi_ptr, t, n2, sp, 2, G_SIZE, R, SPLIT, OUTLIERS, KO_PAD)
    a4, _ = _dot_stream(zero, zero, x_ptr, offs_m, m_ok, stride_xm, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr,
                        oi_ptr, t, n4, sp, 4, G_SIZE, R, SPLIT, 0, KO_PAD)
    rows = t * R + tl.arange(0, R)
    val = tl.load(ss2_ptr + rows).to(tl.float32)[:, None] * a2 + tl.load(ss4_ptr + rows).to(tl.float32)[:, None] * a4 + o2
    mask = (rows < N)[:, None] & m_ok[None, :]
    finish_split(val, y_ptr, offs_m[None, :] * stride_ym + rows[:, None], ws_ptr, offs_m[None, :] * N + rows[:, None],
                 mask, cnt_ptr + mb * (N // R) + t, sp, M * N, SPLIT)


def gemm_mixed(x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *,
               group_size: int, outliers: int, block_m: int, split: int, num_warps: int, num_stages: int):
    """y[M, N] = x[M, K] @ W.T on tensor cores; ws fp32 [split, M, N]; counters int32 [>= cdiv(M, BM) * N / 16], zero."""
    M, N, T, R = x.shape[0], y.shape[1], q2.shape[0], q2.shape[2]
    _gemm_kernel[(T, split, triton.cdiv(M, block_m))](
        x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4,
        M, N, q2.shape[1], q4.shape[1], x.stride(0), y.stride(0),
        G_SIZE=group_size, R=R, OUTLIERS=outliers, KO_PAD=triton.next_power_of_2(max(outliers, 1)),
        BM=block_m, SPLIT=split, num_warps=num_warps, num_stages=num_stages,
    )
    return y


@triton.jit
def _dequant_tile(w_ptr, q_ptr, s_ptr, z_ptr, ss_ptr, idx_ptr, ov_ptr, oi_ptr, t, s, n_slots, K,
                  BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr):
    W: tl.constexpr = G_SIZE * BITS // 32
    offs_r = tl.arange(0, R)
    offs_w = tl.arange(0, W)
    cols = (tl.arange(0, 32 // BITS) * W)[None, :, None] + offs_w[None, None, :]  # in-group column of [r, j, w]
    ts = t * n_slots + s
    q = tl.load(q_ptr + (ts * R + offs_r[:, None]) * W + offs_w[None, :])
    col0 = tl.load(idx_ptr + ts).to(tl.int32) * G_SIZE
    sc, zero = _scale_zero(s_ptr, z_ptr, ts, offs_r, BITS, R)
    scale = tl.load(ss_ptr + t * R + offs_r).to(tl.float32) * sc
    val = scale[:, None, None] * (_unpack(q, BITS, W).to(tl.float32) - zero[:, None, None])
    for k in tl.static_range(OUTLIERS):
        ov = tl.load(ov_ptr + (ts * R + offs_r) * OUTLIERS + k).to(tl.float32)
        oi = tl.load(oi_ptr + (ts * R + offs_r) * OUTLIERS + k).to(tl.int32)
        val += tl.where(cols == oi[:, None, None], ov[:, None, None], 0.0)
    tl.store(w_ptr + (t * R + offs_r)[:, None, None] * K + col0 + cols, val.to(w_ptr.dtype.element_ty))


@triton.jit
def _dequant_kernel(w_ptr, q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                    q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr, K, n2, n4,
                    G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr):
    t = tl.program_id(0)
    s = tl.program_id(1)
    if s < n2:
        _dequant_tile(w_ptr, q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr, t, s, n2, K,
                      2, G_SIZE, R, OUTLIERS)
    else:
        _dequant_tile(w_ptr, q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, s - n2, n4, K,
                      4, G_SIZE, R, 0)


def dequantize_mixed(w, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *, group_size: int, outliers: int):
    """Write the dense weight into w [N, K] (fp16/bf16/fp32); equal to PackedLinear.dequantize() up to rounding."""
    T, n2, n4 = q2.shape[0], q2.shape[1], q4.shape[1]
    _dequant_kernel[(T, n2 + n4)](
        w, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, w.shape[1], n2, n4,
        G_SIZE=group_size, R=q2.shape[2], OUTLIERS=outliers, num_warps=4,
    )
    return w


def prefill_mixed(x, y, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *, group_size: int, outliers: int):
    """Large M: dequantize into a workspace, then one cuBLAS matmul into y."""
    w = torch.empty(y.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    dequantize_mixed(w, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, group_size=group_size, outliers=outliers)
    return torch.matmul(x, w.t(), out=y)
