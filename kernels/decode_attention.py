"""One decode step of attention for one new token, with its RoPE and KV-cache write, in one launch.

Replaces three kernels of the decode step (RoPE, the cache write, SDPA over the whole static cache) by one that
reads only the filled prefix. Programs: (batch x KV head, share); each rotates its heads' q and the new k, walks
its share of the cached positions [0, pos) in BLOCK_N-key tiles with an online softmax, and writes its partial
(max, sum, weighted V) to a workspace. The last of a head's programs to arrive (atomic counter, reset by that
program, so the launch replays in a CUDA graph) merges the shares in a fixed order with the new token's own key,
which it still holds in registers, and writes the heads' outputs. Share 0 writes the new k and v into the cache;
no program reads position pos from the cache, so nothing waits for that write. The heads of a GQA group share
their KV head's program, so each cached key and value is read once. Positions are read on the device, so one
captured graph serves every step; the mask is the causal prefix [0, pos], plus an optional additive bias over the
cached positions (SpecEE's drop mode masks the tokens a layer skipped).

Launched as a programmatic dependent (sm_90+), the kernel starts while the q/k/v projection finishes and waits
for it before any load. It lets the o projection launch at its own start, so that the GEMV's weight loads overlap
this kernel's chain of round trips; with 2 warps a program that took the 7B decode step from 2.022 to 2.001 ms a
token (`benchmarks/e2e-notes.md`, run 26; with 4 warps 2.019). (Loading the first cached tile before the wait made
the kernel alone 5-12% faster but the step no faster, 2.378 against 2.370 ms, and again in run 26 2.004 against
1.998, so the kernel keeps the simpler contract: nothing is read before the wait.)
"""

import os

import torch
import triton
import triton.language as tl

from kernels.exit_flag import exited

