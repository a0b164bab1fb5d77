"""L2 prefetch of the next linears' weights from the fused decode attention, inside the random-layer 7B step (GPU).

While the attention kernel waits for q/k/v and walks the cache, DRAM is nearly idle (the step without attention
is ~0.27 ms a token faster, `attention-step.json`). Its programs can ask L2 for the o projection's codes and part
of gate/up's, so that those GEMVs read L2. Alternates the variants twice; writes $OUT/prefetch-step.json."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import step_ms  # noqa: E402
from mpq.runtime.model import Block  # noqa: E402

_attention = Block.attention


def attention_with_prefetch(self, h, input_pos, cos, sin, mask, ops, causal_prefix=False, dropped=None):
    pf = getattr(self, "prefetch_ranges", ())
    if pf and ops.decode_attention is not None:
        ops = dataclasses.replace(ops, decode_attention=functools.partial(ops.decode_attention, prefetch=pf))
    return _attention(self, h, input_pos, cos, sin, mask, ops, causal_prefix, dropped)


def nbytes(t: torch.Tensor, frac: float = 1.0) -> int:
    return int(t.numel() * t.element_size() * frac)


def main() -> None:
    model = random_engine(True)
    model.compile_small_ops()
    Block.attention = attention_with_prefetch
    variants = {
        "committed": lambda b: (),
        "o": lambda b: ((b.o.q2, nbytes(b.o.q2)), (b.o.q4, nbytes(b.o.q4))),
        "o + gate/up 25%": lambda b: ((b.o.q2, nbytes(b.o.q2)), (b.o.q4, nbytes(b.o.q4)),
                                      (b.gate_up.q2, nbytes(b.gate_up.q2, 0.25)), (b.gate_up.q4, nbytes(b.gate_up.q4, 0.25))),
        "o + gate/up 50%": lambda b: ((b.o.q2, nbytes(b.o.q2)), (b.o.q4, nbytes(b.o.q4)),
                                      (b.gate_up.q2, nbytes(b.gate_up.q2, 0.5)), (b.gate_up.q4, nbytes(b.gate_up.q4, 0.5))),
        "o + gate/up 100%": lambda b: ((b.o.q2, nbytes(b.o.q2)), (b.o.q4, nbytes(b.o.q4)),
                                       (b.gate_up.q2, nbytes(b.gate_up.q2)), (b.gate_up.q4, nbytes(b.gate_up.q4))),
        "gate/up 50%": lambda b: ((b.gate_up.q2, nbytes(b.gate_up.q2, 0.5)), (b.gate_up.q4, nbytes(b.gate_up.q4, 0.5))),
    }
    mb = {k: sum(n for _, n in f(model.layers[0])) / 1e6 for k, f in variants.items()}
    rows = {k: [] for k in variants}
    for _ in range(2):
        for name, ranges in variants.items():
            for blk in model.layers:
                blk.prefetch_ranges = ranges(blk)
            rows[name].append(step_ms(model))
            print(f"{name:24s} {mb[name]:6.1f} MB a layer  {rows[name][-1]:.4f}", flush=True)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "prefetch-step.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128); the fused attention's programs prefetch the next linears' codes into L2 before their "
        "wait; two alternations", "mb_per_layer": mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
