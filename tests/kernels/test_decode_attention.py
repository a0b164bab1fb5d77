"""The split decode-attention kernel against SDPA with the same additive mask, on CUDA or under TRITON_INTERPRET=1:
GQA and MHA, positions that are not multiples of the block or of the split, shares left empty, dropped (-inf)
positions inside the prefix, and cache slots past the position holding NaN that the kernel must not read."""

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

from kernels.decode_attention import DecodeAttention  # noqa: E402


def reference(q, kv, mask, pos, heads, kv_heads):
    k, v = kv[0, 0, :, :pos + 1].float(), kv[1, 0, :, :pos + 1].float()
    return F.scaled_dot_product_attention(q.float()[None, :, None], k[None], v[None],
                                          attn_mask=mask[:pos + 1].float().view(1, 1, 1, -1),
                                          enable_gqa=heads != kv_heads)[0, :, 0]


@pytest.mark.parametrize("heads,kv_heads,dim,length,pos,splits,dtype", [
    (6, 2, 64, 100, 73, 4, torch.float32),    # GQA; 74 keys in shares of 32 (the block steps pass the end)
    (4, 4, 32, 50, 0, 8, torch.float32),      # one key: seven empty shares
    (8, 2, 128, 300, 257, 8, torch.float16),  # 258 keys in shares of 48: a partial share, two empty
    (3, 1, 64, 40, 20, 2, torch.float16),     # MQA
    (4, 2, 64, 1000, 999, None, torch.float16),  # splits from the cache length (32), shares of 32
])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim, length, pos, splits, dtype):
    gen = torch.Generator().manual_seed(pos + heads)
    q = torch.randn(heads, dim, generator=gen).to(DEV, dtype)
    kv = torch.randn(2, 1, kv_heads, length, dim, generator=gen).to(DEV, dtype)  # the engine's cache layout
    kv[:, :, :, pos + 1:] = float("nan")  # past the position: must never be read
    mask = torch.full((length,), float("-inf"), device=DEV, dtype=dtype)
    mask[:pos + 1] = 0
    if pos > 10:
        mask[torch.tensor([3, pos // 2, pos - 1])] = float("-inf")  # positions dropped by exits
    attend = DecodeAttention(splits=splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for step in range(2):  # a second call reuses the scratch: the counters were left at zero
        got = attend(q, kv[0, 0], kv[1, 0], mask, torch.tensor([pos], device=DEV))
        torch.testing.assert_close(got.float(), reference(q, kv, mask, pos, heads, kv_heads), rtol=tol, atol=tol)
    assert all(not scratch[2].any() for scratch in attend._scratch.values()), "counters must be left at zero"
