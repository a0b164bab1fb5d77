"""Which layers run a predictor: an offline set chosen from the exit-layer histogram, plus online neighbours.

Offline: the K layers that minimise the expected executed layers if every token exited at the first scheduled
layer at or after its oracle layer (a small dynamic programme over layer indices); `auto` K adds the cost of the
predictor calls (in decoder-layer units) and keeps the cheapest K. Online (contextual similarity): the layers
e-2, e, e+2 around the exit layer index e of each of the last 5 tokens (the paper's e-1+{-2,0,+2} in 1-based
layer counts).
"""

from __future__ import annotations

from collections import deque

import torch

ONLINE_HISTORY = 5
ONLINE_OFFSETS = (-2, 0, 2)


def expected_layers(hist: torch.Tensor, layers: list[int]) -> tuple[float, float]:
    """(mean executed layers, mean predictor calls) when each token exits at the first scheduled layer >= its
    oracle layer index (hist[k] = tokens whose earliest matching layer index is k; the last index = no early exit)."""
    L = hist.numel()
    total = float(hist.sum()) or 1.0
    chosen = sorted(layers)
    depth = calls = 0.0
    for k in range(L):
        n = float(hist[k])
        if n == 0:
            continue
        later = [s for s in chosen if s >= k]
        exit_at = later[0] if later else L - 1
        depth += n * (exit_at + 1)
        calls += n * sum(1 for s in chosen if s <= exit_at)
    return depth / total, calls / total


def best_layers(hist: torch.Tensor, k: int) -> list[int]:
    """The k layer indices (< L-1) minimising the expected executed layers under `hist` (exact DP)."""
    L = hist.numel()
    h = [float(x) for x in hist]
    cand = list(range(L - 1))
    k = min(k, len(cand))
    if k <= 0:
        return []
    INF = float("inf")
    # cost[m][j]: tokens with oracle <= cand[j], m layers chosen, the last one at cand[j]
    cost = [[INF] * len(cand) for _ in range(k + 1)]
    back = [[-1] * len(cand) for _ in range(k + 1)]
    prefix = [0.0]
    for x in h:
        prefix.append(prefix[-1] + x)

    def block(lo: int, hi: int) -> float:  # tokens with oracle in [lo, hi] exit after layer hi
        return (prefix[hi + 1] - prefix[lo]) * (hi + 1)

    for j, c in enumerate(cand):
        cost[1][j] = block(0, c)
    for m in range(2, k + 1):
        for j, c in enumerate(cand):
            for i in range(j):
                v = cost[m - 1][i] + block(cand[i] + 1, c)
                if v < cost[m][j]:
                    cost[m][j], back[m][j] = v, i
    tail = lambda j: (prefix[L] - prefix[cand[j] + 1]) * L  # noqa: E731  (tokens past the last chosen layer)
    j = min(range(len(cand)), key=lambda j: cost[k][j] + tail(j))
    out, m = [], k
    while m >= 1 and j >= 0:
        out.append(cand[j])
        j, m = back[m][j], m - 1
    return sorted(out)


def auto_layers(hist: torch.Tensor, call_cost: float, max_k: int | None = None) -> list[int]:
    """The K (and its layers) minimising expected layers + call_cost * expected predictor calls."""
    L = hist.numel()
    best, best_cost = [], float(L)
    for k in range(1, (max_k or L - 1) + 1):
        layers = best_layers(hist, k)
        depth, calls = expected_layers(hist, layers)
        if depth + call_cost * calls < best_cost - 1e-9:
            best, best_cost = layers, depth + call_cost * calls
    return best


class OnlineSchedule:
    """The offline layers plus the neighbours of the last few exit layers, restricted to layers with predictors."""

    def __init__(self, offline: list[int], available: list[int], history: int = ONLINE_HISTORY):
        self.offline, self.available = set(offline), set(available)
        self.recent: deque[int] = deque(maxlen=history)

    def record_exit(self, layer: int) -> None:
        self.recent.append(layer)

    def layers(self) -> set[int]:
        near = {e + d for e in self.recent for d in ONLINE_OFFSETS}
        return self.offline | (near & self.available)
