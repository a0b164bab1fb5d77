"""Probe (GPU, temporary; branch ragged-stack): shared-input linears that differ only in n4, as one ragged launch
(RaggedQuantLinear) against the same parts apart (SplitLinears: side streams, or in turn) and against a plain
stack of equal-n4 parts (the bound).

1. Alone, graph-replayed over ROTATE weight copies, M = 1: gate/up (2 x 11008x4096) and k/v/q (3 x 4096x4096)
   with the parts' n4 spread by up to 3 around the real mix's; every variant checked against the parts'
   dequantized weights.
2. In the decode step of the random-layer 7B engine whose up projections take another n4 than their gates, as
   real allocations do: ragged against split, alternated twice; the all-stacked engine beside them.
Writes $OUT/ragged-probe.json."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import gpu_e2e_profile  # noqa: E402
from gpu_engine_table import _room_for_any_split, step_ms  # noqa: E402
from mpq.bench import kernels as bench  # noqa: E402
import mpq.runtime.model as model_module  # noqa: E402
from mpq.runtime.model import SplitLinears  # noqa: E402
from mpq.runtime.quant_linear import QuantLinear, RaggedQuantLinear, StackedQuantLinear  # noqa: E402

SETS = {"gate/up": [(11008, 4096, 0), (11008, 4096, -3)], "k/v/q": [(4096, 4096, 0), (4096, 4096, 0),
                                                                     (4096, 4096, 2)]}


def alone(name: str, parts_spec) -> dict:
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    copies = []
    for i in range(bench.ROTATE):
        parts = [bench.random_layer(n, k, 1, "cuda", seed=10 * i + j, n4=bench.realistic_n4(n, k) + d)
                 for j, (n, k, d) in enumerate(parts_spec)]
        same = [bench.random_layer(n, k, 1, "cuda", seed=10 * i + j) for j, (n, k, _) in enumerate(parts_spec)]
        copies.append({"ragged": RaggedQuantLinear(parts), "split, side streams": SplitLinears(
            [QuantLinear(p) for p in parts]), "stack of equal n4 (bound)": StackedQuantLinear.of(same),
            "_ref": torch.cat([p.dequantize(torch.float32) for p in parts]), "_ref_same": torch.cat(
                [p.dequantize(torch.float32) for p in same])})
    res = {}
    for variant in ("ragged", "split, side streams", "split, in turn", "stack of equal n4 (bound)"):
        mods = [c["split, side streams"] if variant == "split, in turn" else c[variant] for c in copies]
        for m in mods:
            if isinstance(m, SplitLinears):
                m.parallel = variant != "split, in turn"
        ref = copies[0]["_ref_same" if variant.startswith("stack") else "_ref"]
        y = torch.cat(mods[0](x), dim=-1).float()
        err = float((y - x.float() @ ref.t()).norm() / (x.float() @ ref.t()).norm())
        us = bench._graph_us(lambda: [m(x) for m in mods]) if err < 5e-3 else float("inf")
        res[variant] = {"us": us, "rel_err": err}
        print(f"{name:8s} {variant:28s} {us:7.2f} us  err {err:.1e}", flush=True)
    return res


def engine(ragged: bool, spread: bool):
    """The random-layer 7B engine; spread: every up projection takes another n4 than its gate; ragged False: those
    sets as split linears."""
    real = bench.random_layer
    if spread:
        calls = []

        def layer(n, k, outliers, device, group_size=128, seed=0, n4=None):
            calls.append(n)
            d = -3 if n == 11008 and calls.count(11008) % 2 == 0 else 0  # every up projection: 3 fewer 4-bit tiles
            return real(n, k, outliers, device, group_size, seed, bench.realistic_n4(n, k, group_size) + d)
        gpu_e2e_profile.random_layer = layer
    tc_group = model_module.TC_GROUP
    if not ragged:  # WeightSource forms ragged stacks for g = TC_GROUP only
        model_module.TC_GROUP = -1
    try:
        model = gpu_e2e_profile.random_engine(True)
    finally:
        gpu_e2e_profile.random_layer, model_module.TC_GROUP = real, tc_group
    model.compile_small_ops()
    _room_for_any_split(model)
    return model


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"), "alone_us": {}}
    for name, spec in SETS.items():
        res["alone_us"][name] = alone(name, spec)
        torch.cuda.empty_cache()
    variants = {"all stacked (equal n4)": (True, False), "ragged": (True, True), "split": (False, True)}
    times = {v: [] for v in variants}
    sets = {}
    for _ in range(2):
        for v, (ragged, spread) in variants.items():
            model = engine(ragged, spread)
            sets[v] = {"gate_up_ragged": sum(isinstance(b.gate_up, RaggedQuantLinear) for b in model.layers),
                       "gate_up_split": sum(isinstance(b.gate_up, SplitLinears) for b in model.layers)}
            times[v].append(step_ms(model))
            print(f"{v:28s} {times[v][-1]:.4f} ms/token {sets[v]}", flush=True)
            del model
            torch.cuda.empty_cache()
    res.update(step_ms_per_token=times, step_mean={k: statistics.mean(t) for k, t in times.items()}, sets=sets)
    (out / "ragged-probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["step_mean"], indent=1))


if __name__ == "__main__":
    main()
