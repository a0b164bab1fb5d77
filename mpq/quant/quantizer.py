"""Quantize one linear layer to format v1, given which tiles are 4-bit and how many outliers 2-bit groups keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.quant.format import PackedLinear
from mpq.quant.gptq import gptq_quantize, hessian_error
from mpq.quant.grid import Grid, fake_quant, quantize_grid, safe_scale, search_group_ranges
from mpq.quant.sensitivity import choose_outliers


@dataclass
class LinearSpec:
    """What the allocator decided for one linear: its 4-bit tiles ([T, G] bool) and outliers per 2-bit group."""

    tile_is_4bit: torch.Tensor
    outliers: int
    group_size: int
    tile_rows: int


@dataclass
class LinearResult:
    packed: PackedLinear
    rel_error: float  # ||(W - Q) X|| / ||W X|| on the calibration Hessian (identity when data-free)
    outliers_stored: int


def quantize_linear(w: torch.Tensor, h: torch.Tensor | None, spec: LinearSpec, *, use_gptq: bool = True,
                    outlier_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    act_order: bool = True, damp: float = 0.01, refit_scales: bool = False) -> LinearResult:
    """W [N, K] float; h [K, K] (X^T X / tokens) or None for data-free (identity Hessian, no GPTQ).
    `refit_scales`: once the codes are fixed, each row's two fp16 super-scales are refitted (refit_super_scales)."""
    w = w.float()
    N, K = w.shape
    g, R = spec.group_size, spec.tile_rows
    G = K // g
    hdiag = torch.ones(K, device=w.device) if h is None else torch.diag(h).float()
    if outlier_mask is None:  # [N, G, g]: the k outliers each group would keep as a 2-bit group
        outlier_mask = choose_outliers(w.reshape(N, G, g), hdiag.reshape(G, g), spec.outliers)[0]
    is4 = spec.tile_is_4bit.to(w.device).repeat_interleave(R, dim=0)  # [N, G]
    maxq = torch.where(is4, 15, 3)
    outlier = outlier_mask.to(w.device) & ~is4.unsqueeze(-1)  # only inside 2-bit groups
    wg = w.reshape(N, G, g)
    lo, hi, _ = search_group_ranges(wg, hdiag.reshape(G, g), maxq, keep=~outlier)
    grid = quantize_grid(lo, hi, maxq)

    def per_col(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(g, dim=1)

    exact = outlier.reshape(N, K)
    if use_gptq and h is not None:
        q = gptq_quantize(w, h.float(), per_col(grid.scale), per_col(grid.zero), per_col(grid.maxq), exact, damp, act_order)
    else:
        q = torch.where(exact, w, fake_quant(w, per_col(grid.scale), per_col(grid.zero), per_col(grid.maxq)))
    codes = torch.clamp(torch.round(q / safe_scale(per_col(grid.scale))) + per_col(grid.zero), 0, None)
    codes = torch.minimum(codes, per_col(grid.maxq))
    if refit_scales and h is not None:
        grid = refit_super_scales(w, h.float(), codes, grid, is4, exact)
    residual = torch.where(exact, q - per_col(grid.scale) * (codes - per_col(grid.zero)), torch.zeros_like(q))
    offsets, values = _outlier_arrays(exact.reshape(N, G, g), residual.reshape(N, G, g), spec.outliers)
    packed = PackedLinear.pack(
        codes=codes.to(torch.uint8), tile_bits=torch.where(spec.tile_is_4bit, 4, 2).to(torch.uint8),
        scale_codes=grid.scale_code, zeros=grid.zero.to(torch.uint8), super_scale2=grid.super_scale2,
        super_scale4=grid.super_scale4, outlier_offsets=offsets, outlier_values=values, group_size=g, tile_rows=R,
        bias=bias)
    deq = packed.dequantize().to(w.device)
    return LinearResult(packed, hessian_error(w, deq, None if h is None else h.float()), int(exact.sum()))


def refit_super_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, grid: Grid, is4: torch.Tensor,
                       exact: torch.Tensor) -> Grid:
    """The codes fixed, each row's 2-bit and 4-bit super-scales (s2, s4) chosen to minimise the row's output error
    (w - s2 a - s4 b)^T H (w - s2 a - s4 b) over the columns that are not outliers (those stay exact: their fp16
    correction absorbs the change). A 2x2 least-squares problem per row, kept only where the fp16-rounded result
    lowers that error."""
    N, K = w.shape
    G = grid.scale.shape[1]
    g = K // G

    def per_col(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(g, dim=1)

    base = torch.where(exact, torch.zeros_like(w), per_col(grid.scale_code.float()) * (codes - per_col(grid.zero)))
    is4c = per_col(is4)
    a = torch.where(is4c, torch.zeros_like(base), base)  # 2-bit columns, per unit s2
    b = torch.where(is4c, base, torch.zeros_like(base))  # 4-bit columns, per unit s4
    d = torch.where(exact, torch.zeros_like(w), w)
    ha, hb = a @ h, b @ h
    m11, m12, m22 = (ha * a).sum(1), (ha * b).sum(1), (hb * b).sum(1)
    r1, r2 = (ha * d).sum(1), (hb * d).sum(1)

    def err(s2: torch.Tensor, s4: torch.Tensor) -> torch.Tensor:  # up to the row's constant d^T H d
        return s2 * s2 * m11 + 2 * s2 * s4 * m12 + s4 * s4 * m22 - 2 * (s2 * r1 + s4 * r2)

    old2, old4 = grid.super_scale2.float(), grid.super_scale4.float()
    det = m11 * m22 - m12 * m12
    tiny = 1e-12 * (m11 * m22).clamp(min=1e-30)
    both = det > tiny
    s2 = torch.where(both, (r1 * m22 - r2 * m12) / det.where(both, torch.ones_like(det)),
                     torch.where(m11 > 0, r1 / m11.clamp(min=1e-30), old2))
    s4 = torch.where(both, (r2 * m11 - r1 * m12) / det.where(both, torch.ones_like(det)),
                     torch.where(m22 > 0, r2 / m22.clamp(min=1e-30), old4))
    s2 = torch.where(m11 > 0, s2, old2).to(torch.float16)
    s4 = torch.where(m22 > 0, s4, old4).to(torch.float16)
    ok = (s2 > 0) & (s4 > 0) & torch.isfinite(s2) & torch.isfinite(s4)
    ok &= err(s2.float(), s4.float()) < err(old2, old4)
    s2 = torch.where(ok, s2, grid.super_scale2)
    s4 = torch.where(ok, s4, grid.super_scale4)
    ss = torch.where(is4, s4.float().unsqueeze(1), s2.float().unsqueeze(1))
    return Grid(ss * grid.scale_code.float(), grid.zero, grid.maxq, grid.scale_code, s2, s4)


def _outlier_arrays(mask: torch.Tensor, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, G, g] mask/residual -> ([N, G, k] offsets, [N, G, k] values); unused slots are (0, 0.0)."""
    if k == 0:
        shape = (*mask.shape[:2], 0)
        return torch.zeros(shape, dtype=torch.uint8, device=mask.device), torch.zeros(shape, dtype=torch.float16, device=mask.device)
    key = mask.to(torch.int64) * mask.shape[-1] * 2 - torch.arange(mask.shape[-1], device=mask.device)
    top = torch.topk(key, k, dim=-1).indices  # masked positions first, in ascending offset
    picked = torch.gather(mask, -1, top)
    vals = torch.where(picked, torch.gather(residual, -1, top), torch.zeros_like(top, dtype=residual.dtype))
    offs = torch.where(picked, top, torch.zeros_like(top))
    return offs.to(torch.uint8), vals.to(torch.float16)
