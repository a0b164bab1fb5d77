"""`mpq bench e2e --early-exit`: TRACE-DRIVEN exit decoding on the 7B-shaped quantized engine (GPU).

Exits cannot be learned on random weights, so the exit layer of each token is replayed from the executed-layer
histogram measured on the real small model (`mpq eval --early-exit --json`), scaled from its layer count to 32.
Everything else is really computed per token: the draft head (its layer quantized like the model, its head over a
reduced vocabulary of 4096 rows in 4-bit), the features and predictor at every offline layer below the exit and at
the exit layer, the full LM head at the exit layer, and the KV filling of the skipped layers.

Graph-friendly formulation: one CUDA graph per exit layer e (1..32), each holding the whole step for that exit;
the replayed trace picks the graph. (In live decoding the predictor's decision would pick the next segment; that
costs a host sync per predicted layer, which this replay does not measure: it is stated in the output.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.dispatch import pdl_enabled
from kernels.draft_top4 import draft_top4
from mpq.errors import MpqError

VOCAB_ROWS = 4096  # the draft's reduced vocabulary here; smollm2-135m's artifact chose 721 tokens (docs/specee.md)
NEW_TOKENS = 256


def scaled_trace(hist: dict, src_layers: int, layers: int, n: int, seed: int = 0) -> list[int]:
    """n executed-layer counts drawn from hist {count: tokens} over src_layers, scaled to `layers`."""
    keys = sorted(int(k) for k in hist)
    w = torch.tensor([float(hist[str(k)] if str(k) in hist else hist[k]) for k in keys])
    draw = torch.multinomial(w / w.sum(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [max(1, min(layers, round(keys[i] * layers / src_layers))) for i in draw.tolist()]


def _run_draft_quantized(draft, dev):
    """The draft quantized as `mpq train-predictors` stores it (`DraftHead.quantize`: the layer data-free at the
    model's budget, the head's rows in 4-bit), run from draft.linears (its own eager path, which the live decoders
    run); the returned source builds the graph step's q/k/v and gate/up as the engine builds its own (stacked where
    their layouts agree)."""
    from mpq.runtime.model import WeightSource

    packed = draft.quantize(2.9)
    draft.use_quantized(packed, dev)
    return WeightSource({}, {n: packed[n] for n in ("q", "k", "v", "gate", "up")}, device=dev, dtype=torch.float16)


class GraphStep:
    """Static buffers and one captured decode step per (exit layer, fill or drop).

    The step mirrors `Transformer.forward` (residual adds fused into the next norm, each shared-input set stacked
    into one GEMV or its parts overlapped on side streams) and adds the exit machinery: the draft head on its own
    stream, overlapped with the first layers and joined before the first predictor; at each predicted layer one
    fused kernel for the features, the predictor and the next residual add + norm (`kernels.exit_predictor`); at
    the exit, the LM head; in fill mode, the skipped layers' K/V (`ExitDecoder.fill_kv`, spread over side
    streams). Every layer's attention and the draft's run the fused decode kernel, so the step builds no attention
    masks (the model's GPU kernels must be in: `compile_small_ops`)."""

    def __init__(self, model, draft, draft_source, preds, offline, max_len):
        from mpq.specee.decode import ExitDecoder

        if model.ops.decode_attention is None:
            raise MpqError("the exit bench needs the engine's GPU kernels (Transformer.compile_small_ops)")
        self.model, self.draft, self.preds, self.offline = model, draft, preds, offline
        self.dec = ExitDecoder(model, None, max_len, exits=False)
        dev, dt = model.device, model.dtype
        a = model.args
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # the draft's input: the last step's final hidden state, then this token's embedding (which the main stream
        # gathers once for both)
        self.fc_in = torch.zeros(2 * a.dim, dtype=dt, device=dev)
        self.probe = torch.zeros(64, dtype=torch.float32, device=dev)
        self.p_state = torch.zeros(4, dtype=torch.float32, device=dev)
        self.mlp = preds.kernel_tensors()
        self.dcache = torch.zeros(2, a.n_kv_heads, max_len, a.head_dim, dtype=dt, device=dev)
        self.d_counters = torch.zeros(a.n_kv_heads, dtype=torch.int32, device=dev)  # fused attention: per KV head
        self.d_qkv = draft_source.linears(["q", "k", "v"])
        self.d_gate_up = draft_source.linears(["gate", "up"])
        # high priority: the first predicted layer waits for the draft's tokens, so its kernels go first where both
        # streams have work (waiting for the draft: 2.0% of a step against 2.7% at normal priority, run 12)
        self.draft_stream = torch.cuda.Stream(dev, priority=-1)
        self.lm_w = model.output.weight
        self.d_top4 = torch.zeros(4, dtype=torch.long, device=dev)  # the draft's proposals and their LM-head rows
        self.d_rows = torch.zeros(4, a.dim, dtype=dt, device=dev)
        self.dropped = torch.zeros(a.n_layers, max_len, dtype=dt, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _draft(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The draft head's step at self.pos (cos/sin: the rotation there): LM-head rows [4, D] of its top-4
        tokens."""
        d = self.draft
        h = d.fused_layer(self.fc_in.view(1, 1, -1), self.pos, cos, sin, self.model.ops, self.d_counters,
                          qkv=self.d_qkv, gate_up=self.d_gate_up, cache=self.dcache)
        draft_top4(d.head_logits(h).view(-1), d.vocab, self.lm_w, self.d_top4, self.d_rows)
        return self.d_rows

    def step(self, e: int, fill: bool = True, draft: bool = True, predict: bool = True) -> None:
        """One decode step exiting after layer e (e = num_layers: full depth); draft/predict False leave those
        parts out (for the overhead split)."""
        from kernels.exit_predictor import exit_probability

        m, L, ops, eps = self.model, self.model.args.n_layers, self.model.ops, self.model.args.norm_eps
        main = torch.cuda.current_stream()
        pos, D = self.pos, m.args.dim
        cos, sin = m.rope_cos[pos], m.rope_sin[pos]
        torch.index_select(m.embed, 0, self.token, out=self.fc_in[D:].view(1, D))
        if draft:
            self.draft_stream.wait_stream(main)
            with torch.cuda.stream(self.draft_stream):
                rows = self._draft(cos, sin)
        else:
            rows = self.lm_w[:4]
        x, delta = self.fc_in[D:].view(1, 1, D), None
        joined = not draft  # the draft stream joins main once, before the first predictor reads its rows
        calls = ([i for i in self.offline if i < e - 1] + ([e - 1] if e < L else [])) if predict else []
        normed = None  # (x, h) of the next norm, where a predictor computed it
        for i, layer in enumerate(m.layers[:e]):
            x, h = normed or ops.add_rms_norm(x, delta, layer.attn_norm, eps)
            normed = None
            # the fused decode attention applies the causal mask (and in drop mode the layer's skipped positions)
            delta = layer.attention(h, pos, cos, sin, None, ops, causal_prefix=True,
                                    dropped=None if fill else self.dropped[i])
            x, h = ops.add_rms_norm(x, delta, layer.mlp_norm, eps)
            delta = layer.mlp(h, ops)
            if i in calls:
                if not joined:
                    main.wait_stream(self.draft_stream)
                    joined = True
                # a programmatic dependent, as the step's kernels; it also does the next add + norm (the next
                # layer's, or the final norm where it is the exit layer)
                nxt_norm = m.layers[i + 1].attn_norm if i + 1 < e else m.norm
                x, h = exit_probability(x.view(-1), m.norm, eps, rows, self.p_state, self.probe, i, self.mlp,
                                        self.preds.slot[i], first=i == calls[0], delta=delta.view(-1),
                                        pdl=pdl_enabled(m.device), next_norm=nxt_norm)
                normed = x.view(1, 1, -1), h.view(1, 1, -1)
        if not joined:
            main.wait_stream(self.draft_stream)
        x, hn = normed or ops.add_rms_norm(x, delta, m.norm, eps)
        if e < L and fill:  # forked before the LM head, so the skipped layers' K/V overlap it
            self.dec.fill_kv(x, pos, e, join=False)
        elif e < L:
            self.dropped[e:].index_fill_(1, pos, float("-inf"))
        nxt = m.output(hn.view(1, -1)).argmax(-1)
        if e < L and fill:
            self.dec.join_fill()
        self.fc_in[:D].copy_(hn.view(-1))
        self.token.copy_(nxt.view(1))
        self.pos.add_(1)

    def capture(self, e: int, **parts) -> None:
        saved = self.token.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(e, **parts)
                self.token.copy_(saved[0])
                self.pos.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.step(e, **parts)
        self.pool = g.pool()
        self.graphs[(e, tuple(sorted(parts.items())))] = g
        self.token.copy_(saved[0])
        self.pos.copy_(saved[1])

    def time(self, trace: list[int], start: int, reps: int = 3, **parts) -> float:
        """ms per token replaying one graph per token of the trace from position start (median of reps)."""
        key = tuple(sorted(parts.items()))
        times = []
        for _ in range(reps):
            self.pos.fill_(start)
            self.dropped.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for e in trace:
                self.graphs[(e, key)].replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / len(trace))
        self.pos.fill_(start)  # so that a later capture stays inside the cache
        return sorted(times)[len(times) // 2]


def _time_live_decoding(model, draft, preds, offline: list[int], prompt: list[int], trace: list[int],
                        tokens: int = 32, graph_tokens: int = 64) -> dict:
    """ms/token of the live exit decoders on this engine. Eager (`ExitDecoder`, a Python launch per kernel):
    at full depth and with exits on (random predictors and draft, so its exits are rare). From CUDA-graph pieces
    (`GraphExitDecoder`, a host decision per predicted layer): at full depth, and replaying `trace` (the predictors,
    their reads and the exit heads really run; the exit layer comes from the trace) in fill and drop mode, each
    timed on a second run after a first that captured its pieces. As one graph a token (`FlagExitDecoder`, what
    `mpq run` uses on CUDA): a trace without exits and `trace`, fill and drop, with device branches (the default)
    and without (*_flat). Run last: it re-allocates the
    model's caches that the captured graphs use."""
    from mpq.specee.bundle import SpecEE
    from mpq.specee.decode import ExitDecoder
    from mpq.specee.flag_decode import BRANCH_EVERY, FlagExitDecoder
    from mpq.specee.graph_decode import GraphExitDecoder

    out = {}
    for name, exits in (("full_depth", False), ("exits_on", True)):
        dec = ExitDecoder(model, SpecEE(draft, preds, offline, {}) if exits else None, len(prompt) + tokens + 1,
                          exits=exits, auto_fallback=False)
        dec.generate(prompt, 4)  # warm
        _, st, _ = dec.generate(prompt, tokens)
        out[name] = st.decode_ms / max(st.tokens, 1)
        out[f"{name}_mean_layers"] = st.layers / max(st.tokens, 1)
    graph, flag = {}, {}
    for name, exits, mode in (("full_depth", False, "fill"), ("trace_fill", True, "fill"),
                              ("trace_drop", True, "drop")):
        dec = GraphExitDecoder(model, SpecEE(draft, preds, offline, {}),
                               len(prompt) + graph_tokens + 1, mode=mode, exits=exits, auto_fallback=False,
                               trace=trace)
        dec.generate(prompt, graph_tokens)  # captures every piece this run needs
        _, st, _ = dec.generate(prompt, graph_tokens)
        graph[name] = st.decode_ms / max(st.tokens, 1)
        graph[f"{name}_mean_layers"] = st.layers / max(st.tokens, 1)
        graph[f"{name}_graphs"] = len(dec.graphs)
        del dec
    L, decoded = model.args.n_layers, {}
    every = BRANCH_EVERY
    for name, mode, replay, branches in (("no_exit_no_predictors", "fill", [L], 0),
                                         ("no_exit_trace_flat", "fill", [L], 0), ("trace_fill_flat", "fill", trace, 0),
                                         ("trace_drop_flat", "drop", trace, 0), ("no_exit_trace", "fill", [L], every),
                                         ("trace_fill", "fill", trace, every), ("trace_drop", "drop", trace, every)):
        dec = FlagExitDecoder(model, SpecEE(draft, preds, offline, {}), len(prompt) + graph_tokens + 1, mode=mode,
                              auto_fallback=False, trace=replay, branches=branches)
        if name == "no_exit_no_predictors":  # the step's own cost: draft, exit flags, copies; no predictor or head
            dec.candidates = []
        dec.generate(prompt, 4)  # captures the step
        tokens, st, _ = dec.generate(prompt, graph_tokens)
        flag[name] = st.decode_ms / max(st.tokens, 1)
        decoded[name] = tokens
        if branches:  # the branched step must decode what the unbranched one does
            flag[f"{name}_same_tokens"] = tokens == decoded[f"{name}_flat"]
        flag[f"{name}_mean_layers"] = st.layers / max(st.tokens, 1)
        flag[f"{name}_predictor_calls_per_token"] = st.predictor_calls / max(st.tokens, 1)
        del dec
    out["graph"], out["flag"] = graph, flag
    return out


@dataclass
class ExitBench:
    """What the trace-driven bench builds before it times anything: the random-weight 7B engine (quantized,
    GPU kernels in), its no-exit ms/token, the scaled traces, the draft head and predictors, the step."""
    model: object
    prompt: list[int]
    base_ms: float
    traces: dict[str, list[int]]
    src_layers: int
    draft: object
    preds: object
    exit_hist: torch.Tensor
    step: GraphStep


def build_exit_bench(trace_json: Path, prompt_tokens: int = 128, new_tokens: int = NEW_TOKENS,
                     draft_vocab: int = VOCAB_ROWS) -> ExitBench:
    if not torch.cuda.is_available():
        raise MpqError("mpq bench e2e --early-exit needs a CUDA GPU")
    from transformers import LlamaConfig

    from mpq.bench.e2e import LLAMA2_7B, _build, quantized_source, random_hf_model, time_engine
    from mpq.runtime.generate import cache_length
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
    if not 4 <= draft_vocab <= config.vocab_size:
        raise MpqError(f"--draft-vocab must be between 4 and the vocabulary size ({config.vocab_size}), not {draft_vocab}")
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
    draft = DraftHead(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size // 4, a.norm_eps,
                      torch.arange(draft_vocab))
    with torch.no_grad():
        for n in ("o", "down"):
            getattr(draft, n).normal_(0, 0.02)
    draft.bind_rows(model.output.weight)  # its rows gathered on the device (`quantize` copies them to the CPU)
    draft_source = _run_draft_quantized(draft, dev)
    draft.to(dev, torch.float16)
    draft.bind_rows(model.output.weight)
    first = next(iter(traces.values()))
    exit_hist = torch.bincount(torch.tensor(first) - 1, minlength=L).float()
    preds = ExitPredictors(list(range(L - 1))).to(dev)
    # the engine's own cache length: SDPA's cost grows with it, so base and exits share it
    step = GraphStep(model, draft, draft_source, preds, auto_layers(exit_hist, call_cost=0.05),
                     cache_length(model, prompt_tokens + new_tokens))
    return ExitBench(model, prompt, base, traces, src_layers, draft, preds, exit_hist, step)


def bench_early_exit(trace_json: Path, json_out: Path | None = None, prompt_tokens: int = 128,
                     new_tokens: int = NEW_TOKENS, draft_vocab: int = VOCAB_ROWS) -> dict:
    from mpq.specee.flag_decode import BRANCH_EVERY
    from mpq.specee.schedule import auto_layers
    from mpq.versions import environment

    bench = build_exit_bench(trace_json, prompt_tokens, new_tokens, draft_vocab)
    model, prompt, base, traces, step = bench.model, bench.prompt, bench.base_ms, bench.traces, bench.step
    draft, preds, exit_hist, src_layers = bench.draft, bench.preds, bench.exit_hist, bench.src_layers
    L = model.args.n_layers
    first = next(iter(traces.values()))
    rows = []
    variants = {"fill": {"fill": True, "draft": True, "predict": True}, "drop": {"fill": False, "draft": True, "predict": True}}
    parts = {"loop": {"fill": True, "draft": False, "predict": False}, "draft": {"fill": True, "draft": True, "predict": False},
             "predictors": {"fill": True, "draft": False, "predict": True}}

    def full_depth(part: dict) -> float:
        return step.time([L] * new_tokens, prompt_tokens, **part)

    with torch.inference_mode():
        # the offline schedule is chosen with the predictor call cost measured here, in decoder-layer units
        for v in (parts["loop"], parts["predictors"]):
            step.capture(L, **v)
        full_depth(parts["loop"])  # warm
        loop_ms, pred_ms = full_depth(parts["loop"]), full_depth(parts["predictors"])
        call_cost = max(pred_ms - loop_ms, 0.0) / len(step.offline) / (loop_ms / L)
        step.offline = auto_layers(exit_hist, call_cost=call_cost)
        step.graphs.clear()
        step.pool = None
        for e in sorted(set().union(*traces.values()) | {L}):
            for v in variants.values():
                step.capture(e, **v)
        for v in parts.values():
            step.capture(L, **v)
        step.time(first[:16], prompt_tokens, **variants["fill"])  # warm
        full = {"loop_only": full_depth(parts["loop"]), "loop_and_draft": full_depth(parts["draft"]),
                "loop_and_predictors": full_depth(parts["predictors"]), "loop_draft_predictors": full_depth(variants["fill"])}
        for name, trace in traces.items():
            mean_layers = sum(trace) / len(trace)
            for mode, v in variants.items():
                ms = step.time(trace, prompt_tokens, **v)
                rows.append({"trace": name, "mode": mode, "mean_layers": mean_layers, "ideal_speedup": L / mean_layers,
                             "ms_per_token_exit": ms, "speedup": base / ms, "speedup_vs_ideal": base / ms / (L / mean_layers)})
    live = _time_live_decoding(model, draft, preds, step.offline, prompt, first)  # the trace in the rows' order
    g, f = live.pop("graph"), live.pop("flag")  # reported once each, beside the trace rows
    live_rows = {"live_graph_ms_per_token": g, "live_graph_speedup_vs_engine": {
        k: base / g[k] for k in ("full_depth", "trace_fill", "trace_drop")},
        "live_one_graph_ms_per_token": f, "live_one_graph_speedup_vs_engine": {
            k: base / f[k] for k in f if not k.endswith(("_mean_layers", "_per_token", "_same_tokens"))}}
    full_machinery_ms = full["loop_draft_predictors"]
    # draft: overlapped with the whole step; predictors: with the LM-head rows of 4 fixed tokens; the wait is what
    # the first predicted layer spends waiting for the draft's tokens
    split = {"draft": (full["loop_and_draft"] - full["loop_only"]) / base,
             "predictors": (full["loop_and_predictors"] - full["loop_only"]) / base,
             "draft_wait": (full["loop_draft_predictors"] - full["loop_and_predictors"] - full["loop_and_draft"]
                            + full["loop_only"]) / base,
             "loop_vs_engine": full["loop_only"] / base - 1}
    result = {"label": "TRACE-DRIVEN: exit layers replayed from a histogram measured on the small model, scaled to 32 layers",
              "trace_kind": rows[0]["trace"], **environment(),
              "trace_source": str(trace_json), "source_layers": src_layers, "num_layers": L, "new_tokens": new_tokens,
              "draft_vocab": draft_vocab,
              **{k: v for k, v in rows[0].items() if k != "trace"}, "offline_layers": step.offline,
              "predictor_call_cost_layers": call_cost,
              "ms_per_token_no_exit": base, "ms_per_token_machinery_full_depth": full_machinery_ms,
              "overhead_fraction_at_full_depth": full_machinery_ms / base - 1, "overhead_split_at_full_depth": split,
              "ms_per_token_full_depth": full, "rows": rows, "live_eager_ms_per_token": live, **live_rows,
              "note": "one graph per (exit layer, mode); live_eager_ms_per_token: the live exit decoder (a host decision "
                      "per predicted layer, no CUDA graph) on the same engine, at full depth and with exits on (random "
                      "predictors and draft, so its exits are rare); live_graph_ms_per_token: the live decoder from "
                      "CUDA graphs (mpq.specee.graph_decode, a host decision per predicted layer between graph replays) "
                      "at full depth and replaying the trace's first 64 exit layers; live_one_graph_ms_per_token: the "
                      "live decoder whose step is one CUDA graph with the exit decision on the device "
                      "(mpq.specee.flag_decode), without exits and without any predictor or exit-head kernel in the "
                      "graph (no_exit_no_predictors), replaying a trace without exits (the predictors run, none fires) and "
                      "the trace's first 64 exit layers, with the rest of the step in a device branch every "
                      f"{BRANCH_EVERY} layers (graph IF nodes, mpq.runtime.graph_if; *_same_tokens: it decodes what the "
                      "*_flat rows, without branches, decode); KV filling cost is inside the fill rows (the drop rows "
                      "have none)"}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result
