"""The fused decode attention inside the random-layer 7B decode step (GPU): warps, shares and tile length, and the
step with the attention replaced by a no-op (wrong output; the upper bound of what a faster kernel could save).
Alternates the variants twice; writes $OUT/attention-step.json."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import step_ms  # noqa: E402
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

    variants = {  # all but the first are timing only (wrong output)
        "committed": committed, "none (bound)": lambda *a, **k: out_buf,
        "launched, returns at once (exit flag set)": functools.partial(decode_attention, pdl=True, skip=one),
        "one cached position (6 shares, merge kept)": at_pos1,
        "one cached position, 1 share": functools.partial(at_pos1, splits=1),
        "dependents at the start": functools.partial(decode_attention, pdl=True, early_dependents=True),
        "dependents at the start, 2 warps": functools.partial(decode_attention, pdl=True, early_dependents=True,
                                                              num_warps=2),
        "dependents at the start, returns at once": functools.partial(decode_attention, pdl=True, skip=one,
                                                                      early_dependents=True),
    }
    if os.environ.get("EARLY_SWEEP"):  # shares x warps with the o projection launched at the start
        variants = {"committed": committed, "none (bound)": variants["none (bound)"]}
        for w in (1, 2):
            for s in (4, 6, 8, 12):
                variants[f"dependents at the start, {w} warps, {s} shares"] = functools.partial(
                    decode_attention, pdl=True, early_dependents=True, num_warps=w, splits=s)
        variants["dependents at the start, returns at once, 1 share"] = functools.partial(
            decode_attention, pdl=True, skip=one, early_dependents=True, splits=1, num_warps=2)
    if os.environ.get("NO_PDL"):  # 94743de
        variants["no PDL"] = functools.partial(decode_attention, pdl=False)
        variants["no PDL, returns at once"] = functools.partial(decode_attention, pdl=False, skip=one)
    if os.environ.get("KNOBS"):  # the launch knobs (first run of this script, 574bdbf)
        for w in (1, 2, 8):
            variants[f"warps {w}"] = functools.partial(decode_attention, pdl=True, num_warps=w)
        for s in (3, 4, 8, 12):
            variants[f"shares {s}"] = functools.partial(decode_attention, pdl=True, splits=s)
    rows = {k: [] for k in variants}
    for _ in range(2):
        for name, fn in variants.items():
            ops.decode_attention = fn
            rows[name].append(step_ms(model))
            print(f"{name:36s} {rows[name][-1]:.4f}", flush=True)
    ops.decode_attention = committed
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "attention-step.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128), the fused decode attention's variants (all but `committed` timing only), two alternations", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
