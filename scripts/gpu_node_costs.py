"""What each small kernel of the random-layer 7B decode step costs there (GPU): the step with the residual add +
RMSNorm kernels, the SwiGLU product or both replaced by no kernel at all, and with the SwiGLU product launched but
returning at once (all timing only, wrong output), beside the committed step. Alternates the variants twice;
writes $OUT/node-costs.json. Read with scripts/gpu_attention_step.py's attention rows (run 26 of
benchmarks/e2e-notes.md): what fusing a node into its neighbour could save at most."""

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
from gpu_engine_table import alternate  # noqa: E402
from kernels import step_ops  # noqa: E402


def main() -> None:
    model = random_engine(True)
    model.compile_small_ops()
    committed = model.ops
    one = torch.ones(1, dtype=torch.int32, device="cuda")

    def no_norm(x, delta, weight, eps):
        return x, x

    variants = {
        "committed": committed,
        "no norm kernels": dataclasses.replace(committed, add_rms_norm=no_norm),
        "no SwiGLU kernel": dataclasses.replace(committed, silu_mul=lambda gate, up: gate),
        "SwiGLU launched, returns at once": dataclasses.replace(
            committed, silu_mul=functools.partial(step_ops.silu_mul, pdl=True, skip=one)),
        "neither": dataclasses.replace(committed, add_rms_norm=no_norm, silu_mul=lambda gate, up: gate),
    }
    rows = alternate(model, variants, lambda ops: setattr(model, "ops", ops))
    model.ops = committed
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "node-costs.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
        "torch": torch.__version__, "what": "random-layer 7B decode step, ms/token (graph replay, median of 3 x 256 "
        "tokens after 128), small-op kernels removed or returning at once (timing only), two alternations",
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
