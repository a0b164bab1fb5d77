"""Per-layer exit predictors (MLP 12 -> 512 -> 1, ReLU, sigmoid), stored stacked so that all layers train in one
batched matmul and one evaluation at decode time is a handful of tiny ops (about 7k multiply-adds).

Inputs are standardised per layer (mean/std from the training features): logits grow with depth, and a shared
scale would make the shallow layers' MLPs see nearly constant inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpq.specee.features import N_FEATURES, draft_logits_folded, features

HIDDEN = 512


class ExitPredictors(nn.Module):
    """One MLP per layer in `layers` (ascending layer indices); slot s holds layers[s]."""

    def __init__(self, layers: list[int], hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        P = len(layers)
        self.layers = list(layers)
        self.slot = {layer: s for s, layer in enumerate(layers)}
        self.w1 = nn.Parameter(torch.randn(P, N_FEATURES, hidden, generator=gen) / N_FEATURES ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(P, hidden))
        self.w2 = nn.Parameter(torch.randn(P, hidden, generator=gen) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(P))
        self.register_buffer("mu", torch.zeros(P, N_FEATURES))
        self.register_buffer("sigma", torch.ones(P, N_FEATURES))
        self.register_buffer("threshold", torch.full((P,), 0.5))
        self._folded: tuple | None = None  # prob_folded's weights, derived on first use

    def logits_all(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [P, N, 12] -> exit logits [P, N] (training and offline evaluation)."""
        z = (feats - self.mu[:, None]) / self.sigma[:, None]
        h = torch.relu(torch.baddbmm(self.b1[:, None], z, self.w1))
        return (h @ self.w2[:, :, None]).squeeze(-1) + self.b2[:, None]

    def logits_one(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, 12] at one layer -> exit logits [N]."""
        s = self.slot[layer]
        z = (feats - self.mu[s]) / self.sigma[s]
        return torch.relu(torch.addmm(self.b1[s], z, self.w1[s])) @ self.w2[s] + self.b2[s]

    def prob(self, layer: int, feat: torch.Tensor) -> torch.Tensor:
        """Exit probability at one layer for feat [12] (decode time)."""
        s = self.slot[layer]
        z = (feat - self.mu[s]) / self.sigma[s]
        h = torch.relu(torch.addmv(self.b1[s], self.w1[s].t(), z))
        return torch.sigmoid(h @ self.w2[s] + self.b2[s])

    def kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2, mu, sigma), fp32 and contiguous: the `mlp` argument of kernels.exit_predictor."""
        return tuple(t.detach().float().contiguous() for t in (self.w1, self.b1, self.w2, self.b2, self.mu, self.sigma))

    def prob_folded(self, layer: int, feat: torch.Tensor) -> float:
        """`prob` with the standardisation folded into the first layer (computed once): 3 ops instead of 7, for
        the CPU decode path, where each small op costs more than its arithmetic."""
        if self._folded is None or self._folded[0].device != feat.device:
            w1 = self.w1.detach() / self.sigma[:, :, None]
            b1 = self.b1.detach() - torch.einsum("pf,pfh->ph", self.mu / self.sigma, self.w1.detach())
            self._folded = (w1.transpose(1, 2).contiguous(), b1, self.w2.detach(), [float(b) for b in self.b2])
        w1t, b1, w2, b2 = self._folded
        s = self.slot[layer]
        z = float(torch.dot(torch.addmv(b1[s], w1t[s], feat).relu_(), w2[s])) + b2[s]
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def prob_from_hidden(self, layer: int, x: torch.Tensor, rows_w: torch.Tensor, eps: float,
                         p_prev: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        """One predicted layer on the CPU decode path, from residual x: (exit probability, the draft tokens' softmax
        for the next call). rows_w = the draft tokens' LM-head rows times the final norm's weight (once per token)."""
        feat, p = features(draft_logits_folded(x, rows_w, eps), p_prev)
        return self.prob_folded(layer, feat), p

    def tensors(self, prefix: str = "specee") -> dict[str, torch.Tensor]:
        """Per-layer tensors named specee.blk.N.* (the artifact's naming), fp32."""
        out = {}
        for s, layer in enumerate(self.layers):
            p = f"{prefix}.blk.{layer}."
            for name in ("w1", "b1", "w2", "b2", "mu", "sigma", "threshold"):
                out[p + name] = getattr(self, name)[s].detach().float().contiguous().clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layers: list[int], prefix: str = "specee") -> "ExitPredictors":
        hidden = tensors[f"{prefix}.blk.{layers[0]}.w1"].shape[-1]
        pred = cls(layers, hidden)
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2", "mu", "sigma", "threshold"):
                getattr(pred, name).copy_(torch.stack([tensors[f"{prefix}.blk.{layer}.{name}"] for layer in layers]))
        return pred.eval()
