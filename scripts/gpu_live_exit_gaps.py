"""Where the live exit decoder loses time against the one-graph step (GPU, temporary). The random-layer 7B engine
of gpu_e2e_profile.py, a float draft head, random predictors, the small model's oracle trace scaled to 32 layers.
Per decoder (engine's one-graph step; GraphExitDecoder at full depth, and replaying the trace in fill and drop
mode): ms/token, the host's time per token split by method (polling, replays, the rest), and from torch.profiler
the GPU's busy time (union of kernel and copy intervals) and its idle gaps, the largest with the operations on
either side. Writes $OUT/live-exit-gaps.json."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from mpq.runtime.generate import Generator, cache_length  # noqa: E402
from mpq.specee.bench import scaled_trace  # noqa: E402
from mpq.specee.bundle import SpecEE  # noqa: E402
from mpq.specee.draft import DraftHead  # noqa: E402
from mpq.specee.graph_decode import GraphExitDecoder  # noqa: E402
from mpq.specee.predictor import ExitPredictors  # noqa: E402

OFFLINE = [0, 2, 5, 6, 9, 13, 17, 21, 26, 28, 29]  # the trace bench's schedule (specee-e2e-h100-v19.json)
TOKENS = 24


def timeline(fn) -> dict:
    """GPU busy/idle over fn() from the profiler's device events (kernels, copies, memsets)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    ev.sort(key=lambda e: e.time_range.start)
    busy, gaps, end, last = 0.0, [], None, None
    for e in ev:
        s, t = e.time_range.start, e.time_range.end
        if end is None or s > end:
            if end is not None:
                gaps.append((s - end, last, e.name))
            busy += t - s
            end, last = t, e.name
        elif t > end:
            busy += t - end
            end, last = t, e.name
    gaps.sort(key=lambda g: -g[0])
    span = (ev[-1].time_range.end - ev[0].time_range.start) if ev else 0
    buckets = Counter()
    for g, _, _ in gaps:
        buckets["<2us" if g < 2 else "2-5us" if g < 5 else "5-10us" if g < 10 else "10-20us" if g < 20 else
                "20-50us" if g < 50 else ">=50us"] += 1
    return {"span_ms": span / 1000, "busy_ms": busy / 1000, "idle_ms": sum(g for g, _, _ in gaps) / 1000,
            "gaps": len(gaps), "gap_buckets": dict(buckets),
            "largest": [{"us": round(g, 1), "after": a[:60], "before": b[:60]} for g, a, b in gaps[:12]]}


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    model = random_engine(True)
    model.compile_small_ops()
    a, L, dev = model.args, model.args.n_layers, model.device
    src = json.loads(Path("benchmarks/results/specee-trace-smollm2.json").read_text())
    trace = scaled_trace(src["exit_histogram"], int(src["num_layers"]), L, 256)
    prompt = list(range(1, 129))
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tokens": TOKENS, "runs": {}}
    gen = Generator(model, cache_length(model, 128 + 64))
    gen.generate(prompt, 64)
    res["runs"]["engine"] = {"ms_per_token": min(gen.generate(prompt, 64).decode_ms_per_token for _ in range(3))}
    del gen
    draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size // 4, a.norm_eps,
                      torch.arange(4096))
    preds = ExitPredictors(list(range(L - 1))).to(dev)
    from old_graph_decode import GraphExitDecoder as OldDecoder  # 8088b31: a graph per layer and per predictor

    variants = {"old_8088b31": (OldDecoder, {}), "ahead1": (GraphExitDecoder, {"AHEAD": 1}),
                "ahead2": (GraphExitDecoder, {"AHEAD": 2}), "ahead2_copy_aside": (GraphExitDecoder, {"AHEAD": 2, "COPY_ASIDE": True})}
    for _round in range(2):
        for vname, (cls, attrs) in variants.items():
            for mode in ("fill", "drop"):
                name = f"{vname}_{mode}_round{_round}"
                dec = cls(model, SpecEE(draft, preds, OFFLINE, {}), 128 + 64 + 1, exits=True, mode=mode,
                          auto_fallback=False, trace=trace)
                for k, v in attrs.items():
                    setattr(dec, k, v)
                dec.generate(prompt, 64)
                _, st, _ = dec.generate(prompt, 64)
                res["runs"][name] = {"ms_per_token": st.decode_ms / st.tokens, "mean_layers": st.layers / st.tokens,
                                     "graphs": len(dec.graphs)}
                print(name, res["runs"][name], flush=True)
                del dec
                torch.cuda.empty_cache()
    (out / "live-exit-gaps.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
