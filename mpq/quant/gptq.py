"""GPTQ error compensation (Frantar et al. 2022) over fixed per-group grids ("static groups").

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian's Cholesky factor. Outlier positions are kept exact (their error
is zero: they are stored as fp16 corrections). With `act_order`, columns go in decreasing Hessian
diagonal order; the grids stay those of the original group columns, so the packed layout is unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from mpq.quant.grid import fake_quant

BLOCK = 128


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, with more damping if H is not positive definite."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        try:
            low = torch.linalg.cholesky(h + eye * damp * (10**attempt) * mean_diag)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite yet
            continue
    raise ValueError("Hessian is not positive definite even with heavy damping")


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
                  exact: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Return the quantized (dequantized-valued) weight. scale/zero/maxq/exact are per column: [N, K]."""
    w = w.clone().float()
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        scale, zero, maxq, exact = scale[:, perm], zero[:, perm], maxq[:, perm], exact[:, perm]
    hinv = inverse_hessian_factor(h, damp)
    q = torch.zeros_like(w)
    K = w.shape[1]
    for i1 in range(0, K, BLOCK):
        i2 = min(i1 + BLOCK, K)
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
    if act_order:
        q = q[:, torch.argsort(perm)]
    return q
