"""One SpecEE exit decision at one layer, in one launch: the final RMSNorm of the hidden state, the logits of the
4 draft tokens through their LM-head rows, their softmax and its change since the previously evaluated layer
(the 12 features), the per-layer standardisation, and the MLP 12 -> H -> 1 with its sigmoid.

Done as a dozen small PyTorch ops this costs a dozen launches per predicted layer (inside a CUDA graph each still
costs ~2 us of issue and tail); one program does it all, with every load (hidden state, 4 LM-head rows, one
layer's MLP weights) issued before any arithmetic, so it waits for memory about once.

With `next_norm` the same program also writes what the step's next kernel would: the residual add and the RMSNorm
of the next layer's input (or the model's final norm at the exit layer). It has the sum of squares already, so a
predicted layer then costs one launch instead of two on the step's critical path.

The norm reproduces the engine's rounding (normalise in fp32, round to the activation dtype, multiply by the norm
weight in that dtype), so the logits match `mpq.specee.features.draft_logits` up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.exit_flag import CTL_ACTIVE, CTL_EVALUATED, CTL_EXITED, CTL_FORCED, CTL_TENTATIVE
from kernels.step_ops import norm_num_warps

MAX_DIM = 16384  # one program holds the whole hidden state and the whole MLP in registers
MAX_HIDDEN = 1024


@triton.jit
def _exit_probability_kernel(x_ptr, delta_ptr, norm_ptr, rows_ptr, p_prev_ptr, out_ptr, out_index,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sigma_ptr, slot,
                             next_norm_ptr, x_out_ptr, h_out_ptr, D, H, eps, ctl_ptr, thr_ptr, layer,
                             FIRST: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr, PDL: tl.constexpr, NEXT: tl.constexpr, CTL: tl.constexpr):
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
    if NEXT:
        w_next = tl.load(next_norm_ptr + d, mask=md, other=0.0).to(tl.float32)
    if PDL:  # the weights above are constants; x, delta, the draft rows and p_prev are written during the step
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.load(rows_ptr + k[:, None] * D + d[None, :], mask=md[None, :], other=0.0).to(tl.float32)
    p_prev = tl.load(p_prev_ptr + k)  # unused on the first evaluated layer
    x = tl.load(x_ptr + d, mask=md, other=0.0)
    if CTL:  # the one-graph decoder's control block (kernels.exit_flag): exited, forced exit, active layers
        done = tl.load(ctl_ptr + CTL_EXITED, volatile=True) != 0
        forced = tl.load(ctl_ptr + CTL_FORCED)
        run = (tl.load(ctl_ptr + CTL_ACTIVE + layer) != 0) | (forced == layer)
        evaluated = tl.load(ctl_ptr + CTL_EVALUATED, volatile=True)
    if HAS_DELTA:  # the residual add not yet done by the layer loop, rounded as the engine rounds it
        dx = tl.load(delta_ptr + d, mask=md, other=0.0).to(tl.float32)
        if CTL:  # after an exit the layer before added nothing
            dx = tl.where(done, 0.0, dx)
        x = (x.to(tl.float32) + dx).to(x.dtype)
    # final RMSNorm in fp32, rounded to the activation dtype, times the norm weight in that dtype
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)  # as kernels.step_ops rounds, so that NEXT's h matches it
    xn = (xf * r).to(x.dtype).to(tl.float32)
    if NEXT:
        if HAS_DELTA:
            tl.store(x_out_ptr + d, x, mask=md)
        tl.store(h_out_ptr + d, (w_next * xn).to(h_out_ptr.dtype.element_ty), mask=md)
    if CTL:
        if done | (run == 0):  # exited, or no predictor at this layer for this token: the next norm only
            return
    h = (w * xn).to(x.dtype).to(tl.float32)
    logits = tl.sum(rows * h[None, :], axis=1)
    e = tl.exp(logits - tl.max(logits, axis=0))
    p = e / tl.sum(e, axis=0)
    if CTL:
        delta = tl.where(evaluated == 0, p, p - p_prev)
    elif FIRST:
        delta = p
    else:
        delta = p - p_prev
    tl.store(p_prev_ptr + k, p)
    # standardised features, then the layer's MLP 12 -> H -> 1
    hidden = b1 + tl.sum(((logits - mu_logit) / sd_logit)[:, None] * w1_logit, axis=0)
    hidden += tl.sum(((p - mu_prob) / sd_prob)[:, None] * w1_prob, axis=0)
    hidden += tl.sum(((delta - mu_delta) / sd_delta)[:, None] * w1_delta, axis=0)
    z = tl.sum(tl.maximum(hidden, 0.0) * w2, axis=0) + b2
    prob = 1.0 / (1.0 + tl.exp(-z))
    tl.store(out_ptr + out_index, prob)
    if CTL:  # a predicted exit (or the trace's) asks the exit head that follows for a verification
        fire = tl.where(forced >= 0, forced == layer, prob > tl.load(thr_ptr + slot))
        tl.store(ctl_ptr + CTL_EVALUATED, evaluated + 1)
        if fire:
            tl.store(ctl_ptr + CTL_TENTATIVE, 1)


def _warps(block_d: int, with_next: bool) -> int:
    """With the next norm, kernels.step_ops.add_rms_norm's warp count, so the sum of squares reduces in its order."""
    return norm_num_warps(block_d) if with_next else 16 if block_d >= 2048 else 4


