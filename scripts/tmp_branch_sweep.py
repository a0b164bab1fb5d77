"""Temporary (GPU, branch graph-if): the one-graph exit decoder with device branches every k layers (k = 0, 2, 4,
8), fill and drop, replaying the SmolLM2 exit trace scaled to 32 layers; the engine's step timed in the same
process before and after. Also where the step's cost without exits goes: no predictors, then also no draft, no
exit flags, neither. 128 tokens, median of 3. JSON to argv[1]."""
import json
import os
import statistics
import sys

import torch
from transformers import LlamaConfig

from mpq.bench.e2e import LLAMA2_7B, _build, quantized_source, random_hf_model, time_engine
from mpq.specee.bench import _quantized_draft, scaled_trace
from mpq.specee.bundle import SpecEE
from mpq.specee.draft import DraftHead
from mpq.specee.flag_decode import FlagExitDecoder
from mpq.specee.predictor import ExitPredictors
from mpq.specee.schedule import auto_layers

src = json.load(open("benchmarks/results/specee-trace-smollm2.json"))
config = LlamaConfig(**LLAMA2_7B)
L, dev = config.num_hidden_layers, torch.device("cuda")
trace = scaled_trace(src["exit_histogram"], int(src["num_layers"]), L, 256)
hf = random_hf_model(config)
sd = {k: v.detach() for k, v in hf.state_dict().items()}
del hf
model, _ = _build(config.to_dict(), quantized_source(sd, L, dev))
del sd
model.compile_small_ops()
prompt = torch.randint(0, config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
a = model.args
draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size // 4, a.norm_eps, torch.arange(4096))
with torch.no_grad():
    for n in ("o", "down"):
        getattr(draft, n).normal_(0, 0.02)
_quantized_draft(draft, dev)
draft.to(dev, torch.float16)
draft.bind_rows(model.output.weight)
preds = ExitPredictors(list(range(L - 1))).to(dev)
offline = auto_layers(torch.bincount(torch.tensor(trace) - 1, minlength=L).float(), call_cost=0.05)
tokens = 128
res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"), "torch": torch.__version__,
       "offline": offline, "tokens": tokens, "trace_mean_layers": sum(trace[:tokens]) / tokens, "rows": {}}
rows = res["rows"]
with torch.inference_mode():
    res["engine_ms_before"] = time_engine(model, prompt, tokens)["ms_per_token"]
    cases = [("no_predictors", "fill", [L], 0, ""), ("no_predictors_no_draft", "fill", [L], 0, "draft"),
             ("no_predictors_no_flags", "fill", [L], 0, "flags"), ("no_predictors_neither", "fill", [L], 0, "both")]
    for k in (0, 2, 4, 8):
        cases += [(f"no_exit_b{k}", "fill", [L], k, ""), (f"fill_b{k}", "fill", trace, k, ""),
                  (f"drop_b{k}", "drop", trace, k, "")]
    for name, mode, replay, k, off in cases:
        try:
            dec = FlagExitDecoder(model, SpecEE(draft, preds, offline, {}), len(prompt) + tokens + 1, mode=mode,
                                  auto_fallback=False, trace=replay, branches=k)
            if name.startswith("no_predictors"):
                dec.candidates = []
            if off in ("draft", "both"):
                dec._draft_next = lambda token: None
            if off in ("flags", "both"):
                dec._set_exit_flags = lambda on: None
            dec.generate(prompt, 4)
            ms = []
            for _ in range(3):
                toks, st, _ = dec.generate(prompt, tokens)
                ms.append(st.decode_ms / max(st.tokens, 1))
            rows[name] = {"ms": statistics.median(ms), "all_ms": ms, "mean_layers": st.layers / st.tokens,
                          "calls": st.predictor_calls / st.tokens, "tokens": toks}
            print(name, {x: y for x, y in rows[name].items() if x != "tokens"}, flush=True)
            del dec
        except Exception as e:  # noqa: BLE001 - a sweep reports every failure and goes on
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
            print(name, rows[name], flush=True)
    res["engine_ms_after"] = time_engine(model, prompt, tokens)["ms_per_token"]
for name, r in rows.items():
    base = rows.get(name.rsplit("_b", 1)[0] + "_b0")
    if "tokens" in r and base and "tokens" in base and name.rsplit("_b", 1)[-1] != "0":
        r["same_tokens_as_b0"] = r["tokens"] == base["tokens"]
    r.pop("tokens", None)
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: r.get("ms", r.get("error")) for k, r in rows.items()}, indent=0),
      "engine", res["engine_ms_before"], res["engine_ms_after"])
