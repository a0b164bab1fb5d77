"""Probe (GPU, temporary): the unrolled M = 1 rows that won alone (gpu_unrolled_probe.py), one shape at a time in the
decode step of the random-layer 7B engine, against the committed table; alternated twice. Writes
$OUT/unrolled-step.json."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_engine_table import _facts, _room_for_any_split, step_ms  # noqa: E402
from gpu_e2e_profile import random_engine  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.dispatch import KernelConfig  # noqa: E402

U = lambda split, unroll, l2=False: KernelConfig("tc", split=split, unroll=unroll, l2=l2, unrolled=True)  # noqa: E731
VARIANTS = {
    "committed": {},
    "o: 4096x4096 split 4 unroll 2 l2 unrolled": {(1, 4096, 4096, 128, True): U(4, 2, True)},
    "o: 4096x4096 split 4 unroll 2 unrolled": {(1, 4096, 4096, 128, True): U(4, 2)},
    "down: 4096x11008 split 8 unrolled": {(1, 4096, 11008, 128, True): U(8, 1)},
}


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    sm_count, table = dispatch._device_facts(torch.device("cuda"))
    table = dict(table)
    model = random_engine(True)
    model.compile_small_ops()
    _room_for_any_split(model)
    times = {name: [] for name in VARIANTS}
    for _ in range(2):
        for name, patch in VARIANTS.items():
            dispatch._device_facts = _facts(sm_count, {**table, **patch})
            times[name].append(step_ms(model))
            print(f"{name:45s} {times[name][-1]:.4f} ms/token", flush=True)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"),
           "ms_per_token": times, "mean": {k: statistics.mean(v) for k, v in times.items()},
           "variants": {k: {str(kk): dataclasses.asdict(c) for kk, c in v.items()} for k, v in VARIANTS.items()}}
    (out / "unrolled-step.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["mean"], indent=1))


if __name__ == "__main__":
    main()
