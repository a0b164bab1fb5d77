"""Tune the M = 1 kernel table inside the decode step rather than on the GEMV alone (GPU).

The table in kernels/configs/ was swept with each GEMV timed back to back over rotating weights. In the engine each
GEMV follows a small op or the attention kernel and, with programmatic dependent launch, overlaps its tail, so the
best row can differ. For each candidate configuration of one shape (the other rows as committed), this captures
the random-layer 7B engine of scripts/gpu_e2e_profile.py and times graph-replayed decode, alternating candidates
twice; beside the candidates, the committed tensor-core split-K rows with `gen_early` flipped (--flips-only: those
alone). Prints a table; writes $OUT/engine-table.json (or benchmarks/results/). --write stores the winners in
kernels/configs/<gpu>.json (or $OUT/<gpu>.json on the device machine)."""

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
from kernels import dispatch  # noqa: E402
from kernels.dispatch import KernelConfig  # noqa: E402
from mpq.runtime.generate import Generator  # noqa: E402

G = 128
TC = lambda split, unroll=1, prefetch=True, l2=False: KernelConfig("tc", split=split, unroll=unroll,  # noqa: E731
                                                                     prefetch=prefetch, l2=l2)
CANDIDATES = {  # (n, k): configurations to try beside the committed row
    (4096, 4096): [TC(8, 2, l2=True), TC(16, l2=True), TC(16), TC(8), KernelConfig("gemv2", rows=4, early4=True)],
    (4096, 11008): [TC(16), TC(16, prefetch=False), TC(8), TC(16, 2), KernelConfig("gemv2", rows=8, split=4)],
    (12288, 4096): [TC(4, 2), TC(8), TC(4), KernelConfig("gemv2", rows=8, pairs=2)],
    (22016, 4096): [TC(4), TC(4, 2, prefetch=False), TC(8), KernelConfig("gemv2", rows=16, pairs=2)],
    (11008, 4096): [TC(8), TC(4, 2)],  # gate and up where their layouts differ (not stacked)
}


def step_ms(model) -> float:
    prompt = list(range(1, 129))
    gen = Generator(model, 384)
    gen.generate(prompt, 256)
    ms = statistics.median(gen.generate(prompt, 256).decode_ms_per_token for _ in range(3))
    del gen
    return ms


def alternate(model, variants: dict, install, rounds: int = 2, say: bool = True) -> dict[str, list[float]]:
    """step_ms under each variant (`install(variant)` puts one in place), the variants alternated `rounds` times
    so that drift over the call falls on all of them alike; say: print each measurement as it comes."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            install(variant)
            times[name].append(step_ms(model))
            if say:
                print(f"{name:36s} {times[name][-1]:.4f}", flush=True)
    return times


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    model = random_engine(True)
    model.compile_small_ops()
    _room_for_any_split(model)
    base_facts = dispatch._device_facts(torch.device("cuda"))
    sm_count, table = base_facts[0], dict(base_facts[1])
    rows = []

    def install(patch: dict) -> None:
        dispatch._device_facts.cache_clear()
        chosen = {key: cfg for key, cfg in patch.items() if cfg is not None}
        dispatch._device_facts = _facts(sm_count, {**table, **chosen})

    committed = step_ms(model)
    print(f"committed table: {committed:.3f} ms/token", flush=True)
    winners = {}
    for (n, k), cands in CANDIDATES.items():
        keys = [key for key in table if key[:4] == (1, n, k, G)] or [(1, n, k, G, None)]
        current = {key: table.get(key) for key in keys}
        flipped = {key: dataclasses.replace(cfg, gen_early=not cfg.gen_early) for key, cfg in current.items()
                   if cfg is not None and cfg.kind == "tc" and cfg.split > 1}
        options = ([("committed", current)] + ([("committed, gen_early flipped", flipped)] if flipped else [])
                   + [(str(dataclasses.asdict(c)), {key: c for key in keys}) for c in cands if "--flips-only" not in sys.argv])
        times = alternate(model, dict(options), install, say=False)
        for name, ts in times.items():
            rows.append({"shape": f"{n}x{k}", "config": name, "ms_per_token": ts})
            print(f"{n}x{k} {name:70s} {statistics.mean(ts):.3f} ms/token ({', '.join(f'{t:.3f}' for t in ts)})",
                  flush=True)
        best = min(times, key=lambda name: statistics.mean(times[name]))
        if best != "committed" and statistics.mean(times[best]) < statistics.mean(times["committed"]) - 0.005:
            winners[(n, k)] = dict(options)[best]
            table.update(winners[(n, k)])  # later shapes are tuned with this one's winner in place
    result = {"device": torch.cuda.get_device_name(), "committed_ms_per_token": committed, "rows": rows,
              "winners": {f"{n}x{k}": str(next(iter(p.values()))) for (n, k), p in winners.items()}}
    (out / "engine-table.json").write_text(json.dumps(result, indent=1))
    if "--write" in sys.argv:
        write_table(out, winners)


def _room_for_any_split(model) -> None:
    """Give every quantized linear split-K scratch for the fenceless epilogue at any split up to 16, as if the
    table had chosen it, so each candidate runs the epilogue it would run once committed."""
    from mpq.runtime.quant_linear import QuantLinear

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            words = dispatch.scratch_words(mod.out_features, mod.geometry["tile_rows"], 16)
            mod.split_counters = torch.zeros(words, dtype=torch.int32, device=mod.split_counters.device)


def _facts(sm_count, table):
    def facts(device):
        return sm_count, table
    facts.cache_clear = lambda: None
    return facts


def write_table(out: Path, winners: dict) -> None:
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").split()[0]
    src = dispatch.CONFIG_DIR / f"{dispatch.TABLE_OF.get(name, name)}.json"
    data = json.loads(src.read_text())
    for (n, k), patch in winners.items():
        for key, cfg in patch.items():
            data["configs"] = [r for r in data["configs"] if not (r["m_bucket"] == 1 and r["n"] == n and r["k"] == k
                                                               and r.get("outliers") == key[4])]
            data["configs"].append(dispatch.config_row(1, n, k, G, cfg, None if key[4] is None else int(key[4])))
    (out / src.name).write_text(json.dumps(data, indent=1))
    print(f"wrote {out / src.name}")


if __name__ == "__main__":
    main()
