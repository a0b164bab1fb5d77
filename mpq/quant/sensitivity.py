"""Per-group sensitivity and outlier choice, from the weights and the Hessian diagonal.

S2 / S4 of a group = Hessian-diagonal-weighted squared error of its best (clipped) 2-bit / 4-bit grid,
2-bit after removing its k outliers. The benefit of making a tile 4-bit is the sum over its rows of
S2 - S4. The pieces (Hessian term, range term) are kept for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.quant.grid import search_group_ranges


@dataclass
class GroupSensitivity:
    err2: torch.Tensor  # [N, G] weighted error of the 2-bit grid with outliers removed
    err4: torch.Tensor  # [N, G] weighted error of the 4-bit grid
    outlier_mask: torch.Tensor  # [N, G, g] bool, the k outliers chosen for each group (if it stays 2-bit)
    hessian_term: torch.Tensor  # [G] mean Hessian diagonal of each group column
    range_term: torch.Tensor  # [N, G] max - min of each group

    def tile_benefit(self, tile_rows: int) -> torch.Tensor:
        """[T, G]: error removed by giving each tile 4 bits instead of 2."""
        gain = (self.err2 - self.err4).clamp(min=0)
        return gain.reshape(-1, tile_rows, gain.shape[1]).sum(dim=1)


def choose_outliers(w: torch.Tensor, hdiag: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k outliers per group among its extremes (top a, bottom k - a) by the 2-bit error they remove.

    w [N, G, g], hdiag [G, g]. Returns (mask [N, G, g], err2 [N, G]).
    """
    N, G, g = w.shape
    maxq = torch.full((N, G), 3, device=w.device)
    if k == 0:
        return torch.zeros_like(w, dtype=torch.bool), search_group_ranges(w, hdiag, maxq)[2]
    order = torch.argsort(w, dim=-1)
    best_err, best_mask = None, None
    for a in range(k + 1):
        picks = torch.cat([order[..., g - a:], order[..., : k - a]], dim=-1)
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, picks, True)
        err = search_group_ranges(w, hdiag, maxq, keep=~mask)[2]
        if best_err is None:
            best_err, best_mask = err, mask
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mask = torch.where(better.unsqueeze(-1), mask, best_mask)
    return best_mask, best_err


def group_sensitivity(w: torch.Tensor, hdiag: torch.Tensor, group_size: int, ks: tuple[int, ...] = (1,)) -> dict[int, GroupSensitivity]:
    """{k: GroupSensitivity} for each candidate outlier count k (the 4-bit error is shared)."""
    N, K = w.shape
    wg = w.reshape(N, K // group_size, group_size).float()
    hg = hdiag.reshape(K // group_size, group_size).float()
    err4 = search_group_ranges(wg, hg, torch.full((N, K // group_size), 15, device=w.device))[2]
    out = {}
    for k in ks:
        mask, err2 = choose_outliers(wg, hg, k)
        out[k] = GroupSensitivity(err2, err4, mask, hg.mean(-1), wg.amax(-1) - wg.amin(-1))
    return out
