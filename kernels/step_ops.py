"""The decode step's small ops between matmuls, as programmatic-dependent kernels: residual add + RMSNorm, and the
SwiGLU product. Both round as the eager ops of `mpq.runtime.model` do.

Launched as programmatic dependents (sm_90+), each lets the next kernel launch at once and then waits for the one
before it: the decode GEMV after it issues its first weight loads during this kernel's whole run (it waits for
this one to finish before it reads the output). Nothing is read before the wait except the norm weight, a
constant. Against inductor's compiled ops in the same places, the 7B random-layer step took 2.251 against 2.337
ms on one H100 (benchmarks/e2e-notes.md, run 12).
"""

import torch
import triton
import triton.language as tl

from kernels.exit_flag import exited


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, x_out_ptr, h_ptr, skip_ptr, N, eps,
                         BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, PDL: tl.constexpr, SKIP: tl.constexpr,
                         CONSUME: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0)
    if HAS_DELTA:  # x + delta rounded to x's dtype, as the eager add rounds
        d = tl.load(d_ptr + row * N + offs, mask=ok, other=0.0)
        if CONSUME:  # a GEMV's pending fp32 sum: zeroed for its next call, rounded as its output would have been
            tl.store(d_ptr + row * N + offs, tl.zeros_like(d), mask=ok)
            d = d.to(x.dtype)
        d = d.to(tl.float32)
        if SKIP:  # after an exit the layer before added nothing (its delta was never computed)
            d = tl.where(exited(skip_ptr), 0.0, d)
        x = (x.to(tl.float32) + d).to(x.dtype)
        tl.store(x_out_ptr + row * N + offs, x, mask=ok)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    h = (xf * r).to(x.dtype)  # normalised in fp32, cast back, then scaled (the product is exact in fp32)
    tl.store(h_ptr + row * N + offs, (w.to(tl.float32) * h.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, skip_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr,
                     SKIP: tl.constexpr, CONSUME: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if SKIP:
        if exited(skip_ptr):
            return
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
    if CONSUME:  # pending fp32 sums of the gate/up GEMV: zeroed for its next call, rounded as its output would be
        tl.store(g_ptr + row * stride_g + offs, tl.zeros_like(g), mask=ok)
        tl.store(u_ptr + row * stride_u + offs, tl.zeros_like(u), mask=ok)
    g = g.to(y_ptr.dtype.element_ty)
    u = u.to(y_ptr.dtype.element_ty)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu in fp32, rounded, then the product in the input dtype
    tl.store(y_ptr + row * N + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def norm_num_warps(block: int) -> int:
    """Warps of the one-program norm over a row padded to `block`: its sum of squares reduces in this layout's
    order, which a kernel that must round as this one does (kernels.exit_predictor's next norm) reuses."""
    return max(1, min(16, block // 256))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                 pdl: bool = False, skip: torch.Tensor | None = None,
                 consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) for x [..., N] (delta None: no add, x returned as is), weight [N];
    the normalised rows in the dtype the eager product gives (x's, or the weight's if wider). New output tensors,
    so that the call can sit in a captured CUDA graph. skip: the exit flag (`kernels.exit_flag`); while it is set
    delta counts as zero (the residual passes through a skipped layer unchanged). consume: delta is a GEMV's
    pending fp32 sum (`QuantLinear.add_into`): read rounded to x's dtype, then zeroed."""
    N = x.shape[-1]
    x = x.contiguous()
    x_out = torch.empty_like(x) if delta is not None else x
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(N)
    _add_rms_norm_kernel[(x.numel() // N,)](
        x, x if delta is None else delta.contiguous(), weight, x_out, h, x if skip is None else skip, N, eps,
        BLOCK=block, HAS_DELTA=delta is not None, PDL=pdl, SKIP=skip is not None, CONSUME=consume and delta is not None,
        num_warps=norm_num_warps(block),
        **({"launch_pdl": True} if pdl else {}),
    )
    return x_out, h


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, pdl: bool = False, skip: torch.Tensor | None = None,
             consume: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., N] whose rows are contiguous (e.g. the two halves of a stacked gate/up
    output); returns a new contiguous tensor of `dtype` (default gate's; left unwritten while the exit flag `skip`
    is set). consume: gate and up are the gate/up GEMV's pending fp32 sums (`QuantLinear.add_into`): read rounded to
    `dtype`, then zeroed (not with `skip`)."""
    N = gate.shape[-1]
    g, u = gate.reshape(-1, N), up.reshape(-1, N)
    if g.stride(-1) != 1 or u.stride(-1) != 1 or gate.shape != up.shape:
        raise ValueError("silu_mul: equal shapes with contiguous rows")
    if consume and skip is not None:
        raise ValueError("silu_mul: a skipped step would leave pending sums unconsumed")
    y = torch.empty(gate.shape, dtype=dtype or gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(triton.cdiv(N, block), g.shape[0])](
        g, u, y, g if skip is None else skip, N, g.stride(0), u.stride(0), BLOCK=block, PDL=pdl,
        SKIP=skip is not None, CONSUME=consume, num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y
