"""QuantLinear: an nn.Module holding one format-v1 PackedLinear, dispatching to Triton on CUDA and to the
plain-PyTorch reference path (dequantize, then matmul) elsewhere."""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import nn

from mpq.quant.format import TENSOR_NAMES, PackedLinear, stack_biases

KERNEL_TENSOR_ORDER = ("q2", "s2", "z2", "ss2", "idx2", "ov", "oi", "q4", "s4", "z4", "ss4", "idx4")
SPLIT_COUNTERS_PER_ROW_TILE = 16  # split-K scratch of the kernels (kernels.dispatch.COUNTERS_PER_ROW_TILE)


def _scratch_words(packed: PackedLinear, ragged: bool = False) -> int:
    """The kernels' split-K scratch for this linear (on CUDA also the state of the fenceless epilogue that its
    M = 1 kernel may use: `kernels.dispatch.counter_words`); ragged: for a ragged stack of this geometry."""
    if packed.q2.is_cuda:
        from kernels.dispatch import counter_words

        return counter_words(packed.out_features, packed.in_features, packed.group_size, packed.tile_rows,
                             packed.outliers, packed.q2.device, ragged)
    return SPLIT_COUNTERS_PER_ROW_TILE * packed.row_tiles


def _cuda_matmul(x: torch.Tensor, holder, counters: torch.Tensor, group_size: int, outliers: int,
                 exit_flag: tuple[torch.Tensor, int] | None, parts: list[int] | None = None) -> torch.Tensor:
    """One `mpq::mixed_linear` call over the format tensors `holder` carries (a module's buffers or a
    PackedLinear's views), without bias; exit_flag: (flag, kept row tiles) of the one-graph exit decoder."""
    from mpq.runtime import ops  # imports triton; CPU-only users never need it

    flag, keep = exit_flag or (None, 0)
    return ops.mixed_linear(x, *(getattr(holder, n) for n in KERNEL_TENSOR_ORDER), counters, group_size, outliers,
                            flag, keep, parts)


def _cuda_add(x: torch.Tensor, holder, acc: torch.Tensor, group_size: int, outliers: int,
              exit_flag: tuple[torch.Tensor, int] | None, parts: list[int] | None = None) -> bool:
    """acc += x @ W.T through `mpq::mixed_linear_add` where its kernel runs for x (`sums_in_place`); else False."""
    from kernels.dispatch import grouped_parts, sums_in_place

    tensors = tuple(getattr(holder, n) for n in KERNEL_TENSOR_ORDER)
    x2 = x.reshape(-1, x.shape[-1])
    if not (x2.is_contiguous() and sums_in_place(x2, tensors, group_size=group_size, outliers=outliers,
                                                 parts=grouped_parts(parts))):
        return False
    from mpq.runtime import ops

    flag, keep = exit_flag or (None, 0)
    ops.mixed_linear_add(x, *tensors, acc, group_size, outliers, flag, keep, parts)
    return True


class QuantLinear(nn.Module):
    """Forward on CUDA is one `mpq::mixed_linear` op: no host syncs, no size-varying allocations, so a warmed-up
    call can be captured in a CUDA graph. Warm up each M before capture (that compiles the kernels)."""

    def __init__(self, packed: PackedLinear):
        super().__init__()
        self._hold({k: v for k, v in packed.meta().items() if k != "bias"},
                   {n: getattr(packed, n) for n in TENSOR_NAMES}, packed.bias, _scratch_words(packed))

    def _hold(self, geometry: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, words: int) -> None:
        """The module's state: its geometry, the format tensors and bias as buffers, `words` of split-K scratch."""
        self.geometry = geometry
        for name in TENSOR_NAMES:
            self.register_buffer(name, tensors[name])
        self.register_buffer("bias", bias)
        self.register_buffer("split_counters", torch.zeros(words, dtype=torch.int32, device=tensors["q2"].device),
                             persistent=False)
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

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA path: the Triton kernels (on CPU tensors too, under TRITON_INTERPRET=1, as the tests run it)."""
        y = _cuda_matmul(x, self, self.split_counters, self.geometry["group_size"], self.geometry["outliers"],
                         self.exit_flag)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def add_into(self, x: torch.Tensor, acc: torch.Tensor) -> bool:
        """acc (fp32, contiguous, [..., out_features]) += this linear of x, where its kernel adds its split-K shares
        straight into acc (`kernels.dispatch.sums_in_place`: the decode GEMV on CUDA, or under the interpreter);
        else False, with nothing done. Skips the hand-over of the shares' partial sums, which the decode step pays
        in every such GEMV (benchmarks/e2e-notes.md, run 33); the sum's reader rounds it."""
        if self.bias is not None:  # (off CUDA, sums_in_place holds only under the interpreter)
            return False
        return _cuda_add(x, self, acc, self.geometry["group_size"], self.geometry["outliers"], self.exit_flag,
                         self._parts())

    def _parts(self) -> list[int] | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.kernel_forward(x)
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


