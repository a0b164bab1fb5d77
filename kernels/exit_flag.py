"""The device-side exit flag of the one-graph exit decoder (mpq/specee/flag_decode.py).

A decode step with early exits is one CUDA graph holding every layer's kernels. Once a verified exit sets the flag
(an int32 that a kernel earlier in the step wrote), the later layers' kernels read it and do no work: a skipped
layer costs its launches, not its weights. A kernel reads the flag after its PDL wait, since the kernel that set it
may still be running when this one starts.

`keep_tiles`: row tiles below it are computed even when the flag is set. The stacked k/v/q projection of a layer
keeps its k and v rows this way in fill mode, so a skipped layer still writes its KV-cache entry.
"""

import triton
import triton.language as tl


@triton.jit
def exited(skip_ptr):
    """True once the step's exit is verified (volatile: another kernel of the step writes it)."""
    return tl.load(skip_ptr, volatile=True) != 0


@triton.jit
def skipped_tile(skip_ptr, tile, keep_tiles):
    """True where the exit flag is set and this row tile is not one of the kept ones."""
    return exited(skip_ptr) & (tile >= keep_tiles)


# The control block: int32 [CTL_ACTIVE + layers]. The decoder writes it at the start of every step (zeros, the
# forced exit, the active layers); the step's kernels update it; the decoder reads it back at the end.
CTL_EXITED = tl.constexpr(0)  # 1 once an exit is verified: the exit flag the layers' kernels read
CTL_TENTATIVE = tl.constexpr(1)  # 1 between a predictor that fired and the exit head that verifies it
CTL_EVALUATED = tl.constexpr(2)  # predictor calls so far in this step
CTL_EXECUTED = tl.constexpr(3)  # decoder layers the step ran (written by the head that produced the token)
CTL_VERIFICATIONS = tl.constexpr(4)
CTL_REJECTIONS = tl.constexpr(5)
CTL_TOKEN = tl.constexpr(6)  # the step's greedy token
CTL_FORCED = tl.constexpr(7)  # -1, or the layer whose predictor fires and whose head accepts (trace replay)
CTL_ACTIVE = tl.constexpr(8)  # [layers]: 1 where a predictor runs for this token