def exit_probability(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, rows: torch.Tensor, p_prev: torch.Tensor,
                     out: torch.Tensor, out_index: int, mlp: tuple[torch.Tensor, ...], slot: int, first: bool,
                     delta: torch.Tensor | None = None, pdl: bool = False,
                     next_norm: torch.Tensor | None = None,
                     control: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Write the exit probability of hidden state x [D] (or x + delta, the residual add the layer loop defers)
    into out[out_index] (fp32) and the draft tokens' softmax into p_prev [4] (fp32, read first as the previous
    layer's unless `first`).

    rows [4, D]: the draft tokens' LM-head rows; mlp = (w1 [P, 12, H], b1 [P, H], w2 [P, H], b2 [P], mu [P, 12],
    sigma [P, 12]), all fp32 and contiguous; slot selects the layer. No host syncs: capturable in a CUDA graph.
    pdl (sm_90+, `kernels.dispatch.pdl_enabled`): launched as a programmatic dependent, the kernel loads the norm
    weight and the MLP while the kernel ahead of it finishes, waits for it, and lets the next kernel launch.
    next_norm [D]: also return what `kernels.step_ops.add_rms_norm(x, delta, next_norm, eps)` returns (new
    tensors of x's shape), computed in the same program.

    control = (ctl, thresholds, layer): the one-graph exit decoder's control block (int32, `kernels.exit_flag`),
    the per-slot thresholds (fp32) and this layer. The kernel then does nothing but the next norm (with delta as
    zero) once the step has exited, and nothing but the next norm where `layer` is neither active for this token
    nor the forced exit; else it computes the probability (the softmax change measured from the previous call
    of this token unless none came before, whatever `first` says), counts the call, and where the probability
    passes the layer's threshold (or `layer` is the forced exit) marks the step for a verification."""
    D = x.numel()
    w1, b1, w2, b2, mu, sigma = mlp
    H = w1.shape[-1]
    if D > MAX_DIM or H > MAX_HIDDEN:
        raise ValueError(f"exit_probability handles hidden sizes up to {MAX_DIM} and MLPs up to {MAX_HIDDEN} wide")
    x_out = h_out = None
    if next_norm is not None:
        x_out = torch.empty_like(x) if delta is not None else x
        h_out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, next_norm.dtype), device=x.device)
    block_d = triton.next_power_of_2(D)
    _exit_probability_kernel[(1,)](x, x if delta is None else delta, norm_weight, rows, p_prev, out, out_index,
                                   w1, b1, w2, b2, mu, sigma, slot,
                                   norm_weight if next_norm is None else next_norm, x if x_out is None else x_out,
                                   x if h_out is None else h_out, D, H, eps,
                                   *(control if control is not None else (p_prev, p_prev, 0)), FIRST=first,
                                   HAS_DELTA=delta is not None, BLOCK_D=block_d,
                                   BLOCK_H=triton.next_power_of_2(H), PDL=pdl, NEXT=next_norm is not None,
                                   CTL=control is not None,
                                   num_warps=_warps(block_d, next_norm is not None),
                                   **({"launch_pdl": True} if pdl else {}))
    return None if next_norm is None else (x_out, h_out)
