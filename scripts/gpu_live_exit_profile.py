"""Where the live exit decoder's time goes (GPU, temporary): the random-layer 7B engine of gpu_e2e_profile.py, a
float draft head, random predictors, the oracle trace of the small model scaled to 32 layers. Times the one-graph
engine step, GraphExitDecoder at full depth and replaying the trace, then splits the host's time per token into
waiting (blocked on a predictor's read or the exit head) and issuing, and sums the GPU's busy time (torch.profiler)
over the same tokens. Writes $OUT/live-exit-profile.json."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
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


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    model = random_engine(True)
    model.compile_small_ops()
    a, L, dev = model.args, model.args.n_layers, model.device
    src = json.loads(Path("benchmarks/results/specee-trace-smollm2.json").read_text())
    trace = scaled_trace(src["exit_histogram"], int(src["num_layers"]), L, 256)
    prompt = list(range(1, 129))
    gen = Generator(model, cache_length(model, 128 + 64))
    gen.generate(prompt, 64)
    engine_ms = min(gen.generate(prompt, 64).decode_ms_per_token for _ in range(3))
    del gen
    draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size // 4, a.norm_eps,
                      torch.arange(4096))
    preds = ExitPredictors(list(range(L - 1))).to(dev)
    res = {"device": torch.cuda.get_device_name(), "engine_one_graph_ms": engine_ms, "runs": {}}
    for name, exits in (("full_depth", False), ("trace_fill", True)):
        dec = GraphExitDecoder(model, SpecEE(draft, preds, OFFLINE, {}), 128 + 64 + 1, exits=exits,
                               auto_fallback=False, trace=trace)
        dec.generate(prompt, 64)
        _, st, _ = dec.generate(prompt, 64)
        run = {"ms_per_token": st.decode_ms / st.tokens, "mean_layers": st.layers / st.tokens}
        # host time per token blocked on the GPU (predictor reads, exit heads) against the rest
        blocked = defaultdict(float)
        for meth in ("_read_prob", "_head", "_fill", "_layer", "_predict", "_draft", "_embed"):
            orig = getattr(dec, meth)

            def timed(*args, _orig=orig, _m=meth, **kw):
                t0 = time.perf_counter()
                r = _orig(*args, **kw)
                blocked[_m] += time.perf_counter() - t0
                return r

            setattr(dec, meth, timed)
        _, st, _ = dec.generate(prompt, 64)
        run["host_ms_per_token"] = {k: 1000 * v / st.tokens for k, v in blocked.items()}
        run["ms_per_token_instrumented"] = st.decode_ms / st.tokens
        for meth in list(blocked):
            delattr(dec, meth)
        kernel_ms = []
        for n in (1, 33):  # prefill alone, then prefill and 32 decode steps: the difference is the decode's
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                dec.generate(prompt, n)
            kernel_ms.append(sum(getattr(e, "device_time_total", 0) for e in prof.events()
                                 if e.device_type == torch.autograd.DeviceType.CUDA) / 1000)
        run["gpu_kernel_ms_per_token"] = (kernel_ms[1] - kernel_ms[0]) / 32
        if exits:  # host cost of single calls, each in a loop of 50 with the GPU drained between loops
            def per_call(fn, n=50):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                return 1e6 * (t1 - t0) / n

            lay = dec.graphs[("layer", 3)]
            pred = next(g for k, g in dec.graphs.items() if k[0] == "predict")
            ev = torch.cuda.Event()
            run["host_us_per_call"] = {
                "layer_graph_replay": per_call(lay.replay), "predictor_graph_replay": per_call(pred.replay),
                "event_record": per_call(ev.record), "event_create_record": per_call(lambda: torch.cuda.Event().record()),
                "copy_d2h_pinned_4B": per_call(lambda d=dec: d.host_prob.copy_(d.prob_out, non_blocking=True)),
                "fill_scalar": per_call(lambda d=dec: d.pos.fill_(130)),
                "event_sync_idle": per_call(ev.synchronize),
                "empty_python_call": per_call(lambda: None)}
        res["runs"][name] = run
        print(name, json.dumps(run, indent=1), flush=True)
        del dec
        torch.cuda.empty_cache()
    res["engine_one_graph_ms"] = engine_ms
    print("engine one-graph step", engine_ms)
    (out / "live-exit-profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
