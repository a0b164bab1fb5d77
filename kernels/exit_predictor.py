"""One SpecEE exit decision at one layer, in one launch: the final RMSNorm of the hidden state, the logits of the
4 draft tokens through their LM-head rows, their softmax and its change since the previously evaluated layer
(the 12 features), the per-layer standardisation, and the MLP 12 -> H -> 1 with its sigmoid.

Done as a dozen small PyTorch ops this costs a dozen launches per predicted layer (inside a CUDA graph each still
costs ~2 us of issue and tail); one program does it all, with every load (hidden state, 4 LM-head rows, one
layer's MLP weights) issued before any arithmetic, so it waits for memory about once.

The norm reproduces the engine's rounding (normalise in fp32, round to the activation dtype, multiply by the norm
weight in that dtype), so the logits match `mpq.specee.features.draft_logits` up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DIM = 16384  # one program holds the whole hidden state and the whole MLP in registers
MAX_HIDDEN = 1024


@triton.jit
def _exit_probability_kernel(x_ptr, delta_ptr, norm_ptr, rows_ptr, p_prev_ptr, out_ptr, out_index,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sigma_ptr, slot,
                             D, H, eps,
                             FIRST: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    # every load is issued up front (none depends on another), so the program pays about one memory latency
    k = tl.arange(0, 4)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    j = tl.arange(0, BLOCK_H)
    mh = j < H
    w = tl.load(norm_ptr + d, mask=md, other=0.0).to(tl.float32)
    w1 = w1_ptr + slot * 12 * H + k[:, None] * H + j[None, :]
    w1_logit = tl.load(w1, mask=mh[None, :], other=0.0)
    w1_prob = tl.load(w1 + 4 * H, mask=mh[None, :], other=0.0)
    w1_delta = tl.load(w1 + 8 * H, mask=mh[None, :], other=0.0)
    b1 = tl.load(b1_ptr + slot * H + j, mask=mh, other=0.0)
    w2 = tl.load(w2_ptr + slot * H + j, mask=mh, other=0.0)
    b2 = tl.load(b2_ptr + slot)
    mu_logit = tl.load(mu_ptr + slot * 12 + k)
    mu_prob = tl.load(mu_ptr + slot * 12 + 4 + k)
    mu_delta = tl.load(mu_ptr + slot * 12 + 8 + k)
    sd_logit = tl.load(sigma_ptr + slot * 12 + k)
    sd_prob = tl.load(sigma_ptr + slot * 12 + 4 + k)
    sd_delta = tl.load(sigma_ptr + slot * 12 + 8 + k)
    if PDL:  # the weights above are constants; x, delta, the draft rows and p_prev are written during the step
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.load(rows_ptr + k[:, None] * D + d[None, :], mask=md[None, :], other=0.0).to(tl.float32)
    p_prev = tl.load(p_prev_ptr + k)  # unused on the first evaluated layer
    x = tl.load(x_ptr + d, mask=md, other=0.0)
    if HAS_DELTA:  # the residual add not yet done by the layer loop, rounded as the engine rounds it
        x = (x.to(tl.float32) + tl.load(delta_ptr + d, mask=md, other=0.0).to(tl.float32)).to(x.dtype)
    # final RMSNorm in fp32, rounded to the activation dtype, times the norm weight in that dtype
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    h = (w * (xf * r).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    logits = tl.sum(rows * h[None, :], axis=1)
    e = tl.exp(logits - tl.max(logits, axis=0))
    p = e / tl.sum(e, axis=0)
    if FIRST:
        delta = p
    else:
        delta = p - p_prev
    tl.store(p_prev_ptr + k, p)
    # standardised features, then the layer's MLP 12 -> H -> 1
    hidden = b1 + tl.sum(((logits - mu_logit) / sd_logit)[:, None] * w1_logit, axis=0)
    hidden += tl.sum(((p - mu_prob) / sd_prob)[:, None] * w1_prob, axis=0)
    hidden += tl.sum(((delta - mu_delta) / sd_delta)[:, None] * w1_delta, axis=0)
    z = tl.sum(tl.maximum(hidden, 0.0) * w2, axis=0) + b2
    tl.store(out_ptr + out_index, 1.0 / (1.0 + tl.exp(-z)))


def exit_probability(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, rows: torch.Tensor, p_prev: torch.Tensor,
                     out: torch.Tensor, out_index: int, mlp: tuple[torch.Tensor, ...], slot: int, first: bool,
                     delta: torch.Tensor | None = None, pdl: bool = False) -> None:
    """Write the exit probability of hidden state x [D] (or x + delta, the residual add the layer loop defers)
    into out[out_index] (fp32) and the draft tokens' softmax into p_prev [4] (fp32, read first as the previous
    layer's unless `first`).

    rows [4, D]: the draft tokens' LM-head rows; mlp = (w1 [P, 12, H], b1 [P, H], w2 [P, H], b2 [P], mu [P, 12],
    sigma [P, 12]), all fp32 and contiguous; slot selects the layer. No host syncs: capturable in a CUDA graph.
    pdl (sm_90+, `kernels.dispatch.pdl_enabled`): launched as a programmatic dependent, the kernel loads the norm
    weight and the MLP while the kernel ahead of it finishes, waits for it, and lets the next kernel launch."""
    D = x.numel()
    w1, b1, w2, b2, mu, sigma = mlp
    H = w1.shape[-1]
    if D > MAX_DIM or H > MAX_HIDDEN:
        raise ValueError(f"exit_probability handles hidden sizes up to {MAX_DIM} and MLPs up to {MAX_HIDDEN} wide")
    block_d = triton.next_power_of_2(D)
    _exit_probability_kernel[(1,)](x, x if delta is None else delta, norm_weight, rows, p_prev, out, out_index,
                                   w1, b1, w2, b2, mu, sigma, slot, D, H, eps, FIRST=first, HAS_DELTA=delta is not None,
                                   BLOCK_D=block_d, BLOCK_H=triton.next_power_of_2(H), PDL=pdl,
                                   num_warps=16 if block_d >= 2048 else 4, **({"launch_pdl": True} if pdl else {}))
