"""The attention hand-over (`kernels.handoff`, `Block.link_attention`) in the random-layer 7B decode step (GPU):
the step unlinked (every kernel waits for the whole one before it), with q/k/v handed to the attention only, and
with the attention's output handed to the o GEMV too (the engine's default). Alternates the variants twice in one
call; writes $OUT/handoff-step.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import alternate  # noqa: E402
from mpq.runtime import model as engine  # noqa: E402

FULL = engine.Block.attention


def _ready_only(self, h, input_pos, cos, sin, mask, ops, causal_prefix=False, dropped=None):
    """Block.attention with q/k/v handed over and the o GEMV waiting for the attention's end (its grid wait)."""
    link = self.handoff
    if not ops.handoff or h.shape[1] != 1 or dropped is not None:  # prefill: as committed
        return FULL(self, h, input_pos, cos, sin, mask, ops, causal_prefix, dropped)
    q, k, v = self.qkv(h, signal=(link.ready, link.tile_heads))
    y = ops.decode_attention(q, k, v, cos, sin, self.kv_cache.kv, input_pos, self.kv_cache.counters, None,
                             ready=(link.ready, link.rows_per_head))
    return self.o(y)


def main() -> None:
    model = random_engine(True)
    model.compile_small_ops()
    linked = model.ops
    assert linked.handoff and all(layer.handoff is not None for layer in model.layers)
    full = FULL
    variants = {"unlinked": (dataclasses.replace(linked, handoff=False), full),
                "q/k/v handed over": (linked, _ready_only),
                "q/k/v and the attention output handed over": (linked, full)}

    def install(variant):
        model.ops, engine.Block.attention = variant

    rows = alternate(model, variants, install)
    install(variants["q/k/v and the attention output handed over"])
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "handoff-step.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128), the attention hand-over on and off, two alternations", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
