"""The one torch custom op over the format-v1 kernels, so torch.compile and CUDA graphs see an opaque,
shape-known call instead of Triton launches (importing this module imports triton)."""

from __future__ import annotations

import torch

from kernels.dispatch import grouped_parts, mixed_matmul, mixed_matmul_add


@torch.library.custom_op("mpq::mixed_linear", mutates_args=())
def mixed_linear(x: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor, ss2: torch.Tensor,
                 idx2: torch.Tensor, ov: torch.Tensor, oi: torch.Tensor, q4: torch.Tensor, s4: torch.Tensor,
                 z4: torch.Tensor, ss4: torch.Tensor, idx4: torch.Tensor, counters: torch.Tensor,
                 group_size: int, outliers: int, skip: torch.Tensor | None = None,
                 keep_tiles: int = 0, parts: list[int] | None = None) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N]. `counters` is split-K scratch: the counters the kernels leave at zero, and
    the fenceless epilogue's generations and workspace, state that no caller reads (so: not a mutation).
    skip, keep_tiles: the one-graph exit decoder's flag (`kernels.exit_flag`); rows it skips are not written.
    parts: a ragged stack's (row tiles, n2, n4) of each part, flattened (`kernels.dispatch.mixed_matmul`)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    tensors = (q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4)
    y = mixed_matmul(x2, tensors, group_size=group_size, outliers=outliers, counters=counters, skip=skip,
                     keep_tiles=keep_tiles, parts=grouped_parts(parts))
    return y.reshape(*x.shape[:-1], ss2.shape[0])


@mixed_linear.register_fake
def _(x, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, counters, group_size, outliers, skip=None,
      keep_tiles=0, parts=None):
    return x.new_empty(*x.shape[:-1], ss2.shape[0])


@torch.library.custom_op("mpq::mixed_linear_add", mutates_args=("acc",))
def mixed_linear_add(x: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor, ss2: torch.Tensor,
                     idx2: torch.Tensor, ov: torch.Tensor, oi: torch.Tensor, q4: torch.Tensor, s4: torch.Tensor,
                     z4: torch.Tensor, ss4: torch.Tensor, idx4: torch.Tensor, acc: torch.Tensor, group_size: int,
                     outliers: int, skip: torch.Tensor | None = None, keep_tiles: int = 0,
                     parts: list[int] | None = None) -> None:
    """acc [..., N] (fp32) += x [..., K] @ W.T, where `kernels.dispatch.sums_in_place` holds for x."""
    tensors = (q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4)
    mixed_matmul_add(x.reshape(-1, x.shape[-1]).contiguous(), tensors, acc.view(-1, acc.shape[-1]),
                     group_size=group_size, outliers=outliers, skip=skip, keep_tiles=keep_tiles,
                     parts=grouped_parts(parts))
