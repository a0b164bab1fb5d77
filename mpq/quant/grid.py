"""Per-group asymmetric quantization grids: clipped min-max search, then quantized scales and zeros.

A grid for group j of row r is w ~ s * (q - z), q in [0, 2^b - 1], with s = super_scale[r] * code (code
in 0..255) and z an integer in [0, 2^b - 1]: exactly what format v1 stores. Grids are chosen on the
original weights (GPTQ's "static groups"), minimising the Hessian-diagonal-weighted squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.quant.format import SCALE_CODE_MAX

# Candidate shrink factors of the min-max range: 2-bit grids gain from deep clipping, 4-bit ones from little.
CLIP_FACTORS = {3: tuple(1.0 - 0.04 * i for i in range(13)), 15: tuple(1.0 - 0.03 * i for i in range(8))}


@dataclass
class Grid:
    """Quantized grid of every group: [N, G] tensors, already in their stored form."""

    scale: torch.Tensor  # float, = super_scale * code
    zero: torch.Tensor  # float holding integers
    maxq: torch.Tensor  # 3 or 15 per group
    scale_code: torch.Tensor  # uint8
    super_scale2: torch.Tensor  # [N] fp16
    super_scale4: torch.Tensor  # [N] fp16


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round w onto the grid (broadcasting), returning the dequantized values."""
    q = torch.clamp(torch.round(w / safe_scale(scale)) + zero, torch.zeros_like(maxq), maxq)
    return scale * (q - zero)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def search_group_ranges(w: torch.Tensor, weight: torch.Tensor, maxq: torch.Tensor, keep: torch.Tensor | None = None):
    """Pick (lo, hi) per group among shrunken min-max ranges by weighted squared error.

    w [N, G, g]; weight [G, g] or [N, G, g] (Hessian diagonal); maxq [N, G]; keep [N, G, g] marks the entries
    that count (outliers excluded). Returns lo, hi [N, G] and the best error [N, G].
    """
    big = torch.finfo(w.dtype).max
    wk = w if keep is None else torch.where(keep, w, torch.full_like(w, float("nan")))
    lo = torch.nan_to_num(wk, nan=big).amin(-1).clamp(max=0)
    hi = torch.nan_to_num(wk, nan=-big).amax(-1).clamp(min=0)
    mq = maxq.unsqueeze(-1).to(w.dtype)
    best_err = torch.full(lo.shape, float("inf"), dtype=w.dtype, device=w.device)
    best_lo, best_hi = lo.clone(), hi.clone()
    factors = CLIP_FACTORS[3] if bool((maxq == 3).any()) else CLIP_FACTORS[15]
    for f in factors:
        l, h = lo * f, hi * f
        s = safe_scale((h - l) / maxq.to(w.dtype)).unsqueeze(-1)
        z = torch.round(-l.unsqueeze(-1) / s)
        err = (fake_quant(w, s, z, mq) - w).square() * weight
        if keep is not None:
            err = err * keep
        err = err.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, l, best_lo), torch.where(better, h, best_hi)
    return best_lo, best_hi, best_err


def stored_scales(scale: torch.Tensor, maxq: torch.Tensor):
    """Float group scales [N, G] in their stored form: (scale as stored, uint8 codes, 2-bit and 4-bit per-row fp16
    super-scales), the codes 8-bit under each row's super-scale of its stream."""
    supers = []
    for b in (3, 15):
        sel = maxq == b
        row_max = torch.where(sel, scale, torch.zeros_like(scale)).amax(dim=1)
        ss = (row_max / SCALE_CODE_MAX).clamp(min=1e-8).to(torch.float16)
        ss = torch.where(ss > 0, ss, torch.full_like(ss, 1e-7))  # fp16 underflow guard
        supers.append(ss)
    ss_per_group = torch.where(maxq == 15, supers[1].float().unsqueeze(1), supers[0].float().unsqueeze(1))
    code = torch.clamp(torch.round(scale / ss_per_group), 1, SCALE_CODE_MAX)
    code = torch.where(scale > 0, code, torch.zeros_like(code))
    return ss_per_group * code, code.to(torch.uint8), supers[0], supers[1]


def quantize_grid(lo: torch.Tensor, hi: torch.Tensor, maxq: torch.Tensor) -> Grid:
    """Turn float ranges into the stored grid: 8-bit scale codes under a per-row fp16 super-scale."""
    qscale, code, ss2, ss4 = stored_scales((hi - lo) / maxq.to(lo.dtype), maxq)
    zero = torch.clamp(torch.round(-lo / safe_scale(qscale)), torch.zeros_like(maxq, dtype=lo.dtype), maxq.to(lo.dtype))
    return Grid(qscale, zero, maxq.to(lo.dtype), code, ss2, ss4)
