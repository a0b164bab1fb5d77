"""The exit flag (kernels/exit_flag.py): with it clear, every kernel that reads it computes what it computes
without it; with it set, a decode GEMV leaves its skipped row tiles unwritten (NaN poison stays) and computes the
kept ones, the norm adds nothing, the SwiGLU product writes nothing, and the attention kernel only writes the new
k/v (fill) or masks the position (drop). Random inputs, shapes off the block sizes; CUDA or TRITON_INTERPRET=1."""

import os

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.dispatch import TENSOR_ORDER, KernelConfig, mixed_matmul  # noqa: E402
from kernels.step_ops import _silu_mul_kernel, add_rms_norm, silu_mul  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


def flag(on: bool) -> torch.Tensor:
    return torch.tensor([int(on)], dtype=torch.int32, device=DEVICE)


KERNELS = ["gemv", "tc", "tc_unrolled", "gemv2"] + ([] if INTERPRET else ["gemv2_fast", "tc_fast", "tc_unrolled_fast"])


def run_kernel(name, x, y, counters, tensors, skip, keep):
    from kernels.gemv_h2 import gemv_h2
    from kernels.gemv_mixed import gemv_mixed
    from kernels.gemv_tc import gemv_tc

    ws = torch.full((2, 1, y.shape[1]), float("nan"), device=DEVICE)
    if name == "gemv":
        gemv_mixed(x, y, ws, counters, *tensors, group_size=128, outliers=1, rows=8, split=2, num_warps=1,
                   skip=skip, keep_tiles=keep)
    elif name.startswith("gemv2"):
        gemv_h2(x, y, ws, counters, *tensors, group_size=128, outliers=1, rows=8, split=2, num_warps=1,
                fast=name.endswith("fast"), pdl=name.endswith("fast"), skip=skip, keep_tiles=keep)
    else:
        gemv_tc(x, y, ws, counters, *tensors, outliers=1, split=2, fast=name.endswith("fast"),
                pdl=name.endswith("fast"), skip=skip, keep_tiles=keep, unrolled="unrolled" in name)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("keep", [0, 2])
def test_decode_gemvs_skip_row_tiles_past_the_kept_ones(make_packed, name, keep):
    packed = make_packed(80, 384, 128, 1, 1, seed=7)  # 5 row tiles
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
    tensors = tuple(getattr(packed, n).to(DEVICE) for n in TENSOR_ORDER)
    counters = torch.zeros(16 * packed.row_tiles, dtype=torch.int32, device=DEVICE)
    ref = (x.double().cpu() @ packed.dequantize(torch.float64).t()).float()
    kept = keep * packed.tile_rows
    for on in (False, True):
        y = torch.full((1, 80), float("nan"), dtype=torch.half, device=DEVICE)
        run_kernel(name, x, y, counters, tensors, flag(on), keep)
        y = y.float().cpu()
        done = y if not on else y[:, :kept]
        assert not torch.isnan(done).any() and (done - ref[:, :done.shape[1]]).norm() <= 2e-3 * ref.norm()
        if on:
            assert torch.isnan(y[:, kept:]).all(), "a skipped row tile was written"
        assert not counters.any(), "the split-K counters must be left at zero"


def test_dispatch_hands_the_flag_to_the_kernel(make_packed):
    packed = make_packed(80, 384, 128, 1, 1, seed=9)
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(10)).half().to(DEVICE)
    tensors = tuple(getattr(packed, n).to(DEVICE) for n in TENSOR_ORDER)
    counters = torch.zeros(16 * packed.row_tiles, dtype=torch.int32, device=DEVICE)
    ref = (x.double().cpu() @ packed.dequantize(torch.float64).t()).float()
    y = mixed_matmul(x, tensors, group_size=128, outliers=1, counters=counters, skip=flag(True), keep_tiles=3)
    assert (y[:, :48].float().cpu() - ref[:, :48]).norm() <= 2e-3 * ref[:, :48].norm()


def test_gemm_refuses_the_flag(make_packed):
    packed = make_packed(48, 192, 64, 0, 1)
    tensors = tuple(getattr(packed, n).to(DEVICE) for n in TENSOR_ORDER)
    x = torch.randn(20, 192).half().to(DEVICE)
    with pytest.raises(ValueError, match="exit flag"):
        mixed_matmul(x, tensors, group_size=64, outliers=1, counters=torch.zeros(48, dtype=torch.int32, device=DEVICE),
                     config=KernelConfig("gemm"), skip=flag(True))


def test_norm_and_swiglu_under_the_flag():
    gen = torch.Generator().manual_seed(3)
    x, d = (torch.randn(1, 1, 200, generator=gen).half().to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(200, generator=gen)).half().to(DEVICE)
    want = add_rms_norm(x, d, w, 1e-5)
    got = add_rms_norm(x, d, w, 1e-5, skip=flag(False))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    passed = add_rms_norm(x, d, w, 1e-5, skip=flag(True))  # the residual passes the skipped layer unchanged
    assert torch.equal(passed[0], x) and torch.equal(passed[1], add_rms_norm(x, None, w, 1e-5)[1])
    g, u = (torch.randn(3, 300, generator=gen).half().to(DEVICE) for _ in range(2))
    assert torch.equal(silu_mul(g, u, skip=flag(False)), silu_mul(g, u))
    y = torch.full_like(g, float("nan"))
    _silu_mul_kernel[(1, 3)](g, u, y, flag(True), 300, 300, 300, BLOCK=512, PDL=False, SKIP=True, CONSUME=False)
    assert torch.isnan(y.float()).all()


@pytest.mark.parametrize("drop", [False, True])
def test_attention_under_the_flag_writes_only_the_cache_entry_or_the_mask(drop):
    gen = torch.Generator().manual_seed(5)
    B, H, KV, D, L, p = 1, 4, 2, 32, 70, 41
    rnd = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    q, k, v = rnd(B, 1, H, D), rnd(B, 1, KV, D), rnd(B, 1, KV, D)
    angles = torch.rand(D // 2, generator=gen) * 6.28
    cos, sin = (f(torch.cat((angles, angles)))[None].half().to(DEVICE) for f in (torch.cos, torch.sin))
    pos = torch.tensor([p], device=DEVICE)
    counters = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    bias = torch.zeros(L, dtype=torch.half, device=DEVICE) if drop else None
    ref_cache = rnd(2, B, KV, L, D)
    cache = ref_cache.clone()
    want = decode_attention(q, k, v, cos, sin, ref_cache, pos, counters, None if bias is None else bias.clone(),
                            skip=flag(False))
    torch.testing.assert_close(want, decode_attention(q, k, v, cos, sin, ref_cache.clone(), pos, counters,
                                                      None if bias is None else bias.clone()))
    out = torch.full_like(want, float("nan"))
    decode_attention(q, k, v, cos, sin, cache, pos, counters, bias, skip=flag(True), out=out)
    assert torch.isnan(out.float()).all() and not counters.any()
    assert torch.equal(cache, ref_cache)  # the new k/v written at p (the fill) and nothing else changed
    if drop:
        assert torch.isinf(bias[p]) and bias[p] < 0 and not bias[:p].any() and not bias[p + 1:].any()
