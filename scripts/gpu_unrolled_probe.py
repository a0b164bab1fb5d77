"""Probe (GPU, temporary): the tensor-core GEMV with each program's loop unrolled and all of its loads issued
before any arithmetic (`unrolled`) against the committed M = 1 rows (one step ahead in a loop).

1. Per M = 1 shape of the table (the three bench shapes and the stacked ones), layers with and without outliers:
   the committed row, the same row unrolled, and unrolled with the other unroll and with split / 2 and x 2; graph-timed over rotating weights (scripts/gpu_kernels.time_config), each checked against the dequantized
   weights.
2. In the decode step (scripts/gpu_engine_table.step_ms, the random-layer 7B engine): the committed table against
   the table with each shape's fastest row of step 1, alternated three times.
Writes $OUT/unrolled-kernels.jsonl and $OUT/unrolled-summary.json."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_engine_table import _facts, _room_for_any_split, step_ms  # noqa: E402
from gpu_kernels import STACKED_SHAPES, time_config  # noqa: E402
from gpu_e2e_profile import random_engine  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.dispatch import TENSOR_ORDER, scratch_words  # noqa: E402
from mpq.bench import kernels as bench  # noqa: E402


def variants(c: dispatch.KernelConfig) -> list[tuple[str, dispatch.KernelConfig]]:
    out = [("committed", c)]
    if c.kind != "tc":
        return out + [(f"unrolled tc split {sp}", dispatch.KernelConfig("tc", split=sp, unroll=2, unrolled=True))
                      for sp in (4, 8)]
    p2 = dataclasses.replace(c, unrolled=True)
    out += [("unrolled", p2), ("unrolled, unroll flipped", dataclasses.replace(p2, unroll=3 - c.unroll))]
    out += [(f"unrolled, split {sp}", dataclasses.replace(p2, split=sp)) for sp in (c.split // 2, 2 * c.split)
            if 2 <= sp <= 16]
    return out


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    t0 = time.time()
    sm_count, table = dispatch._device_facts(torch.device("cuda"))
    table = dict(table)
    log = (out / "unrolled-kernels.jsonl").open("w")
    best_rows = {}
    for n, k in bench.SHAPES + STACKED_SHAPES:
        for ko in (1, 0):
            key = next((kk for kk in ((1, n, k, 128, ko > 0), (1, n, k, 128, None)) if kk in table), None)
            if key is None:
                continue
            layers = [bench.random_layer(n, k, ko, "cuda", seed=i) for i in range(bench.ROTATE)]
            args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
            counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ layers[0].dequantize(torch.float32).t()
            res = []
            for name, cfg in variants(table[key]):
                us, err = time_config(x, args, ref, counters, cfg, f"{n}x{k}", ko)
                res.append((us, name, cfg))
                log.write(json.dumps({"shape": f"{n}x{k}", "outliers": ko, "variant": name, "us": us, "rel_err": err,
                                      "config": dataclasses.asdict(cfg)}) + "\n")
                log.flush()
                print(f"{n}x{k} k={ko} {name:22s} {us:7.2f} us err {err:.1e} [{time.time() - t0:.0f}s]", flush=True)
            best = min(res, key=lambda r: r[0])
            if best[1] != "committed":
                best_rows[key] = best[2]
            del layers, args
            torch.cuda.empty_cache()
    summary = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", "unknown"),
               "kernel_winners": {str(k): dataclasses.asdict(c) for k, c in best_rows.items()}}
    print(f"[{time.time() - t0:.0f}s] engine", flush=True)
    model = random_engine(True)
    model.compile_small_ops()
    _room_for_any_split(model)

    def run(patch: dict) -> float:
        dispatch._device_facts = _facts(sm_count, {**table, **patch})
        return step_ms(model)

    times = {"committed": [], "unrolled winners": []}
    for _ in range(3):
        times["committed"].append(run({}))
        times["unrolled winners"].append(run(best_rows))
        print({k: [round(v, 4) for v in vs] for k, vs in times.items()}, flush=True)
    summary["engine_ms_per_token"] = times
    summary["engine_mean"] = {k: statistics.mean(v) for k, v in times.items()}
    (out / "unrolled-summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["engine_mean"]), f"[{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
