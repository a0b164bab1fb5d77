"""One SpecEE exit decision at one layer, in one launch: the final RMSNorm of the hidden state, the logits of the
4 draft tokens through their LM-head rows, their softmax and its change since the previously evaluated layer
(the 12 features), the per-layer standardisation, and the MLP 12 -> H -> 1 with its sigmoid.

Done as a dozen small PyTorch ops this costs a dozen launches per predicted layer (inside a CUDA graph each still
costs ~2 us of issue and tail); one launch does it all. For wide models SPLIT programs share the 4 draft logits
(one slice of the hidden state each, partials summed in a fixed order by the last to finish, as the split-K GEMV
does), so no single program walks the 4 LM-head rows alone.

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
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, mu_ptr, sigma_ptr, slot, ws_ptr, cnt_ptr,
                             D, H, eps,
                             FIRST: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr, SPLIT: tl.constexpr):
    # SPLIT programs each take one slice of the hidden state for the 4 draft logits (every program reduces the
    # whole state for the norm); the last to finish sums the partial logits in a fixed order and runs the rest
    sp = tl.program_id(0)
    k = tl.arange(0, 4)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    x = tl.load(x_ptr + d, mask=md, other=0.0)
    if HAS_DELTA:  # the residual add not yet done by the layer loop, rounded as the engine rounds it
        x = (x.to(tl.float32) + tl.load(delta_ptr + d, mask=md, other=0.0).to(tl.float32)).to(x.dtype)
    ds = sp * (BLOCK_D // SPLIT) + tl.arange(0, BLOCK_D // SPLIT)  # this program's slice of the logits' sum
    ms = ds < D
    xs = tl.load(x_ptr + ds, mask=ms, other=0.0)
    if HAS_DELTA:
        xs = (xs.to(tl.float32) + tl.load(delta_ptr + ds, mask=ms, other=0.0).to(tl.float32)).to(x.dtype)
    w = tl.load(norm_ptr + ds, mask=ms, other=0.0).to(tl.float32)
    rows = tl.load(rows_ptr + k[:, None] * D + ds[None, :], mask=ms[None, :], other=0.0).to(tl.float32)
    # final RMSNorm in fp32, rounded to the activation dtype, times the norm weight in that dtype
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    h = (w * (xs.to(tl.float32) * r).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    logits = tl.sum(rows * h[None, :], axis=1)
    if SPLIT > 1:
        tl.store(ws_ptr + sp * 4 + k, logits)
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        last = arrived == SPLIT - 1
    else:
        last = True
    if last:
        if SPLIT > 1:
            logits = tl.zeros((4,), dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                logits += tl.load(ws_ptr + i * 4 + k, cache_modifier=".cg")
            tl.store(cnt_ptr, 0)
        j = tl.arange(0, BLOCK_H)
        mh = j < H
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
        p_prev = tl.load(p_prev_ptr + k)  # unused on the first evaluated layer
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


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
MAX_SPLIT = 32


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial logits and the arrival counter of the split kernel, one pair per device, made on the first (warm-up)
    call, never inside a capture. Calls on one device must not overlap (the exit decisions of a step are a chain
    through p_prev anyway)."""
    if device not in _WORKSPACE:
        _WORKSPACE[device] = (torch.zeros(MAX_SPLIT * 4, dtype=torch.float32, device=device),
                              torch.zeros(1, dtype=torch.int32, device=device))
    return _WORKSPACE[device]


def exit_probability(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, rows: torch.Tensor, p_prev: torch.Tensor,
                     out: torch.Tensor, out_index: int, mlp: tuple[torch.Tensor, ...], slot: int, first: bool,
                     delta: torch.Tensor | None = None, split: int | None = None) -> None:
    """Write the exit probability of hidden state x [D] (or x + delta, the residual add the layer loop defers)
    into out[out_index] (fp32) and the draft tokens' softmax into p_prev [4] (fp32, read first as the previous
    layer's unless `first`).

    rows [4, D]: the draft tokens' LM-head rows; mlp = (w1 [P, 12, H], b1 [P, H], w2 [P, H], b2 [P], mu [P, 12],
    sigma [P, 12]), all fp32 and contiguous; slot selects the layer. split: programs sharing the draft logits (None:
    by the hidden size). No host syncs: capturable in a CUDA graph."""
    D = x.numel()
    w1, b1, w2, b2, mu, sigma = mlp
    H = w1.shape[-1]
    if D > MAX_DIM or H > MAX_HIDDEN:
        raise ValueError(f"exit_probability handles hidden sizes up to {MAX_DIM} and MLPs up to {MAX_HIDDEN} wide")
    if split is None:
        split = 1 if D <= 1024 else 8
    if split not in (1, 2, 4, 8, 16, 32):
        raise ValueError("split must be a power of two up to 32")
    ws, cnt = _workspace(x.device)
    block_d = max(triton.next_power_of_2(D), split)
    _exit_probability_kernel[(split,)](x, x if delta is None else delta, norm_weight, rows, p_prev, out, out_index,
                                       w1, b1, w2, b2, mu, sigma, slot, ws, cnt, D, H, eps, FIRST=first,
                                       HAS_DELTA=delta is not None, BLOCK_D=block_d, BLOCK_H=triton.next_power_of_2(H),
                                       SPLIT=split, num_warps=16 if block_d >= 2048 else 4)
