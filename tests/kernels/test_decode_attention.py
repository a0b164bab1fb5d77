"""The decode-attention kernel against SDPA with the same additive mask, on CUDA or under TRITON_INTERPRET=1:
GQA and MHA, positions that are not multiples of the block, dropped (-inf) positions inside the prefix, and a
cache whose slots past the position hold garbage the kernel must not read."""

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

from kernels.decode_attention import decode_attention  # noqa: E402


@pytest.mark.parametrize("heads,kv_heads,dim,length,pos,dtype", [
    (6, 2, 64, 100, 73, torch.float32), (4, 4, 32, 50, 0, torch.float32), (8, 2, 128, 300, 257, torch.float16)])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim, length, pos, dtype):
    gen = torch.Generator().manual_seed(pos + heads)
    q = torch.randn(heads, dim, generator=gen).to(DEV, dtype)
    kv = torch.randn(2, 1, kv_heads, length, dim, generator=gen).to(DEV, dtype)  # the engine's cache layout
    kv[:, :, :, pos + 1:] = float("nan")  # past the position: must never be read
    mask = torch.full((length,), float("-inf"), device=DEV, dtype=dtype)
    mask[:pos + 1] = 0
    if pos > 10:
        mask[torch.tensor([3, pos // 2, pos - 1])] = float("-inf")  # positions dropped by exits
    got = decode_attention(q, kv[0, 0], kv[1, 0], mask, torch.tensor([pos], device=DEV))
    k, v = kv[0, 0, :, :pos + 1].float(), kv[1, 0, :, :pos + 1].float()
    want = F.scaled_dot_product_attention(q.float()[None, :, None], k[None], v[None], attn_mask=mask[:pos + 1].float().view(1, 1, 1, -1),
                                          enable_gqa=heads != kv_heads)[0, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
