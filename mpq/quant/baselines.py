"""Uniform baselines (RTN and GPTQ at b bits) for ablations and sweeps, as fake-quantized float weights.

These are the reference methods of shared/notes/quality-anchors.md: plain min-max asymmetric grids per
group with an fp16 scale and an fp16 zero (bits/weight = b + 32/g); GPTQ with static groups and act-order.
They are not packed (format v1 holds 2/4-bit tiles only); they only exist to be compared against.
"""

from __future__ import annotations

import torch

from mpq.quant.gptq import gptq_quantize
from mpq.quant.grid import fake_quant, safe_scale


def uniform_grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column (scale, zero, maxq) [N, K] of plain min-max asymmetric groups."""
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    scale = safe_scale((hi - lo) / maxq)
    zero = torch.round(-lo / scale)
    expand = lambda t: t.repeat_interleave(group_size, dim=1)  # noqa: E731
    return expand(scale), expand(zero), torch.full((n, k), float(maxq))


def uniform_quantize(w: torch.Tensor, h: torch.Tensor | None, bits: int, group_size: int, use_gptq: bool) -> torch.Tensor:
    """The dequantized weight of a uniform b-bit quantization (RTN, or GPTQ when a Hessian is given)."""
    w = w.float()
    scale, zero, maxq = uniform_grid(w, bits, group_size)
    if use_gptq and h is not None:
        return gptq_quantize(w, h.float(), scale, zero, maxq, torch.zeros_like(w, dtype=torch.bool))
    return fake_quant(w, scale, zero, maxq)


def uniform_bits(bits: int, group_size: int) -> float:
    """All-in bits/weight of a uniform grid with fp16 scale and zero per group."""
    return bits + 32 / group_size
