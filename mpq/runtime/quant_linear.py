"""QuantLinear: an nn.Module holding one format-v1 PackedLinear, dispatching to Triton on CUDA and to the
plain-PyTorch reference path (dequantize, then matmul) elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from mpq.quant.format import TENSOR_NAMES, PackedLinear


class QuantLinear(nn.Module):
    def __init__(self, packed: PackedLinear):
        super().__init__()
        self.geometry = {k: v for k, v in packed.meta().items() if k != "bias"}
        for name in TENSOR_NAMES:
            self.register_buffer(name, getattr(packed, name))
        self.register_buffer("bias", packed.bias)
        self._dense: torch.Tensor | None = None  # reference-path cache of the dequantized weight

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
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)