class RaggedQuantLinear(StackedQuantLinear):
    """Quantized linears that read one input and differ only in their 4-bit tile count (`PackedLinear.ragged_key`),
    as one decode GEMV launch over their concatenated tensors (`PackedLinear.ragged_rows`), where the tensor-core
    GEMV takes x (`kernels.dispatch.ragged_runs`: CUDA, fp16, M <= 16); elsewhere the parts run one by one, over
    views of the same tensors. Returns the parts' outputs."""

    def __init__(self, parts: list[PackedLinear]):
        nn.Module.__init__(self)
        flat, self.part_slots = PackedLinear.ragged_rows(parts)
        self.part_geometry = [{k: v for k, v in p.meta().items() if k != "bias"} for p in parts]
        head = parts[0]
        self.splits = [p.out_features for p in parts]
        whole = dataclasses.replace(head, out_features=sum(self.splits))  # the geometry the scratch is sized by
        self._hold({**self.part_geometry[0], "out_features": whole.out_features, "n4": None}, flat,
                   stack_biases([p.bias for p in parts], self.splits, head.ss2), _scratch_words(whole, ragged=True))

    def packed_parts(self) -> list[PackedLinear]:
        """The parts, over views of this module's tensors (bias included)."""
        parts = PackedLinear.ragged_views({n: getattr(self, n) for n in TENSOR_NAMES}, self.part_geometry)
        if self.bias is not None:
            for p, start in zip(parts, itertools.accumulate([0] + self.splits)):
                p.bias = self.bias[start:start + p.out_features]
        return parts

    def packed(self) -> PackedLinear:
        raise TypeError("a ragged stack is not one format-v1 linear; see packed_parts()")

    def _parts(self) -> list[int]:
        return [v for slots in self.part_slots for v in slots]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != dtype or self._dense.device != self.q2.device:
            self._dense = torch.cat([p.dequantize(dtype) for p in self.packed_parts()])
        return self._dense

    def leading(self, n: int) -> StackedQuantLinear:
        parts = self.packed_parts()[:n]
        return RaggedQuantLinear(parts) if n > 1 else QuantLinear(parts[0])

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernels.dispatch import ragged_runs

        g, rows = self.geometry["group_size"], self.geometry["tile_rows"]
        if ragged_runs(x.reshape(-1, x.shape[-1]), tuple(getattr(self, n) for n in KERNEL_TENSOR_ORDER), g, rows):
            y = _cuda_matmul(x, self, self.split_counters, g, self.geometry["outliers"], self.exit_flag, self._parts())
        else:  # one by one; the counters alone (no fenceless epilogue state: that is laid out for the whole stack)
            outs = []
            flag, keep = self.exit_flag or (None, 0)
            for p in self.packed_parts():
                counters = self.split_counters[:SPLIT_COUNTERS_PER_ROW_TILE * p.row_tiles]
                outs.append(_cuda_matmul(x, p, counters, g, p.outliers, None if flag is None else (flag, keep)))
                keep = max(keep - p.row_tiles, 0)
            y = torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)
