"""Attention of one new token over the KV cache (batch 1, the decode step), split over positions, in one launch.

SDPA treats the decode step as a general attention over the whole preallocated cache: it reads every slot, the
masked ones too, so its cost follows the cache's size, not the sequence's. Here the programs of a query head
share out the filled prefix only (positions 0..pos; pos is read on the device, so a captured CUDA graph stays
valid as the sequence grows). Each program runs an online softmax in fp32 over its share and writes
(max, sum, weighted values). The last program of the head to finish merges the shares and resets the head's
counter, like the GEMVs' split-K epilogue. So the counters need zeroing once, when they are allocated.

A single program per head (tried first: `benchmarks/e2e-notes.md`, run 5) walked 4-6 dependent blocks on 32 of
132 SMs and was slower than SDPA. The split spreads the walk over heads x SPLITS programs.

GQA: query head h reads KV head h // (heads / kv_heads). The additive mask row is applied as given, so that
positions dropped by early exits (-inf) stay out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, y_ptr, part_ptr, stat_ptr, cnt_ptr, scale,
                             stride_kh, stride_kn, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                             SPLITS: tl.constexpr):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    kvh = h // GROUP
    d = tl.arange(0, D)
    n_valid = tl.load(pos_ptr).to(tl.int32) + 1
    share = tl.cdiv(tl.cdiv(n_valid, SPLITS), 16) * 16  # whole 16-position blocks per program
    start = sp * share
    end = tl.minimum(start + share, n_valid)
    q = tl.load(q_ptr + h * D + d).to(tl.float32) * scale
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for first in range(start, end, BLOCK_N):
        n = first + offs
        valid = n < end
        rows = kvh * stride_kh + n[:, None] * stride_kn + d[None, :]
        k = tl.load(k_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) + tl.load(mask_ptr + n, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with every position masked out
        p = tl.exp(s - m_safe)
        correction = tl.exp(m - m_safe)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        total = total * correction + tl.sum(p, axis=0)
        m = m_new
    # this program's share: (max, sum) and the unnormalised weighted values; an empty share writes (-inf, 0, 0)
    slot = h * SPLITS + sp
    tl.store(part_ptr + slot * D + d, acc)
    two = tl.arange(0, 2)
    tl.store(stat_ptr + slot * 2 + two, tl.where(two == 0, m, total))
    tl.debug_barrier()  # every thread's share is written before the counter is released
    arrived = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel")
    if arrived == SPLITS - 1:
        slots = h * SPLITS + tl.arange(0, SPLITS)
        ms = tl.load(stat_ptr + slots * 2, cache_modifier=".cg")
        sums = tl.load(stat_ptr + slots * 2 + 1, cache_modifier=".cg")
        parts = tl.load(part_ptr + slots[:, None] * D + d[None, :], cache_modifier=".cg")
        top = tl.max(ms, axis=0)  # finite: position pos itself is never masked
        w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - top))
        out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w * sums, axis=0)
        tl.store(y_ptr + h * D + d, out.to(y_ptr.dtype.element_ty))
        tl.store(cnt_ptr + h, 0)


class DecodeAttention:
    """Scratch (per-share partials, per-head counters) for one model's decode steps, allocated on first use and
    reused, so that a captured graph keeps pointing at the same buffers."""

    BLOCK_N = 16  # keys per loop step: 70 registers at D = 128 (64 keys took 254, one program per SM; sm_90 SASS)

    def __init__(self, splits: int | None = None):
        self.splits = splits  # None: from the cache length, about 32 keys per share at full length, 4 to 32
        self._scratch: dict = {}

    def _buffers(self, heads: int, dim: int, splits: int, device: torch.device):
        key = (heads, dim, splits, device)
        if key not in self._scratch:
            self._scratch[key] = (torch.empty(heads * splits * dim, dtype=torch.float32, device=device),
                                  torch.empty(heads * splits * 2, dtype=torch.float32, device=device),
                                  torch.zeros(heads, dtype=torch.int32, device=device))
        return self._scratch[key]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                 pos: torch.Tensor) -> torch.Tensor:
        """q [heads, D]; k_cache, v_cache [kv_heads, L, D] (rows contiguous, one layout); mask [L] additive
        (0 / -inf); pos [1] int: the new token's position (keys 0..pos count). Returns [heads, D] in q's dtype.
        D must be a power of two (64 and 128 in the Llama family)."""
        heads, dim = q.shape
        kv_heads = k_cache.shape[0]
        if dim & (dim - 1) or heads % kv_heads or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("decode attention needs a power-of-two head size, heads divisible by kv heads, "
                             "and K/V caches of one layout with contiguous rows")
        splits = self.splits or min(32, max(4, triton.next_power_of_2(triton.cdiv(k_cache.shape[1], 32))))
        part, stat, counters = self._buffers(heads, dim, splits, q.device)
        q = q.contiguous()
        y = torch.empty_like(q)
        _decode_attention_kernel[(heads, splits)](
            q, k_cache, v_cache, mask, pos, y, part, stat, counters, dim ** -0.5, k_cache.stride(0),
            k_cache.stride(1), GROUP=heads // kv_heads, D=dim, BLOCK_N=self.BLOCK_N, SPLITS=splits, num_warps=4)
        return y
