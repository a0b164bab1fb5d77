"""Which SDPA backend is fastest for one decode query over a static KV cache with an additive mask (GPU)?

Graph-timed (do_bench_cudagraph), Llama-2-7B attention shape (32 heads x 128), batch 1, fp16. Prints one line per
(cache length, backend); a backend that refuses the inputs is reported as such."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

H, D = 32, 128
for length in (384, 1024, 4096):
    q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.float16)
    k = torch.randn(1, H, length, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    mask = torch.full((1, 1, 1, length), float("-inf"), device="cuda", dtype=torch.float16)
    mask[..., : length // 2 + 1] = 0  # half the cache filled
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                err = float((out.float() - ref.float()).abs().max())
                us = 1000 * do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            print(f"cache {length} {backend.name}: {us:.2f} us (max abs diff {err:.1e})", flush=True)
        except RuntimeError as e:
            print(f"cache {length} {backend.name}: refused ({str(e).splitlines()[0][:100]})", flush=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        us = 1000 * do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    print(f"cache {length} default choice: {us:.2f} us", flush=True)
