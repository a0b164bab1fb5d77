"""`mpq bench e2e --early-exit`: TRACE-DRIVEN exit decoding on the 7B-shaped quantized engine (GPU).

Exits cannot be learned on random weights, so the exit layer of each token is replayed from the executed-layer
histogram measured on the real small model (`mpq eval --early-exit --json`), scaled from its layer count to 32.
Everything else is really computed per token: the draft head (quantized like the model, reduced vocabulary of
4096 rows), the features and predictor at every offline layer below the exit and at the exit layer, the full LM
head at the exit layer, and the KV filling of the skipped layers.

Graph-friendly formulation: one CUDA graph per exit layer e (1..32), each holding the whole step for that exit;
the replayed trace picks the graph. (In live decoding the predictor's decision would pick the next segment; that
costs a host sync per predicted layer, which this replay does not measure: it is stated in the output.)
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from mpq.errors import MpqError

VOCAB_ROWS = 4096
NEW_TOKENS = 256


def scaled_trace(hist: dict, src_layers: int, layers: int, n: int, seed: int = 0) -> list[int]:
    """n executed-layer counts drawn from hist {count: tokens} over src_layers, scaled to `layers`."""
    keys = sorted(int(k) for k in hist)
    w = torch.tensor([float(hist[str(k)] if str(k) in hist else hist[k]) for k in keys])
    draw = torch.multinomial(w / w.sum(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [max(1, min(layers, round(keys[i] * layers / src_layers))) for i in draw.tolist()]


def _quantized_draft(model, draft, dev):
    from mpq.quant.pipeline import quantize_state_dict
    from mpq.runtime.quant_linear import QuantLinear

    names = ("fc", "q", "k", "v", "o", "gate", "up", "down")
    packed, _ = quantize_state_dict({n: getattr(draft, n).detach().float().cpu() for n in names}, 2.9)
    draft.linears = {n: QuantLinear(packed[n].to(dev)) for n in names}


class GraphStep:
    """Static buffers and one captured decode step per exit layer."""

    def __init__(self, model, draft, preds, offline, max_len):
        from mpq.specee.decode import ExitDecoder

        self.model, self.draft, self.preds, self.offline = model, draft, preds, offline
        self.dec = ExitDecoder(model, None, max_len, exits=False)
        dev, dt = model.device, model.dtype
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h_prev = torch.zeros(model.args.dim, dtype=dt, device=dev)
        self.probe = torch.zeros(64, dtype=torch.float32, device=dev)
        a = model.args
        self.dcache = torch.zeros(2, a.n_kv_heads, max_len, a.head_dim, dtype=dt, device=dev)
        self.lm_w = model.output.weight
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _draft(self):
        from mpq.specee.draft import _rotate
        import torch.nn.functional as F

        d, m, a = self.draft, self.model, self.model.args
        emb = m.embed[self.token]
        x = d.lin("fc", torch.cat((self.h_prev[None], emb), -1))
        cos, sin = m.rope_cos[self.pos], m.rope_sin[self.pos]

        def attend(q, k, v):
            self.dcache[0].index_copy_(1, self.pos, _rotate(k, cos, sin).transpose(0, 1))
            self.dcache[1].index_copy_(1, self.pos, v.transpose(0, 1))
            mask = m.causal[self.pos]
            r = a.n_heads // a.n_kv_heads
            keys, vals = (t.repeat_interleave(r, 0) if r > 1 else t for t in (self.dcache[0], self.dcache[1]))
            return F.scaled_dot_product_attention(_rotate(q, cos, sin).transpose(0, 1), keys, vals, attn_mask=mask).transpose(0, 1)

        from mpq.specee.features import final_norm

        h = final_norm(x, d.attn_norm, d.eps)
        q = d.lin("q", h).unflatten(-1, (a.n_heads, a.head_dim))
        k = d.lin("k", h).unflatten(-1, (a.n_kv_heads, a.head_dim))
        v = d.lin("v", h).unflatten(-1, (a.n_kv_heads, a.head_dim))
        x = x + d.lin("o", attend(q, k, v).flatten(-2))
        h = final_norm(x, d.mlp_norm, d.eps)
        x = x + d.lin("down", F.silu(d.lin("gate", h)) * d.lin("up", h))
        logits = final_norm(x, d.norm, d.eps)[0] @ d.rows.t()
        return self.lm_w[d.vocab[logits.topk(4).indices]]

    def step(self, e: int) -> None:
        from mpq.specee.features import draft_logits, features, final_norm

        m, L = self.model, self.model.args.n_layers
        rows = self._draft()
        pos = self.pos
        mask = m.causal[pos].view(1, 1, 1, -1)
        x, p_prev = m.embed[self.token].view(1, 1, -1), None
        calls = [i for i in self.offline if i < e - 1] + ([e - 1] if e < L else [])
        for i in range(e):
            x = self.dec.run_layer(i, x, pos, mask, m.ops)
            if i in calls:
                hn = final_norm(x.view(-1), m.norm, m.args.norm_eps)
                feat, p_prev = features(draft_logits(hn, rows), p_prev)
                self.probe[i:i + 1].copy_(self.preds.prob(i, feat.float()).view(1))
        hn = final_norm(x.view(-1), m.norm, m.args.norm_eps)
        nxt = m.output(hn).argmax(-1)
        if e < L:
            self.dec.fill_kv(x, pos, e)
        self.h_prev.copy_(hn)
        self.token.copy_(nxt.view(1))
        self.pos.add_(1)

    def capture(self, e: int) -> None:
        saved = self.token.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(e)
                self.token.copy_(saved[0])
                self.pos.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.step(e)
        self.pool = g.pool()
        self.graphs[e] = g
        self.token.copy_(saved[0])
        self.pos.copy_(saved[1])

    def time(self, trace: list[int], start: int) -> float:
        """ms per token replaying one graph per token of the trace from position start."""
        self.pos.fill_(start)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for e in trace:
            self.graphs[e].replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / len(trace)


def bench_early_exit(trace_json: Path, json_out: Path | None = None, prompt_tokens: int = 128,
                     new_tokens: int = NEW_TOKENS) -> dict:
    if not torch.cuda.is_available():
        raise MpqError("mpq bench e2e --early-exit needs a CUDA GPU")
    from transformers import LlamaConfig

    from mpq.bench.e2e import LLAMA2_7B, _build, _commit, quantized_source, random_hf_model, time_engine
    from mpq.specee.draft import DraftHead
    from mpq.specee.predictor import ExitPredictors
    from mpq.specee.schedule import auto_layers

    try:
        src = json.loads(Path(trace_json).read_text())
        src_layers = int(src["num_layers"])
        hists = {src.get("trace_kind", "measured_exits"): src["exit_histogram"]}
        if "oracle_histogram" in src:  # also replay the exit oracle: what perfect exits would give
            hists["oracle"] = src["oracle_histogram"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MpqError(f"{trace_json}: not the JSON of `mpq eval --early-exit --json` (needs exit_histogram, num_layers)") from None
    config = LlamaConfig(**LLAMA2_7B)
    L, dev = config.num_hidden_layers, torch.device("cuda")
    traces = {name: scaled_trace(h, src_layers, L, new_tokens) for name, h in hists.items()}
    hf = random_hf_model(config)
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    del hf
    model, _ = _build(config.to_dict(), quantized_source(sd, L, dev))
    del sd
    model.compile_small_ops()
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    base = time_engine(model, prompt, new_tokens)["ms_per_token"]
    a = model.args
    draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size // 2, a.norm_eps, torch.arange(VOCAB_ROWS))
    with torch.no_grad():
        for n in ("o", "down"):
            getattr(draft, n).normal_(0, 0.02)
    _quantized_draft(model, draft, dev)
    draft.to(dev, torch.float16)
    draft.bind_rows(model.output.weight)
    first = next(iter(traces.values()))
    exit_hist = torch.bincount(torch.tensor(first) - 1, minlength=L).float()
    offline = auto_layers(exit_hist, call_cost=0.05)
    preds = ExitPredictors(list(range(L - 1))).to(dev)
    step = GraphStep(model, draft, preds, offline, prompt_tokens + 2 * new_tokens + 8)
    rows = []
    with torch.inference_mode():
        for e in sorted(set().union(*traces.values()) | {L}):
            step.capture(e)
        step.time(first[:16], prompt_tokens)  # warm
        full_machinery_ms = step.time([L] * new_tokens, prompt_tokens)
        for name, trace in traces.items():
            ms = step.time(trace, prompt_tokens)
            mean_layers = sum(trace) / len(trace)
            rows.append({"trace": name, "mean_layers": mean_layers, "ideal_speedup": L / mean_layers, "ms_per_token_exit": ms,
                         "speedup": base / ms, "speedup_vs_ideal": base / ms / (L / mean_layers)})
    result = {"label": "TRACE-DRIVEN: exit layers replayed from a histogram measured on the small model, scaled to 32 layers",
              "trace_kind": rows[0]["trace"],
              "device": torch.cuda.get_device_name(), "commit": _commit(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "trace_source": str(trace_json), "source_layers": src_layers, "num_layers": L, "new_tokens": new_tokens,
              **{k: v for k, v in rows[0].items() if k != "trace"}, "offline_layers": offline,
              "ms_per_token_no_exit": base, "ms_per_token_machinery_full_depth": full_machinery_ms,
              "overhead_fraction_at_full_depth": full_machinery_ms / base - 1, "rows": rows,
              "note": "one graph per exit layer; live decoding adds a host sync per predicted layer, not measured here"}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result
