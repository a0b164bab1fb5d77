"""The fused decode attention (RoPE, cache write, attention over the filled prefix) against the engine's eager
path: `rope_write` then SDPA under the causal mask, in fp32 from the same fp16/bf16 inputs.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1. The output is poisoned with NaN first, so an unwritten
element fails. Bounds (relative Frobenius error): the kernel rounds the rotated q and k to the cache dtype once,
as the eager path stores them, and sums in fp32, so 2^-11 ~ 5e-4 rounding per input gives about 2e-3 for fp16;
bf16 (2^-8) 1.5e-2.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention  # noqa: E402
from mpq.runtime.model import rope_write  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def reference(q, k, v, cos, sin, cache, pos, bias=None):
    """The engine's eager decode attention, in fp32."""
    cache = cache.float()
    qr = rope_write(q.float(), k.float(), v.float(), cos.float(), sin.float(), cache, pos)
    mask = torch.full((1, cache.shape[3]), float("-inf"), device=q.device)
    mask[:, : int(pos) + 1] = 0
    if bias is not None:
        mask[:, : int(pos)] += bias[: int(pos)].float()
    y = F.scaled_dot_product_attention(qr.transpose(1, 2), cache[0], cache[1], attn_mask=mask,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2).reshape(q.shape[0], 1, -1), cache


# (batch, heads, kv heads, head dim, cache length, position, shares per KV head)
CASES = [
    (1, 4, 4, 32, 100, 70, None),  # MHA, a partial last tile
    (1, 6, 2, 32, 130, 129, 3),    # GQA groups of 3 (padded to 4), the last slot
    (2, 4, 2, 16, 50, 0, 5),       # nothing cached yet, empty shares
    (1, 2, 1, 64, 200, 150, 1),    # one share walks three tiles
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_matches_eager_path(case, dtype):
    B, H, KV, D, L, p, splits = case
    gen = torch.Generator().manual_seed(H * 1000 + L + p)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    q, k, v = rnd(B, 1, H, D), rnd(B, 1, KV, D), rnd(B, 1, KV, D)
    angles = torch.rand(D // 2, generator=gen) * 6.28
    cos, sin = torch.cat((angles, angles)).cos()[None].to(DEVICE, dtype), torch.cat((angles, angles)).sin()[None].to(DEVICE, dtype)
    cache = rnd(2, B, KV, L, D)
    pos = torch.tensor([p], device=DEVICE)
    before = cache.clone()
    want, want_cache = reference(q, k, v, cos, sin, cache.clone(), pos)
    counters = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    out = torch.full((B, 1, H * D), float("nan"), dtype=dtype, device=DEVICE)
    got = decode_attention(q, k, v, cos, sin, cache, pos, counters, splits=splits, out=out)
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < BOUND[dtype], err
    new, want_new = cache[:, :, :, p].float(), want_cache[:, :, :, p]
    assert ((new - want_new).norm() / want_new.norm()).item() < BOUND[dtype]  # the new k (rotated) and v at pos
    assert torch.equal(cache[:, :, :, :p], before[:, :, :, :p]) and torch.equal(cache[:, :, :, p + 1:], before[:, :, :, p + 1:])
    assert int(counters.abs().sum()) == 0  # left ready for the next call (graph replay)
    again = decode_attention(q, k, v, cos, sin, cache, pos, counters, splits=splits)
    assert torch.equal(again, got)  # same shares, fixed merge order: deterministic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_bias_masks_dropped_positions(dtype):
    """SpecEE's drop mode: an additive row of -inf at the positions a layer skipped (a whole share of them
    included); the new token's own key always counts."""
    B, H, KV, D, L, p = 1, 4, 2, 32, 160, 150
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    q, k, v = rnd(B, 1, H, D), rnd(B, 1, KV, D), rnd(B, 1, KV, D)
    cos, sin = torch.ones(1, D, device=DEVICE, dtype=dtype), torch.zeros(1, D, device=DEVICE, dtype=dtype)
    cache = rnd(2, B, KV, L, D)
    bias = torch.zeros(L, device=DEVICE, dtype=dtype)
    bias[torch.randperm(p, generator=gen)[:40].to(DEVICE)] = float("-inf")
    bias[0:30] = float("-inf")  # all of share 0 (5 shares of 30)
    want, _ = reference(q, k, v, cos, sin, cache.clone(), torch.tensor([p], device=DEVICE), bias)
    counters = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    got = decode_attention(q, k, v, cos, sin, cache, torch.tensor([p], device=DEVICE), counters, bias, splits=5)
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < BOUND[dtype], err
    unbiased, _ = reference(q, k, v, cos, sin, cache.clone(), torch.tensor([p], device=DEVICE))
    assert ((unbiased - want).norm() / want.norm()).item() > 10 * BOUND[dtype]  # the bias changed the answer