BLOCK_N = 64  # cached positions per tile
# Triton's CPU interpreter (3.9) computes bf16 tl.dot wrongly; there the bf16 tiles are multiplied in fp32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rotate(x_ptr, offs_d, cos, sin, HALF: tl.constexpr, mask):
    """x * cos + rotate_half(x) * sin (the half-split RoPE of HF checkpoints), fp32, rows of x at x_ptr."""
    x = tl.load(x_ptr + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    xp = tl.load(x_ptr + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + tl.where((offs_d < HALF)[None, :], -xp, xp) * sin[None, :]


@triton.jit
def _tile(base, stride_c0, keys, end, offs_d):
    """Cached keys and values at positions `keys` (those >= end masked to zero), [BLOCK_N, D] each."""
    ok = (keys < end)[:, None]
    kt = tl.load(base + keys[:, None] * offs_d.shape[0] + offs_d[None, :], mask=ok, other=0.0)
    vt = tl.load(base + stride_c0 + keys[:, None] * offs_d.shape[0] + offs_d[None, :], mask=ok, other=0.0)
    return kt, vt


@triton.jit
def _attend(q, kt, vt, ok, bias, m_i, l_i, acc, scale, DOT_F32: tl.constexpr):
    """One tile of the online softmax: (running max, sum, weighted V) of the q rows after keys kt, values vt
    (bias [BLOCK_N]: added to the scores)."""
    if DOT_F32:
        kt, vt = kt.to(tl.float32), vt.to(tl.float32)
    s = tl.dot(q.to(kt.dtype), tl.trans(kt)) * scale + bias[None, :]  # [MP, BLOCK_N], fp32
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at zero
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, bias_ptr, out_ptr,
                             m_ws, l_ws, acc_ws, cnt_ptr,
                             n_kv, stride_c0, stride_cb, stride_ch, scale,
                             G: tl.constexpr, GP: tl.constexpr, MP: tl.constexpr, D: tl.constexpr,
                             SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                             PDL: tl.constexpr, skip_ptr, SKIP: tl.constexpr):
    if PDL:  # the o projection launches now and loads its weights while this kernel runs; q, k, v are the output
        # of the kernel before (this one was launched early too, and waits here for it)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)  # batch * n_kv + KV head
    sp = tl.program_id(1)
    b = bh // n_kv
    h = bh % n_kv
    dt = cache_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    base = cache_ptr + b * stride_cb + h * stride_ch
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + offs_d).to(tl.float32)
    sin = tl.load(sin_ptr + offs_d).to(tl.float32)
    per = tl.cdiv(pos, SPLITS)
    start = sp * per
    end = tl.minimum(start + per, pos)  # this share of the cached positions [0, pos)
    # the group's q heads as the rows of an MP-row tile (tensor-core tiles need >= 16; the rows past G are zero),
    # rotated and rounded to the cache dtype as the eager path feeds them to SDPA
    offs_m = tl.arange(0, MP)
    k_new = _rotate(k_ptr + bh * D, offs_d, cos, sin, D // 2, offs_d[None, :] < D).to(dt)  # [1, D]
    v_new = tl.load(v_ptr + bh * D + offs_d[None, :])
    if sp == 0:
        tl.store(base + pos * D + offs_d[None, :], k_new)
        tl.store(base + stride_c0 + pos * D + offs_d[None, :], v_new)
    if SKIP:  # the exit flag: the layer is skipped. Its cache entry above is the fill (k and v from the exit
        # state); in drop mode (BIAS) the position is masked out of this layer for later tokens instead
        if exited(skip_ptr):
            if BIAS and sp == 0 and bh == 0:
                tl.store(bias_ptr + pos, float("-inf"))
            return
    q = _rotate(q_ptr + (bh * G + offs_m)[:, None] * D, offs_d, cos, sin, D // 2, (offs_m < G)[:, None]).to(dt)
    m_i = tl.full([MP], float("-inf"), tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, D], tl.float32)
    for n in range(start, end, BLOCK_N):
        kt, vt = _tile(base, stride_c0, n + offs_n, end, offs_d)
        ok = n + offs_n < end
        bias = tl.zeros([BLOCK_N], tl.float32)
        if BIAS:
            bias = tl.load(bias_ptr + n + offs_n, mask=ok, other=0.0).to(tl.float32)
        m_i, l_i, acc = _attend(q, kt, vt, ok, bias, m_i, l_i, acc, scale, DOT_F32)
    ws = (bh * SPLITS + sp) * GP + offs_m
    row_ok = offs_m < GP
    tl.store(m_ws + ws, m_i, mask=row_ok)
    tl.store(l_ws + ws, l_i, mask=row_ok)
    tl.store(acc_ws + ws[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.debug_barrier()  # every thread's partial is written before the counter is released
    arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
    if arrived == SPLITS - 1:  # merge the shares and the new token's own key, for the G heads only
        offs_g = tl.arange(0, GP)
        g_ok = (offs_g < G)[:, None]
        qg = _rotate(q_ptr + (bh * G + offs_g)[:, None] * D, offs_d, cos, sin, D // 2, g_ok).to(dt)
        s_new = tl.sum(qg.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale  # [GP]
        m_all = s_new
        for i in tl.static_range(SPLITS):
            m_all = tl.maximum(m_all, tl.load(m_ws + (bh * SPLITS + i) * GP + offs_g, cache_modifier=".cg"))
        w_new = tl.exp(s_new - m_all)
        l_all = w_new
        out = w_new[:, None] * v_new.to(tl.float32)
        for i in tl.static_range(SPLITS):
            wi = (bh * SPLITS + i) * GP + offs_g
            w = tl.exp(tl.load(m_ws + wi, cache_modifier=".cg") - m_all)
            l_all += w * tl.load(l_ws + wi, cache_modifier=".cg")
            out += w[:, None] * tl.load(acc_ws + wi[:, None] * D + offs_d[None, :], cache_modifier=".cg")
        tl.store(out_ptr + (bh * G + offs_g)[:, None] * D + offs_d[None, :], (out / l_all[:, None]).to(dt),
                 mask=g_ok)
        tl.store(cnt_ptr + bh, 0)


def attention_splits(cache_len: int, kv_heads: int, batch: int = 1, block_n: int = BLOCK_N) -> int:
    """Shares per KV head: enough programs for ~2 waves of a 132-SM GPU, at most one per block_n cached positions.
    (A sweep of 4-24 shares and 32/64-position tiles on an H100 found nothing better at 384-4096 cached positions.)"""
    return max(1, min(triton.cdiv(cache_len, block_n), triton.cdiv(264, kv_heads * batch), 32))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: torch.Tensor, input_pos: torch.Tensor, counters: torch.Tensor,
                     bias: torch.Tensor | None = None, *,
                     splits: int | None = None, out: torch.Tensor | None = None, pdl: bool = False,
                     block_n: int = BLOCK_N, skip: torch.Tensor | None = None, num_warps: int = 2) -> torch.Tensor:
    """Attention of one new token per sequence: q [B, 1, heads, D], k/v [B, 1, kv heads, D] (before RoPE),
    cos/sin [1, D] at the new position input_pos [1] (a device tensor), cache [2, B, kv heads, length, D]
    (written at input_pos). counters: int32 zeros, >= B * kv heads (left zero after each call). bias: None, or an
    additive row [length] over the cached positions (SpecEE's drop mode: -inf where this layer skipped a token;
    the new token itself is never masked). splits: shares per KV head (default `attention_splits`). Returns `out`
    (or a new tensor) [B, 1, heads * D] in the cache's dtype. skip: the exit flag (`kernels.exit_flag`); while it is
    set the kernel only writes the new k and v into the cache (fill mode) or, given `bias`, sets bias[input_pos] to
    -inf (drop mode), and leaves `out` unwritten. num_warps: per program (2 gave the fastest 7B step, run 26)."""
    B, S, H, D = q.shape
    _, _, KV, L, _ = cache.shape
    if S != 1 or H % KV or D & (D - 1) or cache.stride(4) != 1 or cache.stride(3) != D:
        raise ValueError(f"decode_attention: one token, heads a multiple of KV heads, D a power of two "
                         f"(q {tuple(q.shape)}, cache {tuple(cache.shape)})")
    G = H // KV
    splits = splits or attention_splits(L, KV, B, block_n)
    out = torch.empty(B, 1, H * D, dtype=cache.dtype, device=q.device) if out is None else out
    m_ws = torch.empty(B * KV * splits * triton.next_power_of_2(G), dtype=torch.float32, device=q.device)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty(m_ws.numel() * D, dtype=torch.float32, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _decode_attention_kernel[(B * KV, splits)](
        q, k, v, cos, sin, input_pos, cache, cache if bias is None else bias, out, m_ws, l_ws, acc_ws, counters,
        KV, cache.stride(0), cache.stride(1), cache.stride(2), D ** -0.5,
        G=G, GP=triton.next_power_of_2(G), MP=max(16, triton.next_power_of_2(G)), D=D, SPLITS=splits,
        BLOCK_N=block_n, BIAS=bias is not None, DOT_F32=INTERPRET and cache.dtype == torch.bfloat16, PDL=pdl,
        skip_ptr=counters if skip is None else skip, SKIP=skip is not None,
        num_warps=num_warps, **({"launch_pdl": True} if pdl else {}),
    )
    return out
