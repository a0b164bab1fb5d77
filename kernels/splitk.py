"""Split-K epilogue shared by the GEMV and GEMM kernels, in one launch and safe to replay in a CUDA graph.

Each of the SPLIT programs of an output tile writes its fp32 partial to a workspace and bumps the tile's
counter; the last to arrive sums the partials in a fixed order (deterministic), writes the output and resets
the counter to zero, so the counters need zeroing only once, when they are allocated.

The plain epilogue orders each partial before its counter bump with an acq_rel atomic, whose fence makes every
program wait for its partial to reach L2 (0.6-1.3 us a call on an H100, benchmarks/kernels-notes.md version 16).
The tagged one (`finish_split_tagged`) drops that fence: each partial is stored together with the tile's
generation in one 8-byte word, so the last arrival can tell a partial of this call from an older one and re-reads
until all of them are current (the way decoupled look-back scans publish values). It needs a workspace of its own
that keeps its contents between calls, zeroed once, and a generation word per tile.
"""

import triton
import triton.language as tl

GENERATIONS = tl.constexpr(0x7FFFFFFE)  # generations wrap at this; a tag is the generation + 1, never 0 (a zeroed word)


@triton.jit
def finish_split(val, y_ptr, y_offs, ws_ptr, ws_offs, mask, cnt_ptr, sp, split_stride, SPLIT: tl.constexpr):
    if SPLIT == 1:
        tl.store(y_ptr + y_offs, val.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + sp * split_stride + ws_offs, val, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros_like(val)
            for i in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + i * split_stride + ws_offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr, 0)


@triton.jit
def finish_split_tagged(val, y_ptr, y_offs, tw_ptr, ws_offs, mask, cnt_ptr, gen_ptr, gen, sp, split_stride,
                        SPLIT: tl.constexpr):
    """As finish_split for SPLIT > 1, without a fence: tw_ptr is an int64 workspace (value bits | tag << 32) that
    only this caller uses, gen_ptr the tile's generation word and gen its value if the caller read it already
    (after its PDL wait), else None. Call after the kernel's PDL wait."""
    if gen is None:  # the word stays fixed until this tile's last arrival of this call, which follows ours
        gen = tl.load(gen_ptr, volatile=True)
    tag = (gen + 1).to(tl.int64) << 32
    word = tag | (val.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
    tl.store(tw_ptr + sp * split_stride + ws_offs, word, mask=mask)
    arrived = tl.atomic_add(cnt_ptr, 1, sem="relaxed")
    if arrived == SPLIT - 1:
        total, stale = _sum_tagged(val, tw_ptr, ws_offs, mask, tag, split_stride, SPLIT)
        while stale > 0:  # a partial not yet visible: read them all again
            total, stale = _sum_tagged(val, tw_ptr, ws_offs, mask, tag, split_stride, SPLIT)
        tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(cnt_ptr, 0)
        tl.store(gen_ptr, (gen + 1) % GENERATIONS)


@triton.jit
def _sum_tagged(val, tw_ptr, ws_offs, mask, tag, split_stride, SPLIT: tl.constexpr):
    """The sum of the SPLIT tagged partials in a fixed order, and how many of them do not carry `tag`."""
    total = tl.zeros_like(val)
    stale = tl.zeros_like(val).to(tl.int32)
    for i in tl.static_range(SPLIT):
        w = tl.load(tw_ptr + i * split_stride + ws_offs, mask=mask, other=tag, volatile=True)
        total += (w & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        stale += ((w & -4294967296) != tag).to(tl.int32)
    return total, tl.sum(stale)
