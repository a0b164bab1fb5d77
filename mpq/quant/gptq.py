"""GPTQ error compensation (Frantar et al. 2022) over fixed per-group grids ("static groups").

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian's Cholesky factor. Outlier positions are kept exact (their error
is zero: they are stored as fp16 corrections). With `act_order`, columns go in decreasing Hessian
diagonal order; the grids stay those of the original group columns, so the packed layout is unchanged.
With `coarse_first`, each row tile's 2-bit columns go first, and its 4-bit grids may be searched again (by the
caller's `regrid`) on the weights GPTQ has moved before those columns are rounded.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from mpq.quant.grid import fake_quant

BLOCK = 128


def inverse_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp * mean(diag H) * I)^-1, damped further (x10 at a time) until H is positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        low, info = torch.linalg.cholesky_ex(h + eye * damp * (10**attempt) * mean_diag)
        if info == 0:
            return torch.cholesky_inverse(low)
    raise ValueError("Hessian is not positive definite even with heavy damping")


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of inverse_hessian(h, damp): GPTQ's error-propagation weights, in h's column order."""
    return torch.linalg.cholesky(inverse_hessian(h, damp), upper=True)


@contextmanager
def single_threaded():
    """Quantization is many small-to-medium element-wise ops: on a 2-core CPU, OpenMP hand-offs cost more than they
    save, up to 10x slower as soon as another process competes for a core (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hessian_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor | None) -> float:
    """Relative output error ||(W - Q) X|| / ||W X|| through H = X^T X / tokens (plain Frobenius when h is None):
    the quantity GPTQ minimises."""
    d = (w - q).float()
    if h is None:
        return float(d.square().sum().sqrt() / w.float().square().sum().sqrt().clamp(min=1e-12))
    num = torch.einsum("nk,kl,nl->", d, h, d)
    den = torch.einsum("nk,kl,nl->", w.float(), h, w.float())
    return float((num.clamp(min=0) / den.clamp(min=1e-12)).sqrt())


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                  exact: torch.Tensor, damp: float = 0.01, act_order: bool = True,
                  coarse_first: torch.Tensor | None = None, regrid=None) -> torch.Tensor:
    """Return the quantized (dequantized-valued) weight. scale/zero/maxq/exact are per column: [N, K].

    `coarse_first` [T, K] bool (None: one order for all rows): per row tile (N // T rows), these columns (its 2-bit
    ones, as many in every tile) go before the others, each part in act-order, so that the rounding error of the
    coarse grid is spread over columns still to be rounded on the fine grid. Tiles with one pattern share an order,
    and each order needs its own factor of the inverse Hessian (allocations repeat patterns: few orders per linear).
    `regrid(rows, w_rows)`, called once the coarse columns are rounded with those rows' updated weights
    [len(rows), K], returns their (scale, zero) per column: the fine groups' grids refitted to the moved weights."""
    w = w.clone().float()
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    N, K = w.shape
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(K, device=w.device)
    if coarse_first is None:
        return _gptq_ordered(w, inverse_hessian_factor(h[order][:, order], damp), scale, zero, maxq, exact, order)
    hinv = inverse_hessian(h, damp)
    patterns, which = torch.unique(coarse_first, dim=0, return_inverse=True)
    which = which.repeat_interleave(N // coarse_first.shape[0])  # per row
    q = torch.empty_like(w)
    for p, pattern in enumerate(patterns):
        rows = (which == p).nonzero().squeeze(1)
        perm = order[torch.argsort((~pattern[order]).to(torch.int8), stable=True)]  # coarse first, each in order
        factor = torch.linalg.cholesky(hinv[perm][:, perm], upper=True)
        refit = None if regrid is None else (lambda w_rows, rows=rows: regrid(rows, w_rows))
        q[rows] = _gptq_ordered(w[rows], factor, scale[rows], zero[rows], maxq[rows], exact[rows], perm,
                                int(pattern.sum()), refit)
    return q


def _gptq_ordered(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                  exact: torch.Tensor, perm: torch.Tensor, boundary: int = 0, refit=None) -> torch.Tensor:
    """GPTQ of the rows of w with columns taken in the order `perm`; hinv is the upper Cholesky factor of the
    inverse Hessian in that order. Once the first `boundary` columns are rounded, `refit(w)` (w updated, original
    column order) may replace the grids of the rest. Returns the quantized weight in the original column order."""
    inverse = torch.argsort(perm)
    w, scale, zero, maxq, exact = (t[:, perm] for t in (w, scale, zero, maxq, exact))
    q = torch.zeros_like(w)
    K = w.shape[1]
    starts = sorted({*range(0, K, BLOCK), boundary} - {K})
    for i1, i2 in zip(starts, starts[1:] + [K]):
        if i1 == boundary and refit is not None and boundary > 0:
            scale, zero = (t[:, perm] for t in refit(w[:, inverse]))
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with single_threaded() if w.device.type == "cpu" else nullcontext():
            for i in range(i2 - i1):
                c = i1 + i
                col = w1[:, i]
                qc = fake_quant(col, scale[:, c], zero[:, c], maxq[:, c])
                qc = torch.where(exact[:, c], col, qc)
                q[:, c] = qc
                e = (col - qc) / hinv1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, inverse]
