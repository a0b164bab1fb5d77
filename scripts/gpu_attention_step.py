"""The fused decode attention inside the random-layer 7B decode step (GPU): warps and shares (KNOBS=1), and what
the kernel costs by part: the step without it, with it returning at once, with one cached position (all three
timing only, wrong output). Run 26 of benchmarks/e2e-notes.md chose its launch from this script's variants.
Alternates the variants twice; writes $OUT/attention-step.json."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import alternate  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402


def main() -> None:
    model = random_engine(True)
    model.compile_small_ops()
    ops = model.ops
    committed = ops.decode_attention
    out_buf = torch.zeros(1, 1, 4096, dtype=torch.float16, device="cuda")
    one = torch.ones(1, dtype=torch.int32, device="cuda")
    pos1 = torch.ones(1, dtype=torch.long, device="cuda")

    def at_pos1(q, k, v, cos, sin, cache, input_pos, counters, bias=None, splits=None):
        return decode_attention(q, k, v, cos, sin, cache, pos1, counters, bias, pdl=True, splits=splits)

    variants = {  # all but the first two are timing only (wrong output)
        "committed": committed,
        "4 warps": functools.partial(decode_attention, pdl=True, num_warps=4),
        "none (bound)": lambda *a, **k: out_buf,
        "launched, returns at once (exit flag set)": functools.partial(decode_attention, pdl=True, skip=one),
        "one cached position (merge kept)": at_pos1,
    }
    if os.environ.get("KNOBS"):  # warps and shares
        for w in (1, 2, 4):
            for s in (4, 6, 8, 12):
                variants[f"{w} warps, {s} shares"] = functools.partial(decode_attention, pdl=True, num_warps=w,
                                                                       splits=s)
    rows = alternate(model, variants, lambda fn: setattr(ops, "decode_attention", fn))
    ops.decode_attention = committed
    alone = {}  # the kernel alone at longer caches (7B heads), graph-replayed us: does 2 warps hold there too?
    for length in (384, 2048, 4096):
        q = torch.randn(1, 1, 32, 128, dtype=torch.float16, device="cuda")
        k, v = torch.randn_like(q), torch.randn_like(q)
        cos, sin = torch.randn(1, 128, device="cuda").half(), torch.randn(1, 128, device="cuda").half()
        cache = torch.randn(2, 1, 32, length, 128, dtype=torch.float16, device="cuda")
        pos = torch.tensor([length - 1], device="cuda")
        counters = torch.zeros(32, dtype=torch.int32, device="cuda")
        for w in (2, 4):
            fn = functools.partial(decode_attention, q, k, v, cos, sin, cache, pos, counters, num_warps=w)
            ref = decode_attention(q, k, v, cos, sin, cache, pos, counters, num_warps=4)
            assert torch.allclose(fn(), ref, atol=2e-3, rtol=2e-3)
            key = f"{length} positions, {w} warps"
            alone[key] = triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
            print(f"alone {key}: {alone[key]:.2f} us", flush=True)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "attention-step.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128), the fused decode attention's variants (all but `committed` and `4 warps` timing only), two "
        "alternations; `alone_us`: the kernel alone, graph-replayed, at the last position of longer caches",
        "rows": rows, "alone_us": alone}, indent=1))


if __name__ == "__main__":
    main()
