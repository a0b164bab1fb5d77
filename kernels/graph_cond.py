"""The condition of a CUDA-graph IF node, set from the exit flag by a Triton kernel (the one-graph exit step's
branches: `mpq.runtime.graph_if`).

`cudaGraphSetConditional` is a device builtin of the CUDA runtime that ptxas knows: declared in a small textual
LLVM library that Triton links (`extern_libs`), a Triton kernel calls it like a libdevice function.
"""

import hashlib
import os
import tempfile

import triton
import triton.language as tl

from kernels.exit_flag import CTL_EXITED

_LL = """target triple = "nvptx64-nvidia-cuda"
declare void @cudaGraphSetConditional(i64, i32)
define i32 @mpq_graph_set_conditional(i64 %handle, i32 %value) {
  call void @cudaGraphSetConditional(i64 %handle, i32 %value)
  ret i32 0
}
"""
LIB_NAME = "mpq_graph_cond"
LIB_PATH = os.path.join(tempfile.gettempdir(), f"mpq-graph-cond-{hashlib.sha1(_LL.encode()).hexdigest()[:12]}.ll")


def library_path() -> str:
    """The library's file, written on first use (Triton reads extern libraries from disk)."""
    if not os.path.exists(LIB_PATH):
        tmp = f"{LIB_PATH}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(_LL)
        os.replace(tmp, LIB_PATH)
    return LIB_PATH


@tl.core.extern
def _set_conditional(handle, value, _semantic=None):
    return tl.core.extern_elementwise(
        LIB_NAME, LIB_PATH, [handle, value],
        {(tl.core.dtype("uint64"), tl.core.dtype("uint32")): ("mpq_graph_set_conditional", tl.core.dtype("int32"))},
        is_pure=False, _semantic=_semantic)


@triton.jit(do_not_specialize=["then_handle", "else_handle"])
def _set_branch_kernel(then_handle, else_handle, ctl_ptr):
    going = (tl.load(ctl_ptr + CTL_EXITED, volatile=True) == 0).to(tl.uint32)
    _set_conditional(then_handle.to(tl.uint64), going)
    _set_conditional(else_handle.to(tl.uint64), 1 - going)


def set_branch(then_handle: int, else_handle: int, ctl) -> None:
    """Queue the kernel that opens the `then` IF node while the step has not exited and the `else` one once it has
    (ctl: the control block, `kernels.exit_flag`). Only inside a graph launch: outside one there is nothing to set."""
    _set_branch_kernel[(1,)](then_handle, else_handle, ctl, num_warps=1, extern_libs={LIB_NAME: library_path()})


def warm_up(ctl) -> None:
    """Compile and load the kernel for each integer type a handle may get (i32, i64, u64 by value), outside any
    capture: a capture may not load modules."""
    values = (5, 1 << 40, (1 << 63) + 5)
    for then_handle in values:
        for else_handle in values:
            kernel = _set_branch_kernel.warmup(then_handle, else_handle, ctl, grid=(1,), num_warps=1,
                                               extern_libs={LIB_NAME: library_path()})
            kernel._init_handles()
