"""Attention of one new token over the KV cache (batch 1, the decode step), in one launch.

SDPA treats the decode step as a general attention over the whole preallocated cache: it reads every slot (the
masked ones too) and launches for a 1-row query. Here one program per query head walks only the filled prefix
(positions 0..pos, pos read from the device, so a captured CUDA graph stays valid as it grows), with an online
softmax in fp32. GQA: query head h reads KV head h // (heads / kv_heads). The additive mask row is applied as
given, so positions dropped by early exits (-inf) stay out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, y_ptr, scale,
                             stride_kh, stride_kn, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    kvh = h // GROUP
    d = tl.arange(0, D)
    n_valid = tl.load(pos_ptr).to(tl.int32) + 1
    q = tl.load(q_ptr + h * D + d).to(tl.float32) * scale
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, n_valid, BLOCK_N):
        n = start + offs
        valid = n < n_valid
        rows = kvh * stride_kh + n[:, None] * stride_kn + d[None, :]
        k = tl.load(k_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) + tl.load(mask_ptr + n, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with every position masked out
        p = tl.exp(s - m_safe)
        correction = tl.exp(m - m_safe)
        v = tl.load(v_ptr + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        total = total * correction + tl.sum(p, axis=0)
        m = m_new
    tl.store(y_ptr + h * D + d, (acc / total).to(y_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     pos: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    """q [heads, D]; k_cache, v_cache [kv_heads, L, D] (last dim contiguous, same strides); mask [L] additive
    (0 / -inf); pos [1] int: the new token's position (keys 0..pos count). Returns [heads, D] in q's dtype.
    D must be a power of two (64 and 128 in the Llama family)."""
    heads, D = q.shape
    kv_heads = k_cache.shape[0]
    if D & (D - 1) or heads % kv_heads or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("decode_attention needs a power-of-two head size, heads divisible by kv heads, "
                         "and K/V caches of one layout with contiguous rows")
    q = q.contiguous()
    y = torch.empty_like(q)
    _decode_attention_kernel[(heads,)](q, k_cache, v_cache, mask, pos, y, D ** -0.5, k_cache.stride(0),
                                       k_cache.stride(1), GROUP=heads // kv_heads, D=D, BLOCK_N=block_n,
                                       num_warps=4)
    return y
