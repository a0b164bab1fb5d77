"""QuantLinear: an nn.Module holding one format-v1 PackedLinear, dispatching to Triton on CUDA and to the
plain-PyTorch reference path (dequantize, then matmul) elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from mpq.quant.format import TENSOR_NAMES, PackedLinear

KERNEL_TENSOR_ORDER = ("q2", "s2", "z2", "ss2", "idx2", "ov", "oi", "q4", "s4", "z4", "ss4", "idx4")
SPLIT_COUNTERS_PER_ROW_TILE = 16  # split-K scratch of the kernels (kernels.dispatch.COUNTERS_PER_ROW_TILE)


def _scratch_words(packed: PackedLinear) -> int:
    """The kernels' split-K scratch for this linear (on CUDA also the state of the fenceless epilogue that its
    M = 1 kernel may use: `kernels.dispatch.counter_words`)."""
    if packed.q2.is_cuda:
        from kernels.dispatch import counter_words

        return counter_words(packed.out_features, packed.in_features, packed.group_size, packed.tile_rows,
                             packed.outliers, packed.q2.device)
    return SPLIT_COUNTERS_PER_ROW_TILE * packed.row_tiles


class QuantLinear(nn.Module):
    """Forward on CUDA is one `mpq::mixed_linear` op: no host syncs, no size-varying allocations, so a warmed-up
    call can be captured in a CUDA graph. Warm up each M before capture (that compiles the kernels)."""

    def __init__(self, packed: PackedLinear):
        super().__init__()
        self.geometry = {k: v for k, v in packed.meta().items() if k != "bias"}
        for name in TENSOR_NAMES:
            self.register_buffer(name, getattr(packed, name))
        self.register_buffer("bias", packed.bias)
        self.register_buffer("split_counters", torch.zeros(_scratch_words(packed), dtype=torch.int32,
                                                           device=packed.q2.device), persistent=False)
        self._dense: torch.Tensor | None = None  # reference-path cache of the dequantized weight
        # (flag [1] int32, kept row tiles): the one-graph exit decoder's exit flag, which the CUDA kernels read
        # (mpq/specee/flag_decode.py sets it while it captures its step); the reference path ignores it
        self.exit_flag: tuple[torch.Tensor, int] | None = None

    @property
    def in_features(self) -> int:
        return self.geometry["in_features"]

    @property
    def out_features(self) -> int:
        return self.geometry["out_features"]

    def packed(self) -> PackedLinear:
        return PackedLinear(**self.geometry, **{n: getattr(self, n) for n in TENSOR_NAMES}, bias=self.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != dtype or self._dense.device != self.q2.device:
            self._dense = self.packed().dequantize(dtype)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from mpq.runtime import ops  # imports triton; CPU-only users never need it

            flag, keep = self.exit_flag or (None, 0)
            y = ops.mixed_linear(x, *(getattr(self, n) for n in KERNEL_TENSOR_ORDER), self.split_counters,
                                 self.geometry["group_size"], self.geometry["outliers"], flag, keep)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)


class StackedQuantLinear(QuantLinear):
    """Quantized linears that read one input and share one layout (`PackedLinear.stack_key`), stored as one
    linear: one GEMV launch for the set, whose larger grid fills the card better than three small ones in a
    row. Returns the parts' outputs."""

    def __init__(self, packed: PackedLinear, splits: list[int]):
        super().__init__(packed)
        self.splits = list(splits)

    @classmethod
    def of(cls, parts: list[PackedLinear]) -> "StackedQuantLinear":
        return cls(PackedLinear.stack_rows(parts), [p.out_features for p in parts])

    def leading(self, n: int) -> "StackedQuantLinear":
        """The first n parts as their own module, over views of this one's buffers (no copy)."""
        return StackedQuantLinear(self.packed().leading_rows(sum(self.splits[:n])), self.splits[:n])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(x).split(self.splits, dim=-1)
