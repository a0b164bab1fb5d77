"""One SpecEE exit decision at one layer, in one launch: the final RMSNorm of the hidden state, the logits of the
4 draft tokens through their LM-head rows, their softmax and its change since the previously evaluated layer
(the 12 features), the per-layer standardisation, and the MLP 12 -> H -> 1 with its sigmoid.

Done as a dozen small PyTorch ops this costs a dozen launches per predicted layer (inside a CUDA graph each still
costs ~2 us of issue and tail); one program does it all from L2: it reads the hidden state twice (norm, then dot
products), 4 LM-head rows and one layer's MLP weights (~8 KB per hidden unit block).

The norm reproduces the engine's rounding (normalise in fp32, round to the activation dtype, multiply by the norm
weight in that dtype), so the logits match `mpq.specee.features.draft_logits` up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

K_DRAFT = 4
N_FEATURES = 3 * K_DRAFT


@triton.jit
def _exit_probability_kernel(x_ptr, delta_ptr, norm_ptr, rows_ptr, p_prev_ptr, out_ptr, out_index,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sigma_ptr, slot,
                             D, H, eps,
                             FIRST: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    k = tl.arange(0, 4)
    d = tl.arange(0, BLOCK_D)
    # pass 1: mean square of the hidden state, fp32
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        x = tl.load(x_ptr + start + d, mask=start + d < D, other=0.0)
        if HAS_DELTA:  # the residual add not yet done by the layer loop, rounded as the engine rounds it
            x = (x.to(tl.float32) + tl.load(delta_ptr + start + d, mask=start + d < D, other=0.0).to(tl.float32)).to(x.dtype)
        x = x.to(tl.float32)
        acc += x * x
    r = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
    # pass 2: normed state in the activation dtype, dotted with the 4 draft tokens' LM-head rows
    dots = tl.zeros([4, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        m = start + d < D
        xr = tl.load(x_ptr + start + d, mask=m, other=0.0)
        if HAS_DELTA:
            xr = (xr.to(tl.float32) + tl.load(delta_ptr + start + d, mask=m, other=0.0).to(tl.float32)).to(xr.dtype)
        w = tl.load(norm_ptr + start + d, mask=m, other=0.0)
        h = (w.to(tl.float32) * (xr.to(tl.float32) * r).to(xr.dtype).to(tl.float32)).to(xr.dtype).to(tl.float32)
        rows = tl.load(rows_ptr + k[:, None] * D + start + d[None, :], mask=m[None, :], other=0.0).to(tl.float32)
        dots += rows * h[None, :]
    logits = tl.sum(dots, axis=1)
    e = tl.exp(logits - tl.max(logits, axis=0))
    p = e / tl.sum(e, axis=0)
    if FIRST:
        delta = p
    else:
        delta = p - tl.load(p_prev_ptr + k)
    tl.store(p_prev_ptr + k, p)
    # standardised features, then the layer's MLP
    f0 = (logits - tl.load(mu_ptr + slot * 12 + k)) / tl.load(sigma_ptr + slot * 12 + k)
    f1 = (p - tl.load(mu_ptr + slot * 12 + 4 + k)) / tl.load(sigma_ptr + slot * 12 + 4 + k)
    f2 = (delta - tl.load(mu_ptr + slot * 12 + 8 + k)) / tl.load(sigma_ptr + slot * 12 + 8 + k)
    j = tl.arange(0, BLOCK_H)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for hs in range(0, H, BLOCK_H):
        mh = hs + j < H
        base = w1_ptr + slot * 12 * H + k[:, None] * H + hs + j[None, :]
        hidden = tl.load(b1_ptr + slot * H + hs + j, mask=mh, other=0.0)
        hidden += tl.sum(f0[:, None] * tl.load(base, mask=mh[None, :], other=0.0), axis=0)
        hidden += tl.sum(f1[:, None] * tl.load(base + 4 * H, mask=mh[None, :], other=0.0), axis=0)
        hidden += tl.sum(f2[:, None] * tl.load(base + 8 * H, mask=mh[None, :], other=0.0), axis=0)
        total += tl.maximum(hidden, 0.0) * tl.load(w2_ptr + slot * H + hs + j, mask=mh, other=0.0)
    z = tl.sum(total, axis=0) + tl.load(b2_ptr + slot)
    tl.store(out_ptr + out_index, 1.0 / (1.0 + tl.exp(-z)))


def exit_probability(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, rows: torch.Tensor, p_prev: torch.Tensor,
                     out: torch.Tensor, out_index: int, mlp: tuple[torch.Tensor, ...], slot: int, first: bool,
                     delta: torch.Tensor | None = None) -> None:
    """Write the exit probability of hidden state x [D] (or x + delta, the residual add the layer loop defers)
    into out[out_index] (fp32) and the draft tokens' softmax into p_prev [4] (fp32, read first as the previous
    layer's unless `first`).

    rows [4, D]: the draft tokens' LM-head rows; mlp = (w1 [P, 12, H], b1 [P, H], w2 [P, H], b2 [P], mu [P, 12],
    sigma [P, 12]), all fp32 and contiguous; slot selects the layer. No host syncs: capturable in a CUDA graph."""
    D = x.numel()
    w1, b1, w2, b2, mu, sigma = mlp
    H = w1.shape[-1]
    # one program is latency-bound: take the whole hidden state (and the whole MLP) in one block, with many warps
    block_d = min(triton.next_power_of_2(D), 8192)
    _exit_probability_kernel[(1,)](x, x if delta is None else delta, norm_weight, rows, p_prev, out, out_index,
                                   w1, b1, w2, b2, mu, sigma, slot, D, H, eps, FIRST=first, HAS_DELTA=delta is not None,
                                   BLOCK_D=block_d, BLOCK_H=min(triton.next_power_of_2(H), 512),
                                   num_warps=16 if block_d >= 2048 else 4)
