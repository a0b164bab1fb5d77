"""Quantize one linear layer to format v1, given which tiles are 4-bit and how many outliers 2-bit groups keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.quant.format import PackedLinear
from mpq.quant.gptq import gptq_quantize, hessian_error
from mpq.quant.grid import Grid, fake_quant, quantize_grid, safe_scale, search_group_ranges, stored_scales
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
                    act_order: bool = True, damp: float = 0.01, refit_scales: bool = False,
                    coarse_first: bool = False) -> LinearResult:
    """W [N, K] float; h [K, K] (X^T X / tokens) or None for data-free (identity Hessian, no GPTQ).
    `refit_scales`: once the codes are fixed, the group scales are refitted by least squares (refit_group_scales).
    `coarse_first`: GPTQ rounds each row tile's 2-bit groups before its 4-bit ones (gptq_quantize)."""
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

    exact = outlier.reshape(N, K)
    if use_gptq and h is not None:
        regrid = None
        if coarse_first:
            def regrid(rows, w_rows):  # the 4-bit groups' ranges searched again on the weights GPTQ has moved
                new_lo, new_hi, _ = search_group_ranges(w_rows.reshape(-1, G, g), hdiag.reshape(G, g), maxq[rows],
                                                        keep=~outlier[rows])
                lo[rows] = torch.where(is4[rows], new_lo, lo[rows])
                hi[rows] = torch.where(is4[rows], new_hi, hi[rows])
                part = quantize_grid(lo[rows], hi[rows], maxq[rows])
                return _per_col(part.scale, g), _per_col(part.zero, g)
        q = gptq_quantize(w, h.float(), _per_col(grid.scale, g), _per_col(grid.zero, g), _per_col(grid.maxq, g), exact,
                          damp, act_order, _per_col(~spec.tile_is_4bit.to(w.device), g) if coarse_first else None,
                          regrid)
        if coarse_first:  # regrid moved the 4-bit ranges: the stored grid (super-scales per row) follows them
            grid = quantize_grid(lo, hi, maxq)
    else:
        q = torch.where(exact, w, fake_quant(w, _per_col(grid.scale, g), _per_col(grid.zero, g), _per_col(grid.maxq, g)))
    codes = torch.clamp(torch.round(q / safe_scale(_per_col(grid.scale, g))) + _per_col(grid.zero, g), 0,
                        None)
    codes = torch.minimum(codes, _per_col(grid.maxq, g))
    if refit_scales and h is not None:
        grid = refit_group_scales(w, h.float(), codes, grid, exact)
    residual = torch.where(exact, q - _per_col(grid.scale, g) * (codes - _per_col(grid.zero, g)), torch.zeros_like(q))
    offsets, values = _outlier_arrays(exact.reshape(N, G, g), residual.reshape(N, G, g), spec.outliers)
    packed = PackedLinear.pack(
        codes=codes.to(torch.uint8), tile_bits=torch.where(spec.tile_is_4bit, 4, 2).to(torch.uint8),
        scale_codes=grid.scale_code, zeros=grid.zero.to(torch.uint8), super_scale2=grid.super_scale2,
        super_scale4=grid.super_scale4, outlier_offsets=offsets, outlier_values=values, group_size=g, tile_rows=R,
        bias=bias)
    deq = packed.dequantize().to(w.device)
    return LinearResult(packed, hessian_error(w, deq, None if h is None else h.float()), int(exact.sum()))


# how far the refit moves each scale from GPTQ's towards the least-squares optimum: the whole way fits the
# calibration domain (SmolLM2 at 3.0 b/w: Hamlet 1.472 -> 1.462, but pydoc 3.376 -> 3.407); half of it kept Hamlet's
# 1.462 and left pydoc at 3.375 (benchmarks/results/sweep-smollm2-quality*.json, -quality-fullstep*.json)
REFIT_STEP = 0.5


def refit_group_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, grid: Grid,
                       exact: torch.Tensor) -> Grid:
    """The codes fixed, each group's scale moved REFIT_STEP of the way to the one that minimises its row's output
    error (w - sum_g s_g a_g)^T H (...) over the columns that are not outliers (those stay exact: their fp16
    correction absorbs the change), a G x G least-squares problem per row. The result is stored as the format
    stores scales (stored_scales) and kept only for rows where that stored form lowers the error."""
    N, K = w.shape
    G = grid.scale.shape[1]
    g = K // G

    a = torch.where(exact, torch.zeros_like(w), codes - _per_col(grid.zero, g)).reshape(N, G, g)  # per unit scale
    d = torch.where(exact, torch.zeros_like(w), w)
    hb = h.reshape(G, g, G, g)
    m = torch.einsum("nik,ikjl,njl->nij", a, hb, a)  # [N, G, G]
    r = torch.einsum("nik,ikl,nl->ni", a, h.reshape(G, g, K), d)  # [N, G]
    ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
    s_new = torch.linalg.solve(m + ridge[:, None, None] * torch.eye(G, device=m.device, dtype=m.dtype),
                               r.unsqueeze(-1)).squeeze(-1)
    s_new = torch.where(torch.isfinite(s_new) & (s_new > 0), s_new, grid.scale)
    s_new = grid.scale + REFIT_STEP * (s_new - grid.scale)

    scale, code, ss2, ss4 = stored_scales(s_new, grid.maxq)

    def err(sc: torch.Tensor) -> torch.Tensor:  # up to the row's constant d^T H d
        return torch.einsum("ni,nij,nj->n", sc, m, sc) - 2 * (sc * r).sum(1)

    ok = err(scale) < err(grid.scale)
    return Grid(torch.where(ok[:, None], scale, grid.scale), grid.zero, grid.maxq,
                torch.where(ok[:, None], code, grid.scale_code),
                torch.where(ok, ss2, grid.super_scale2), torch.where(ok, ss4, grid.super_scale4))


def _per_col(t: torch.Tensor, g: int) -> torch.Tensor:
    """[N, G] per-group values repeated over each group's g columns: [N, G * g]."""
    return t.repeat_interleave(g, dim=1)


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
