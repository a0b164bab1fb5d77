"""The draft head's last step in one launch: the top 4 of its reduced-vocabulary logits, their target-vocabulary ids
and those ids' LM-head rows, written into fixed buffers.

As PyTorch ops this is a top-k, two gathers and two copies, five small kernels at the end of every draft; in the
one-graph exit decoder they sit on the step's critical path (the next step waits for the draft's rows), and in the
trace bench the first predicted layer waits for them. One program: the logits fit in registers up to MAX_VOCAB.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

K = 4
MAX_VOCAB = 8192  # larger reduced vocabularies take the PyTorch ops (`draft_top4_reference`)


@triton.jit
def _draft_top4_kernel(logits_ptr, vocab_ptr, lm_ptr, top4_ptr, rows_ptr, V, D, lm_stride,
                       BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    v = tl.arange(0, BLOCK_V)
    taken = v >= V
    logits = tl.load(logits_ptr + v, mask=v < V, other=float("-inf")).to(tl.float32)
    logits = tl.where(logits != logits, float("inf"), logits)  # NaN ranks first, as in torch.topk
    d = tl.arange(0, BLOCK_D)
    for i in tl.static_range(4):
        best = tl.max(tl.where(taken, float("-inf"), logits), axis=0)
        # the lowest index among the untaken maxima (distinct ids even where the logits are all -inf)
        idx = tl.min(tl.where((logits == best) & ~taken, v, BLOCK_V), axis=0)
        taken = taken | (v == idx)
        token = tl.load(vocab_ptr + idx)
        tl.store(top4_ptr + i, token)
        for d0 in range(0, D, BLOCK_D):
            m = d0 + d < D
            row = tl.load(lm_ptr + token.to(tl.int64) * lm_stride + d0 + d, mask=m)
            tl.store(rows_ptr + i * D + d0 + d, row, mask=m)


def draft_top4_reference(logits: torch.Tensor, vocab: torch.Tensor, lm_weight: torch.Tensor, top4: torch.Tensor,
                         rows: torch.Tensor) -> None:
    """The same with PyTorch ops (a stable sort: equal logits in vocabulary order, as the kernel takes them)."""
    ids = vocab[logits.view(-1).sort(descending=True, stable=True).indices[:K]]
    top4.copy_(ids)
    rows.copy_(lm_weight[ids])


def draft_top4(logits: torch.Tensor, vocab: torch.Tensor, lm_weight: torch.Tensor, top4: torch.Tensor,
               rows: torch.Tensor) -> None:
    """logits [V] (any float dtype), vocab [V] (int64 target ids) -> top4 [4] (int64) the ids of the 4 largest
    logits, largest first; rows [4, D] (lm_weight's dtype, contiguous) their rows of lm_weight [vocab, D] (rows
    contiguous). No host syncs: capturable in a CUDA graph. CPU tensors take the PyTorch ops (unless the Triton
    interpreter is on, as in the tests)."""
    V, D = logits.numel(), lm_weight.shape[1]
    runs_kernel = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    layout_ok = lm_weight.stride(1) == 1 and rows.is_contiguous() and logits.is_contiguous()
    if not (runs_kernel and layout_ok and K <= V <= MAX_VOCAB):
        draft_top4_reference(logits, vocab, lm_weight, top4, rows)
        return
    block_v = triton.next_power_of_2(V)
    _draft_top4_kernel[(1,)](logits, vocab, lm_weight, top4, rows, V, D, lm_weight.stride(0), BLOCK_V=block_v,
                             BLOCK_D=min(triton.next_power_of_2(D), 1024), num_warps=4 if block_v <= 2048 else 8)
