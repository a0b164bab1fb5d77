"""The decode step's small-op kernels (kernels/step_ops.py) against the engine's eager ops they replace.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1. The outputs are new tensors compared element by element
with the eager ones, so an unwritten element fails. Bounds: the residual add rounds exactly as the eager add
(equal); the RMSNorm sums its squares in another order, and the SiLU's exponential is not the eager one, so an
element may land one rounding step away (at most 1 in 1000 elements, each within 1e-3 relative). bf16 only on
CUDA: the interpreter (Triton 3.9) rounds fp32 -> bf16 casts differently from the GPU and torch.
"""

import functools
import os

import pytest
import torch

pytest.importorskip("triton")

from kernels.dispatch import pdl_enabled  # noqa: E402
from kernels.step_ops import add_rms_norm, silu_mul  # noqa: E402
from mpq.runtime import model as eager  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# launched as programmatic dependents too, where the GPU can (sm_90+), as the engine launches them
PDL = [False] + ([True] if not INTERPRET and pdl_enabled(torch.device(DEVICE)) else [])


def assert_nearly_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    off = got != want
    assert off.float().mean() <= 1e-3, f"{int(off.sum())} of {off.numel()} elements differ"
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [100, 576, 4096])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_eager(dtype, n, with_delta, pdl):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 1, n, generator=gen) * 4).to(dtype).to(DEVICE)
    delta = torch.randn(3, 1, n, generator=gen).to(dtype).to(DEVICE) if with_delta else None
    w = (torch.rand(n, generator=gen) + 0.5).to(dtype).to(DEVICE)
    x_got, h_got = add_rms_norm(x, delta, w, 1e-5, pdl=pdl)
    x_want, h_want = eager.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x_got, x_want)
    assert with_delta or x_got is x  # no add: the residual passes through
    assert_nearly_equal(h_got, h_want)


def test_add_rms_norm_with_a_wider_weight_returns_the_eager_dtype():
    """HF multiplies the rounded rows by the weight in the weight's dtype: an fp32 weight gives fp32 rows."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 300, generator=gen).half().to(DEVICE)
    w = (torch.rand(300, generator=gen) + 0.5).to(DEVICE)
    _, h_got = add_rms_norm(x, x.flip(-1).contiguous(), w, 1e-6)
    _, h_want = eager.add_rms_norm(x, x.flip(-1).contiguous(), w, 1e-6)
    assert_nearly_equal(h_got, h_want)


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(1, 3000), (2, 1024), (3, 77)])
def test_silu_mul_on_the_halves_of_a_stacked_output(dtype, rows, n, pdl):
    """gate and up as the two halves of one stacked gate/up output (rows contiguous, row stride 2n)."""
    stacked = (torch.randn(rows, 1, 2 * n, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype).to(DEVICE)
    gate, up = stacked.split(n, dim=-1)
    got = silu_mul(gate, up, pdl=pdl)
    assert got.is_contiguous()
    assert_nearly_equal(got, eager.silu_mul(gate, up))


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("n", [100, 4096])
def test_add_rms_norm_consumes_a_pending_sum(n, pdl):
    """A GEMV's pending fp32 sum as delta: read as the fp16 output it stands for (the same results as that output
    gives), and left zero for the GEMV's next call; the eager op does the same."""
    gen = torch.Generator().manual_seed(n + 1)
    x = (torch.randn(1, 1, n, generator=gen) * 4).half().to(DEVICE)
    w = (torch.rand(n, generator=gen) + 0.5).half().to(DEVICE)
    pending = (torch.randn(1, 1, n, generator=gen) * 3).to(DEVICE)
    x_want, h_want = add_rms_norm(x, pending.half(), w, 1e-5, pdl=pdl)
    for op in (functools.partial(add_rms_norm, pdl=pdl), eager.add_rms_norm):
        delta = pending.clone()
        x_got, h_got = op(x, delta, w, 1e-5, consume=True)
        assert torch.equal(x_got, x_want) and x_got.dtype == torch.float16
        assert_nearly_equal(h_got, h_want)
        assert not delta.any()


@pytest.mark.parametrize("pdl", PDL)
def test_silu_mul_consumes_the_pending_gate_up_sums(pdl):
    """The gate/up GEMV's pending fp32 sums (two halves of one buffer): the product of the fp16 outputs they stand
    for, in fp16, and both halves zeroed; the eager op does the same."""
    n = 1500
    pending = (torch.randn(1, 1, 2 * n, generator=torch.Generator().manual_seed(9)) * 3).to(DEVICE)
    want = silu_mul(*pending.half().split(n, dim=-1), pdl=pdl)
    for op in (functools.partial(silu_mul, pdl=pdl), eager.silu_mul):
        acc = pending.clone()
        gate, up = acc.split(n, dim=-1)
        got = op(gate, up, consume=True, dtype=torch.float16)
        assert_nearly_equal(got, want)
        assert not acc.any()
    with pytest.raises(ValueError, match="unconsumed"):
        silu_mul(gate, up, consume=True, skip=torch.zeros(1, dtype=torch.int32, device=DEVICE))
