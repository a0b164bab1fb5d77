"""The exit head of the one-graph exit decoder: final RMSNorm, fp16 LM head and greedy argmax in one launch,
with the verification of a predicted exit (is the argmax one of the draft's 4 tokens?) done by its last program.

The decoder places one after every layer that may carry a predictor, and one after the last layer. The first kind
does nothing unless the predictor before it fired (`CTL_TENTATIVE`), the last kind nothing once the step has
exited (`CTL_EXITED`), so a step pays for the LM head about once, as a step without exits does. cuBLAS cannot
skip itself, hence a Triton GEMV: programs walk blocks of vocabulary rows, each keeps its best (logit, row), and one
64-bit atomic max per program combines them (the logit in the high word, ordered as a signed integer; the
complement of the row in the low word, so that a tie goes to the lower row, as torch.argmax does). Logits are
rounded to the LM head's dtype before the comparison, as the engine's LM head rounds its output.
"""

import torch
import triton
import triton.language as tl

from kernels.exit_flag import (CTL_EXECUTED, CTL_EXITED, CTL_FORCED, CTL_REJECTIONS, CTL_TENTATIVE, CTL_TOKEN,
                               CTL_VERIFICATIONS)

KEY_FLOOR = -(2 ** 63)  # the argmax word's value between calls
KEY_FLOOR_C = tl.constexpr(KEY_FLOOR)
LOW_WORD = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _residual(x_ptr, d_ptr, offs, ok, HAS_DELTA: tl.constexpr):
    """x (+ the pending delta, rounded to x's dtype as the engine's residual add rounds) at offs."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _normed(x_ptr, d_ptr, w_ptr, offs, ok, r, HAS_DELTA: tl.constexpr):
    """The final norm's output at offs, rounded as kernels.step_ops rounds it (fp32 values of fp16 numbers)."""
    x = _residual(x_ptr, d_ptr, offs, ok, HAS_DELTA)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return (w * (x.to(tl.float32) * r).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)


@triton.jit
def _exit_head_kernel(x_ptr, d_ptr, norm_ptr, lm_ptr, hn_ptr, top4_ptr, ctl_ptr, key_ptr, cnt_ptr,
                      V, D, eps, layer, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, FINAL: tl.constexpr,
                      HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if FINAL:
        if tl.load(ctl_ptr + CTL_EXITED, volatile=True) != 0:
            return
    else:
        if tl.load(ctl_ptr + CTL_TENTATIVE, volatile=True) == 0:
            return
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _residual(x_ptr + d0, d_ptr + d0, offs_d, d0 + offs_d < D, HAS_DELTA).to(tl.float32)
        sq += x * x
    r = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
    offs_v = tl.arange(0, BLOCK_V)
    best = float("-inf")
    best_row = 0
    for blk in range(pid, tl.cdiv(V, BLOCK_V), nprog):
        rows = blk * BLOCK_V + offs_v
        acc = tl.zeros([BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs_d < D
            hn = _normed(x_ptr + d0, d_ptr + d0, norm_ptr + d0, offs_d, ok, r, HAS_DELTA)
            w = tl.load(lm_ptr + rows[:, None] * D + d0 + offs_d[None, :], mask=(rows < V)[:, None] & ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += tl.sum(w.to(tl.float32) * hn[None, :], axis=1)
        logits = tl.where(rows < V, acc.to(lm_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
        top = tl.max(logits, axis=0)
        row = tl.min(tl.where(logits == top, rows, V), axis=0)
        better = top > best  # blocks come in increasing row order: a tie keeps the earlier row
        best_row = tl.where(better, row, best_row)
        best = tl.where(better, top, best)
    low = tl.full([], LOW_WORD, tl.int64)
    bits = best.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    tl.atomic_max(key_ptr, (ordered << 32) | (low - best_row.to(tl.int64)), sem="relaxed")
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == nprog - 1:  # the last program: the argmax is complete
        key = tl.atomic_xchg(key_ptr, tl.full([], KEY_FLOOR_C, tl.int64), sem="acq_rel")
        token = low - (key & low)
        tl.store(cnt_ptr, 0)
        if FINAL:
            accept = True
        else:
            top4 = tl.load(top4_ptr + tl.arange(0, 4))
            accept = (tl.sum((top4 == token).to(tl.int32), axis=0) > 0) | (tl.load(ctl_ptr + CTL_FORCED) == layer)
            tl.store(ctl_ptr + CTL_VERIFICATIONS, tl.load(ctl_ptr + CTL_VERIFICATIONS) + 1)
            tl.store(ctl_ptr + CTL_REJECTIONS, tl.load(ctl_ptr + CTL_REJECTIONS) + 1 - accept.to(tl.int32))
            tl.store(ctl_ptr + CTL_TENTATIVE, 0)
        if accept:
            tl.store(ctl_ptr + CTL_EXITED, 1)
            tl.store(ctl_ptr + CTL_EXECUTED, layer + 1)
            tl.store(ctl_ptr + CTL_TOKEN, token.to(tl.int32))
            for d0 in range(0, D, BLOCK_D):  # the draft's input for the next token
                ok = d0 + offs_d < D
                hn = _normed(x_ptr + d0, d_ptr + d0, norm_ptr + d0, offs_d, ok, r, HAS_DELTA)
                tl.store(hn_ptr + d0 + offs_d, hn.to(hn_ptr.dtype.element_ty), mask=ok)


def head_state(device: torch.device) -> torch.Tensor:
    """The head's scratch: int64 [2] = (argmax word, arrival counter), left at (KEY_FLOOR, 0) by every call."""
    return torch.tensor([KEY_FLOOR, 0], dtype=torch.int64, device=device)


def exit_head(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              lm_head: torch.Tensor, hn_out: torch.Tensor, top4: torch.Tensor,
              ctl: torch.Tensor, state: torch.Tensor, layer: int, *, final: bool, pdl: bool = False,
              programs: int | None = None, block_v: int = 16, block_d: int = 1024) -> None:
    """The exit head at `layer` on the residual x [D] (+ delta [D], the pending residual add): greedy token of
    LM-head(final-norm(x)) for lm_head [V, D] (fp16). final=False: runs only if ctl[CTL_TENTATIVE] (a predictor
    fired); accepts when the token is one of top4 (int64 [4]) or `layer` is ctl[CTL_FORCED]; counts the
    verification (and rejection) and clears the request. final=True: runs unless the step exited; always
    accepts. On accepting: sets ctl's exit flag, executed layers (layer + 1) and token, and writes the normed state
    into hn_out [D] (the draft's input at the next token). state: `head_state`. No host syncs.
    Defaults: 4 programs per SM over 16-row blocks and 1024-wide chunks, the best of 12 configurations on the
    H100's 32000 x 4096 head (93.8 us, against 108.1 for cuBLAS and an argmax;
    benchmarks/results/exit-head-time-h100-2026-11-27.json)."""
    V, D = lm_head.shape
    if lm_head.stride(1) != 1 or lm_head.stride(0) != D or x.numel() != D:
        raise ValueError(f"exit_head: a contiguous LM head [V, D] and a hidden state of D = {D}")
    n_blocks = triton.cdiv(V, block_v)
    if programs is None:
        programs = 4 * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8)
    programs = max(1, min(programs, n_blocks))
    _exit_head_kernel[(programs,)](
        x, x if delta is None else delta, norm_weight, lm_head, hn_out, top4, ctl, state, state[1:],
        V, D, eps, layer, BLOCK_V=block_v, BLOCK_D=block_d, FINAL=final, HAS_DELTA=delta is not None, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}))
