"""How much of the decode step moves with the quantized GEMVs' work? (GPU, timing only: wrong outputs.)

Kernel changes that made a GEMV 4-9% faster alone have moved the 7B step by nothing (the lane order, fdb33a8; run
23's unrolled rows). This measures the step's sensitivity to the GEMVs' work directly: every quantized linear of
the random-layer 7B engine (`gpu_e2e_profile.random_engine`, committed table) runs its committed kernel over only
a fraction of each row tile's slots (the 2-bit and 4-bit streams alike; the first slots of the buffers, so the
bytes read scale with the fraction), while the launches, the PDL hand-overs, the split-K epilogues and every other
kernel of the step stay as they are. Fraction 0: the GEMVs do no slot work at all (their node cost alone); then,
still without slot work, what the rest of that cost is made of: the GEMVs without split-K (one program a row tile,
no partials hand-over), with a grid of one row tile (its split programs only; the other rows unwritten), and with
each split share adding its partial sums into an fp32 buffer by atomics (`gemv_tc(atomic=True)`; y unwritten).
Graph-replayed decode, median of 3 x 256 tokens after 128, variants alternated twice. Writes
$OUT/gemv-share-step.json."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import alternate  # noqa: E402
from kernels import dispatch  # noqa: E402

FRACTION = [1.0]  # the slot fraction the wrapped kernels run now
CUT = {"split1": False, "one_tile": False, "atomic": False}  # the changes the wrapped kernels run now
VARIANTS = {  # (slot fraction, split-K off, one row tile, shares add atomically into fp32)
    "committed": (1.0, False, False, False), "split-K shares added atomically": (1.0, False, False, True),
    "slot fraction 0.5": (0.5, False, False, False), "no slots": (0.0, False, False, False),
    "no slots, split-K off": (0.0, True, False, False), "no slots, added atomically": (0.0, False, False, True),
    "no slots, one row tile, split-K off": (0.0, True, True, False)}


def _first_slots(tensors: tuple) -> tuple:
    """The format tensors cut to the first FRACTION of each row tile's 2-bit and 4-bit slots (views: the kernels
    index slots as if the cut tensors were contiguous, so they read the buffers' first slots)."""
    q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4 = tensors
    a2, a4 = round(q2.shape[1] * FRACTION[0]), round(q4.shape[1] * FRACTION[0])
    t = 1 if CUT["one_tile"] else q2.shape[0]
    return (q2[:t, :a2], s2[:t, :a2], z2[:t, :a2], ss2, idx2[:t, :a2], ov[:t, :a2], oi[:t, :a2],
            q4[:t, :a4], s4[:t, :a4], z4[:t, :a4], ss4, idx4[:t, :a4])


def _wrap_tc(run_tc):
    def run(x, y, ws, gens, counters, tensors, cfg, outliers, fast, skip, keep_tiles, parts=None):
        assert parts is None, "ragged stacks are not cut"
        if CUT["split1"]:
            cfg, gens, ws = dataclasses.replace(cfg, split=1), None, y
        if CUT["atomic"] and cfg.split > 1:  # the shares add into an fp32 buffer (never zeroed: timing only)
            acc = torch.empty(y.shape, dtype=torch.float32, device=y.device)
            run_tc(x, acc, acc, None, counters, _first_slots(tensors), cfg, outliers, fast, skip, keep_tiles,
                   atomic=True)
            return y
        return run_tc(x, y, ws, gens, counters, _first_slots(tensors), cfg, outliers, fast, skip, keep_tiles)
    return run


def _wrap_h2(gemv_h2):
    def run(x, y, ws, counters, *tensors, **kw):
        if CUT["split1"]:
            kw, ws = {**kw, "split": 1}, y
        return gemv_h2(x, y, ws, counters, *_first_slots(tensors), **kw)
    return run


def main() -> None:
    dispatch._run_tc = _wrap_tc(dispatch._run_tc)
    dispatch.gemv_h2 = _wrap_h2(dispatch.gemv_h2)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    model = random_engine(True)
    model.compile_small_ops()

    def install(variant: tuple) -> None:
        FRACTION[0], CUT["split1"], CUT["one_tile"], CUT["atomic"] = variant

    times = alternate(model, VARIANTS, install)
    install(VARIANTS["committed"])
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.4f} ms/token ({', '.join(f'{t:.4f}' for t in ts)})", flush=True)
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", "unknown"),
              "torch": torch.__version__, "ms_per_token": times}
    (out / "gemv-share-step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
