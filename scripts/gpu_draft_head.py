"""The draft head's reduced-vocabulary head in fp16 (the bound LM-head rows) against 4-bit, and its top-4 + row
gather as one kernel (`kernels.draft_top4`) against the PyTorch ops (GPU), inside the trace-driven exit bench's step
(`mpq.specee.bench`): full depth with and without the draft, and the trace in drop and fill mode, every variant
captured from one engine and alternated twice. Writes $OUT/draft-head.json.

Why: the draft costs what its bytes cost at the step's bandwidth (3.4% of a step for ~84 MB, `specee-e2e-h100-v28`),
and the fp16 head was 33.5 of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kernels.draft_top4 import draft_top4, draft_top4_reference
from mpq.specee import bench as exit_bench
from mpq.specee.bench import build_exit_bench


def main() -> None:
    bench = build_exit_bench(Path("benchmarks/results/specee-trace-smollm2.json"))
    step, draft, L = bench.step, bench.draft, bench.model.args.n_layers
    trace = next(iter(bench.traces.values()))
    start, n = len(bench.prompt), len(trace)
    quantized_head = draft.linears["head"]
    parts = {"loop only": dict(fill=True, draft=False, predict=False),
             "loop + draft": dict(fill=True, draft=True, predict=False),
             "full machinery": dict(fill=True, draft=True, predict=True)}
    modes = {"drop": dict(fill=False, draft=True, predict=True), "fill": dict(fill=True, draft=True, predict=True)}
    graphs = {}
    with torch.inference_mode():
        for name, head, tail in (("4-bit head, fused top-4", quantized_head, draft_top4),
                                 ("4-bit head, torch top-4", quantized_head, draft_top4_reference),
                                 ("fp16 head, torch top-4", None, draft_top4_reference)):
            if head is None:
                draft.linears.pop("head")
            else:
                draft.linears["head"] = head
            exit_bench.draft_top4 = tail
            step.graphs = {}
            for p in parts.values():
                step.capture(L, **p)
            for e in sorted(set(trace)):
                for m in modes.values():
                    step.capture(e, **m)
            graphs[name] = step.graphs
        times: dict[str, dict[str, list[float]]] = {name: {} for name in graphs}
        for _ in range(2):
            for name, g in graphs.items():
                step.graphs = g
                row = times[name]
                for p, kw in parts.items():
                    row.setdefault(p, []).append(step.time([L] * n, start, **kw))
                for m, kw in modes.items():
                    row.setdefault(m, []).append(step.time(trace, start, **kw))
                print(name, {k: round(v[-1], 4) for k, v in row.items()}, flush=True)
    mean_layers = sum(trace) / n
    summary = {name: {m: bench.base_ms / min(row[m]) / (L / mean_layers) for m in modes} for name, row in times.items()}
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "draft-head.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""), "torch": torch.__version__,
        "what": "trace-driven exit bench step (7B shape, random weights), ms/token (graph replay, median of 3 x 256 "
                "tokens after 128), the draft's 4096-row head in 4-bit or fp16, its top-4 fused or as PyTorch ops, two "
                "alternations",
        "no_exit_ms_per_token": bench.base_ms, "mean_layers": mean_layers, "offline_layers": step.offline,
        "rows": times, "speedup_vs_ideal_best_of_two": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
