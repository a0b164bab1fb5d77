"""Split-K epilogue shared by the GEMV and GEMM kernels, in one launch and safe to replay in a CUDA graph.

Each of the SPLIT programs of an output tile writes its fp32 partial to a workspace and bumps the tile's
counter; the last to arrive sums the partials in a fixed order (deterministic), writes the output and resets
the counter to zero, so the counters need zeroing only once, when they are allocated.
"""

import triton
import triton.language as tl


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
