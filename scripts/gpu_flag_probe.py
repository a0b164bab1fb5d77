"""Temporary probe (removed after the run): where the one-graph exit decoder's time goes on the 7B shape."""
import functools
import json
import sys

import torch
from transformers import LlamaConfig

import mpq.specee.flag_decode as fd
from mpq.bench.e2e import LLAMA2_7B, _build, quantized_source, random_hf_model, time_engine
from mpq.specee.bench import _quantized_draft, scaled_trace
from mpq.specee.bundle import SpecEE
from mpq.specee.draft import DraftHead
from mpq.specee.predictor import ExitPredictors

out_path = sys.argv[1]
config = LlamaConfig(**LLAMA2_7B)
L, dev = config.num_hidden_layers, torch.device("cuda")
src = json.load(open("benchmarks/results/specee-trace-smollm2.json"))
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
offline = [0, 2, 5, 6, 9, 13, 17, 21, 26, 28, 29]
res = {}
orig_head = fd.exit_head


def timed(name, replay, mode="fill", cands=None, head_programs=None, flags=True, tokens=64):
    fd.exit_head = functools.partial(orig_head, programs=head_programs) if head_programs else orig_head
    dec = fd.FlagExitDecoder(model, SpecEE(draft, preds, offline, {}), len(prompt) + tokens + 1, mode=mode,
                             auto_fallback=False, trace=replay)
    if cands is not None:
        dec.candidates = cands
    if not flags:
        dec._set_exit_flags = lambda on: None
    dec.generate(prompt, 4)
    ms = []
    for _ in range(2):
        _, st, _ = dec.generate(prompt, tokens)
        ms.append(st.decode_ms / st.tokens)
    res[name] = {"ms": ms, "layers": st.layers / st.tokens}
    print(name, res[name], flush=True)
    del dec


with torch.inference_mode():
    for r in range(2):
        res[f"engine_{r}"] = time_engine(model, prompt, 64)["ms_per_token"]
        print("engine", res[f"engine_{r}"], flush=True)
    full = [L]
    timed("no_exit_all31", full)
    timed("no_exit_offline11", full, cands=offline)
    timed("no_exit_no_cands", full, cands=[])
    timed("no_exit_no_cands_noflags", full, cands=[], flags=False)
    timed("no_exit_all31_head132", full, head_programs=132)
    timed("trace_fill_all31", trace)
    timed("trace_fill_offline11", trace, cands=offline)
    timed("trace_drop_offline11", trace, mode="drop", cands=offline)
    timed("trace_drop_offline11_head132", trace, mode="drop", cands=offline, head_programs=132)
json.dump(res, open(out_path, "w"), indent=1)
