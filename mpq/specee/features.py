"""The 12 exit features of SpecEE at one layer: for the 4 draft tokens, their logits through the final norm and
their LM-head rows, the softmax over those 4, and its change since the previously evaluated layer.

Only 4 LM-head rows are touched per evaluated layer (4 x dim multiply-adds), which is why a predicted layer costs
a small fraction of a decoder layer; the full LM head runs only to verify a predicted exit.
"""

from __future__ import annotations

import torch

K_DRAFT = 4
N_FEATURES = 3 * K_DRAFT


def final_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's final RMSNorm with the engine's rounding (normalise in fp32, cast back, scale)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def draft_logits(h_normed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of the draft tokens: h_normed [..., D] against their LM-head rows [..., K, D] -> [..., K] (fp32)."""
    return (rows.float() @ h_normed.float().unsqueeze(-1)).squeeze(-1)


def fold_norm(rows: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """The draft tokens' LM-head rows times the final norm's weight (fp32), once per token: `draft_logits_folded`'s
    rows_w."""
    return rows.float() * norm_weight.float()


def draft_logits_folded(x: torch.Tensor, rows_w: torch.Tensor, eps: float) -> torch.Tensor:
    """draft_logits(final_norm(x, w), rows) for fp32 x, with the norm weight folded into the rows once per token
    (rows_w = rows * w) and the RMS scale applied to the 4 logits instead of the D values: 3 ops instead of ~10
    on the CPU decode path (equal up to fp32 reassociation; the fp16 rounding of `final_norm` is not emulated)."""
    xf = x.reshape(-1).float()
    r = (float(torch.dot(xf, xf)) / xf.numel() + eps) ** -0.5
    return torch.mv(rows_w, xf) * r


def features(logits: torch.Tensor, p_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [..., 12], p [..., 4]); p_prev None means this is the first evaluated layer (change = p itself)."""
    p = torch.softmax(logits, dim=-1)
    delta = p if p_prev is None else p - p_prev
    return torch.cat((logits, p, delta), dim=-1), p


def features_from_logits(layer_logits: torch.Tensor, prev_index: torch.Tensor) -> torch.Tensor:
    """Training features for many layers at once.

    layer_logits [L, N, 4] (draft-token logits at every layer); prev_index [L, N] the layer whose softmax counts as
    "previously evaluated" (-1: none). Returns [L, N, 12]."""
    p = torch.softmax(layer_logits, dim=-1)
    idx = prev_index.clamp_min(0)
    p_prev = p.gather(0, idx.unsqueeze(-1).expand(-1, -1, p.shape[-1]))
    delta = torch.where((prev_index >= 0).unsqueeze(-1), p - p_prev, p)
    return torch.cat((layer_logits, p, delta), dim=-1)
