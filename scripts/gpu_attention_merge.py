"""The decode attention's merge of its shares in the random-layer 7B decode step (GPU): fenceless (the partials
tagged with the head's generation, the engine's default where the layer's scratch has room) against fenced (an
acq_rel arrival after each share's partial: the scratch cut to the arrival counters). Alternates the two twice in
one call; writes $OUT/attention-merge.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import alternate  # noqa: E402
from mpq.runtime import model as engine  # noqa: E402


def main() -> None:
    model = random_engine(True)
    model.compile_small_ops()
    room = engine.attention_scratch_words

    def install(fenceless: bool) -> None:  # read when each generator sets up its caches
        engine.attention_scratch_words = room if fenceless else lambda batch, kv_heads, *rest: batch * kv_heads

    rows = alternate(model, {"fenced merge": False, "fenceless merge": True}, install)
    install(True)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "attention-merge.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128), the decode attention's share merge fenced or fenceless, two alternations",
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
