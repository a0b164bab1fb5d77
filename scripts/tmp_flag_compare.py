"""Temporary: the one-graph exit decoder with the GEMVs' early exit-flag read (argv[2] = early) or without it
(late: kernels.exit_flag.skipped_early replaced by a function that never skips), the engine's step as the baseline."""
import json, os, sys, statistics
import torch
from transformers import LlamaConfig
from mpq.bench.e2e import LLAMA2_7B, _build, quantized_source, random_hf_model, time_engine
from mpq.specee.bench import scaled_trace, _quantized_draft
from mpq.specee.bundle import SpecEE
from mpq.specee.draft import DraftHead
from mpq.specee.predictor import ExitPredictors
from mpq.specee.schedule import auto_layers
from mpq.specee import flag_decode
import triton
import triton.language as tl
import kernels.gemv_h2
import kernels.gemv_tc

if sys.argv[2] == "late":
    @triton.jit
    def never(skip_ptr, tile, keep_tiles, PDL: tl.constexpr):
        return tile < 0

    kernels.gemv_tc.skipped_early = never
    kernels.gemv_h2.skipped_early = never

out = sys.argv[1]
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
exit_hist = torch.bincount(torch.tensor(trace) - 1, minlength=L).float()
preds = ExitPredictors(list(range(L - 1))).to(dev)
offline = auto_layers(exit_hist, call_cost=0.05)
res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"), "offline": offline,
       "trace_mean_layers_64": sum(trace[:64]) / 64, "trace_mean_layers_128": sum(trace[:128]) / 128}
tokens = 128
base = []
rows = {}
with torch.inference_mode():
    for rnd in range(1):
        base.append(time_engine(model, prompt, tokens)["ms_per_token"])
        for ver, mod in ((sys.argv[2], flag_decode),):
            for name, mode, replay in (("no_exit_no_predictors", "fill", [L]), ("no_exit_trace", "fill", [L]),
                                       ("trace_fill", "fill", trace), ("trace_drop", "drop", trace)):
                dec = mod.FlagExitDecoder(model, SpecEE(draft, preds, offline, {}), len(prompt) + tokens + 1,
                                          mode=mode, auto_fallback=False, trace=replay)
                if name == "no_exit_no_predictors":
                    dec.candidates = []
                dec.generate(prompt, 4)
                ms = []
                for _ in range(3):
                    toks, st, _ = dec.generate(prompt, tokens)
                    ms.append(st.decode_ms / max(st.tokens, 1))
                k = f"{ver}/{name}"
                rows.setdefault(k, []).append({"ms": statistics.median(ms), "mean_layers": st.layers / st.tokens,
                                               "calls": st.predictor_calls / st.tokens, "first": toks[:8]})
                print(k, rows[k][-1], flush=True)
                del dec
res["engine_ms"] = base
res["rows"] = rows
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: [r["ms"] for r in v] for k, v in rows.items()}, indent=1), "engine", base)
