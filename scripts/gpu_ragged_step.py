"""Probe (GPU, temporary): ragged k/v/q in the decode step. The random-layer 7B engine whose q projections take 2
more 4-bit tiles than k and v and whose up projections 3 fewer than their gates (as real allocations differ), so
every layer's k/v/q and gate/up are ragged stacks: with the table's ragged row for 12288x4096, without it (the
rule before 3d8f77c), and as split linears; the all-equal engine beside them. Alternated twice.
Writes $OUT/ragged-step.json."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import gpu_e2e_profile  # noqa: E402
from gpu_engine_table import _facts, _room_for_any_split, step_ms  # noqa: E402
from kernels import dispatch  # noqa: E402
from mpq.bench import kernels as bench  # noqa: E402
import mpq.runtime.model as model_module  # noqa: E402
from mpq.runtime.model import SplitLinears  # noqa: E402
from mpq.runtime.quant_linear import RaggedQuantLinear  # noqa: E402


def engine(spread: bool, ragged: bool, ragged_row: bool):
    real, facts, tc_group = bench.random_layer, dispatch._device_facts, model_module.TC_GROUP
    if spread:
        calls = []

        def layer(n, k, outliers, device, group_size=128, seed=0, n4=None):
            calls.append((n, k))
            d = (2 if n == k == 4096 and calls.count((n, k)) % 4 == 1 else  # the q projection (q, k, v, o in order)
                 -3 if n == 11008 and calls.count((n, k)) % 2 == 0 else 0)  # the up projection
            return real(n, k, outliers, device, group_size, seed, bench.realistic_n4(n, k, group_size) + d)
        gpu_e2e_profile.random_layer = layer
    if not ragged:  # WeightSource forms ragged stacks for g = TC_GROUP only
        model_module.TC_GROUP = -1
    if ragged_row is not True:  # False: no ragged row; a KernelConfig: that one as 12288x4096's ragged row
        sm, table = facts(torch.device("cuda"))
        table = {k: v for k, v in table.items() if k[4] != dispatch.RAGGED_ROW}
        if ragged_row:
            table[(1, 12288, 4096, 128, dispatch.RAGGED_ROW)] = ragged_row
        dispatch._device_facts = _facts(sm, table)
    try:
        model = gpu_e2e_profile.random_engine(True)
        model.compile_small_ops()
        _room_for_any_split(model)
        ms = step_ms(model)
    finally:
        gpu_e2e_profile.random_layer, dispatch._device_facts, model_module.TC_GROUP = real, facts, tc_group
    sets = {s: {"ragged": sum(isinstance(getattr(b, s), RaggedQuantLinear) for b in model.layers),
                "split": sum(isinstance(getattr(b, s), SplitLinears) for b in model.layers)} for s in ("kvq", "gate_up")}
    return ms, sets


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    sm, table = dispatch._device_facts(torch.device("cuda"))
    looped = {f"ragged, row {k[1]} outliers={k[4]}": dataclasses.replace(table[k], unrolled=False)
              for k in [(1, 11008, 4096, 128, True), (1, 4096, 4096, 128, True), (1, 12288, 4096, 128, False)]}
    variants = {"ragged, table row": (True, True, True), "ragged, no ragged row": (True, True, False),
                **{k: (True, True, cfg) for k, cfg in looped.items()}}
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"), "step_ms_per_token": {},
           "sets": {}}
    for _ in range(2):
        for v, args in variants.items():
            ms, sets = engine(*args)
            res["step_ms_per_token"].setdefault(v, []).append(ms)
            res["sets"][v] = sets
            print(f"{v:26s} {ms:.4f} ms/token {sets}", flush=True)
            torch.cuda.empty_cache()
    res["step_mean"] = {k: statistics.mean(t) for k, t in res["step_ms_per_token"].items()}
    (out / "ragged-step.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["step_mean"], indent=1))


if __name__ == "__main__":
    main()
