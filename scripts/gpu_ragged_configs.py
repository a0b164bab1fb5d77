"""Probe (GPU, temporary): which tensor-core configuration a ragged stack should take when its shape's table row
is of another kind (12288x4096 with outliers: GEMV2) or unrolled. Times each candidate (the table's tc rows of
the decode shapes, looped; the heuristic) on ragged k/v/q, k/v and gate/up, M = 1, graph-replayed over ROTATE
weight copies, each checked against the parts' dequantized weights. Writes $OUT/ragged-configs.json."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from kernels.dispatch import _device_facts, choose_config, heuristic_config, mixed_matmul, scratch_words
from mpq.bench import kernels as bench
from mpq.runtime.quant_linear import KERNEL_TENSOR_ORDER, RaggedQuantLinear

SETS = {"k/v/q": [(4096, 0), (4096, 0), (4096, 2)], "k/v": [(4096, 0), (4096, -2)],
        "gate/up": [(11008, 0), (11008, -3)]}


def candidates(n: int) -> dict:
    sm_count, table = _device_facts(torch.device("cuda"))
    out = {"chosen now": choose_config(1, n, 4096, 128, torch.device("cuda"), 1, ragged=True),
           "heuristic": heuristic_config(1, n, 4096, 128, sm_count)}
    for (mb, tn, tk, g, outl), cfg in sorted(table.items(), key=lambda kv: str(kv[0])):
        if mb == 1 and tk == 4096 and g == 128 and cfg.kind == "tc":
            out[f"row {tn} outliers={outl}"] = dataclasses.replace(cfg, unrolled=False)
    return out


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"), "sets": {}}
    for name, spec in SETS.items():
        mods = [RaggedQuantLinear([bench.random_layer(n, 4096, 1, "cuda", seed=10 * i + j,
                                                      n4=bench.realistic_n4(n, 4096) + d)
                                   for j, (n, d) in enumerate(spec)]) for i in range(bench.ROTATE)]
        n = sum(s for s, _ in spec)
        ref = mods[0].dequantized_weight(torch.float32)
        want = x.float() @ ref.t()
        counters = [torch.zeros(scratch_words(n, 16, 32), dtype=torch.int32, device="cuda") for _ in mods]
        rows = {}
        for label, cfg in candidates(n).items():
            def call(m, c, cfg=cfg):
                tensors = tuple(getattr(m, t) for t in KERNEL_TENSOR_ORDER)
                parts = tuple(tuple(s) for s in m.part_slots)
                return mixed_matmul(x, tensors, group_size=128, outliers=m.geometry["outliers"], counters=c,
                                    config=cfg, parts=parts)
            try:
                err = float((call(mods[0], counters[0]).float() - want).norm() / want.norm())
                us = bench._graph_us(lambda: [call(m, c) for m, c in zip(mods, counters)]) if err < 5e-3 \
                    else float("inf")
            except Exception as e:  # a candidate the ragged kernel refuses
                err, us = float("nan"), float("inf")
                print(f"{name} {label}: {type(e).__name__}: {e}")
            rows[label] = {"us": us, "rel_err": err, "config": dataclasses.asdict(cfg)}
            print(f"{name:8s} {label:28s} {us:7.2f} us  err {err:.1e}  {cfg}", flush=True)
        res["sets"][name] = rows
        mods = counters = None
        torch.cuda.empty_cache()
    (out / "ragged-configs.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
