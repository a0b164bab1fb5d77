"""Two decode-step kernels measured alone (GPU), graph-timed:
- the decode GEMV with programmatic dependent launch on and off (kernels.dispatch.PDL), each M = 1 shape over the
  bench's rotating weight copies, alternated twice; consecutive GEMVs then overlap one's launch and first loads
  with the other's tail;
- the fused decode attention against what it replaces (compiled `rope_write`, then SDPA over the whole cache
  under the causal mask), Llama-2-7B heads, over 8 rotating caches, at several cache sizes and positions.
Writes $OUT/pdl-probe.json (or benchmarks/results/)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import torch.nn.functional as F
import triton.testing

from kernels import dispatch
from kernels.decode_attention import decode_attention
from mpq.bench.kernels import _graph_us, _mpq_fn
from mpq.runtime.model import rope_write

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096))


def attention_rows(heads: int = 32, d: int = 128, copies: int = 8, variants=((None, 64),)) -> list[dict]:
    """variants: (shares per KV head or None for the default, positions per tile) of the fused kernel."""
    rows = []
    compiled = torch.compile(rope_write, dynamic=False)
    for length, p in ((384, 255), (384, 383), (1024, 1023), (4096, 255), (4096, 4095)):
        caches = [torch.randn(2, 1, heads, length, d, device="cuda", dtype=torch.float16) for _ in range(copies)]
        counters = torch.zeros(heads, dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(1, 1, heads, d, device="cuda", dtype=torch.float16) for _ in range(3))
        cos, sin = torch.rand(1, d, device="cuda", dtype=torch.float16), torch.rand(1, d, device="cuda", dtype=torch.float16)
        pos = torch.tensor([p], device="cuda")
        mask = torch.full((1, 1, 1, length), float("-inf"), device="cuda", dtype=torch.float16)
        mask[..., : p + 1] = 0

        def sdpa():
            for c in caches:
                qr = compiled(q, k, v, cos, sin, c, pos)
                F.scaled_dot_product_attention(qr.transpose(1, 2), c[0], c[1], attn_mask=mask)

        def fused(splits, block_n):
            return lambda: [decode_attention(q, k, v, cos, sin, c, pos, counters, splits=splits, block_n=block_n,
                                             pdl=dispatch.pdl_enabled(q.device)) for c in caches]

        impls = [("rope_write+sdpa", sdpa)] + [(f"fused splits={sp} block_n={bn}", fused(sp, bn)) for sp, bn in variants]
        for name, fn in impls:
            fn()
            torch.cuda.synchronize()
            us = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1000 / copies
            rows.append({"impl": name, "cache": length, "pos": p, "us": round(us, 3)})
            print(f"attention cache {length} pos {p}: {name:16s} {us:7.2f} us", flush=True)
        caches.clear()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    attention = attention_rows(variants=[(None, 64)] + [(sp, bn) for bn in (32, 64) for sp in (4, 8, 12, 16, 24)]
                               if "--sweep" in sys.argv else [(None, 64)])
    if "--attention-only" in sys.argv:
        (out / "pdl-probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "attention": attention}, indent=1))
        return
    rows = []
    for n, k in SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        fn, nbytes = _mpq_fn(n, k, 1, 1, x)
        for rep in range(2):
            for pdl in (True, False):
                dispatch.PDL = pdl  # read at each launch, so at capture
                us = _graph_us(fn)
                rows.append({"shape": f"{n}x{k}", "pdl": pdl, "rep": rep, "us": round(us, 3), "stored_bytes": nbytes})
                print(f"{n}x{k} pdl={pdl!s:5} {us:7.2f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)
        del fn
        torch.cuda.empty_cache()
    dispatch.PDL = True
    (out / "pdl-probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows, "attention": attention}, indent=1))


if __name__ == "__main__":
    main()
