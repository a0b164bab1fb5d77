"""Exit-aware decoding on the engine's Transformer (SpecEE): draft top-4, then layer by layer, at the scheduled
layers, the 12 features and the predictor; on a predicted exit the full LM head at that layer, taken only if its
argmax is one of the draft tokens.

The skipped layers' KV at the exit position is filled from the exit hidden state (each skipped layer's k/v
projection of its own attention norm of that state, all layers in one batched matmul where the weights are dense),
so later tokens attend to a complete cache. `mode="drop"` is the paper's behaviour instead: those positions are
masked out of the skipped layers' attention.

The layer loop calls the engine's own Block pieces (norm weights, attention with its KV cache, MLP), in the
order Transformer.forward does, so at full depth it reproduces the engine's logits. On the host the decision at
each scheduled layer is a sync; on CPU that is free, on the GPU it follows one fused kernel per predicted layer
(the graph-captured formulation is in mpq/specee/bench.py).

Automatic fallback: every `window` tokens the decoder compares the time its exits saved (skipped layers times the
measured time per layer) with the time the machinery cost (draft head, features + predictors, rejected
verifications, KV filling); when the machinery costs more, it decodes the rest at full depth and says so.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpq.errors import MpqError
from mpq.quant.format import stack_biases
from mpq.runtime.model import FusedLinear, SmallOps, SplitLinears, Transformer, rope_inv_freq
from mpq.runtime.quant_linear import QuantLinear
from mpq.specee.bundle import SpecEE
from mpq.specee.draft import _rotate, rope_tables
from mpq.specee.features import final_norm, fold_norm
from mpq.specee.schedule import OnlineSchedule

MODES = ("fill", "drop")
FILL_STREAMS = 4  # side streams for the KV fill of skipped quantized layers on the GPU
PARTS = ("draft", "predict", "verify_rejected", "fill")


@dataclass
class ExitStats:
    num_layers: int
    tokens: int = 0
    layers: int = 0  # executed decoder layers, summed over tokens
    exits: Counter = field(default_factory=Counter)  # executed layers per token -> count
    predictor_calls: int = 0
    verifications: int = 0
    rejections: int = 0
    ms: dict = field(default_factory=lambda: {p: 0.0 for p in (*PARTS, "layers", "verify_accepted", "head")})
    fallback: str | None = None
    handed_over: bool = False  # at the fallback, the rest was left to the engine's decode loop
    prefill_ms: float = 0.0
    decode_ms: float = 0.0  # wall time of the decode steps
    proposals: list = field(default_factory=list)  # the draft's top-4 (a set) at each decode step with exits on

    def record(self, executed: int, steps: int = 1) -> None:
        """Count `steps` decoded tokens that each ran `executed` layers."""
        self.tokens += steps
        self.layers += executed * steps
        self.exits[executed] += steps

    @property
    def mean_layers(self) -> float:
        return self.layers / self.tokens if self.tokens else float("nan")

    def overhead_ms_per_token(self) -> dict:
        n = max(self.tokens, 1)
        return {p: self.ms[p] / n for p in PARTS}

    def to_dict(self) -> dict:
        return {"mean_layers": self.mean_layers, "num_layers": self.num_layers, "tokens": self.tokens,
                "exit_histogram": {str(k): v for k, v in sorted(self.exits.items())},
                "predictor_calls": self.predictor_calls, "predictor_calls_per_token": self.predictor_calls / max(self.tokens, 1),
                "verifications": self.verifications, "verification_rejections": self.rejections,
                "overhead_ms_per_token": self.overhead_ms_per_token(), "fallback": self.fallback,
                "decode_ms_per_token": self.decode_ms / max(self.tokens, 1)}


def lm_head_weight(model: Transformer) -> torch.Tensor:
    out = model.output
    return out.weight if hasattr(out, "weight") else out.dequantized_weight(model.dtype)


def kv_projection(layer, dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Dense [2*kv_dim, D] k/v weights (and bias) of a Block, or None when they are quantized on the GPU."""
    kvq = layer.kvq
    if isinstance(kvq, FusedLinear):  # float: k and v are the leading rows
        rows = sum(kvq.splits[:2])
        return kvq.weight[:rows], None if kvq.bias is None else kvq.bias[:rows]
    lead = kvq.leading(2)
    if any(isinstance(m, QuantLinear) and m.q2.is_cuda for m in lead.modules()):
        return None
    parts = list(lead.parts) if isinstance(lead, SplitLinears) else [lead]
    ws = [p.weight if hasattr(p, "weight") else p.dequantized_weight(dtype) for p in parts]
    bs = [p.bias for p in parts]
    return torch.cat(ws), stack_biases(bs, [w.shape[0] for w in ws], ws[0])


class ExitDecoder:
    """Greedy (or sampled) decoding of one sequence with exits; owns the model's caches while it runs."""

    def __init__(self, model: Transformer, specee: SpecEE | None, max_seq_len: int, mode: str = "fill",
                 exits: bool = True, auto_fallback: bool = True, window: int = 16, threshold: float | None = None):
        if mode not in MODES:
            raise MpqError(f"unknown exit mode '{mode}' ({' | '.join(MODES)})")
        if exits and specee is None:
            raise MpqError("exit-aware decoding needs predictors (mpq train-predictors)")
        self.model, self.sp, self.mode, self.exits_on = model, specee, mode, exits
        self.auto_fallback, self.window, self.threshold = auto_fallback, window, threshold
        a = model.args
        self.L, self.eps = a.n_layers, a.norm_eps
        self.max_seq_len = max_seq_len
        model.setup_caches(max_seq_len)
        dev, dt = model.device, model.dtype
        self.lm_w = lm_head_weight(model)
        if specee is not None:
            specee.draft.to(device=dev, dtype=dt)
            specee.predictors.to(device=dev, dtype=torch.float32)
            specee.draft.bind_rows(self.lm_w)
            if dev.type == "cuda" and specee.quantized_draft:  # on the GPU the draft costs its bytes
                specee.draft.use_quantized(specee.quantized_draft, dev)
            specee.draft.setup_cache(max_seq_len, dev, dt)
            cos, sin = rope_tables(rope_inv_freq(a), max_seq_len)
            self.d_cos, self.d_sin = cos.to(dev, dt), sin.to(dev, dt)
            self.thresholds = {layer: float(specee.predictors.threshold[s]) if threshold is None else threshold
                               for layer, s in specee.predictors.slot.items()}
            self.mlp = specee.predictors.kernel_tensors()
            self.p_state = torch.zeros(4, dtype=torch.float32, device=dev)
            self.prob_out = torch.zeros(1, dtype=torch.float32, device=dev)
        self.fused = specee is not None and dev.type == "cuda"  # one Triton launch per predicted layer
        self.p_prev: torch.Tensor | None = None  # CPU path: the previous evaluated layer's softmax
        self.rows_w: torch.Tensor | None = None  # CPU path: the draft rows times the final norm's weight
        self._stack_kv()
        self.fill_streams: list[torch.cuda.Stream] = []
        self.dropped = torch.zeros(self.L, max_seq_len, dtype=dt, device=dev) if mode == "drop" else None

    def _stack_kv(self) -> None:
        projs = [kv_projection(layer, self.model.dtype) for layer in self.model.layers]
        self.kv_w = None if any(p is None for p in projs) else torch.stack([p[0] for p in projs])
        self.kv_b = None if self.kv_w is None or projs[0][1] is None else torch.stack([p[1] for p in projs])
        self.attn_norms = torch.stack([layer.attn_norm for layer in self.model.layers])
        # GPU, quantized: each layer's k and v linears as one module (a prefix of its stacked weights where stacked)
        self.kv_linears = [layer.kvq.leading(2) for layer in self.model.layers] if self.kv_w is None else []

    # ---- the engine's layer, piece by piece --------------------------------------------------------------
    def run_layer(self, i: int, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, ops: SmallOps) -> torch.Tensor:
        return self.run_layers(i, i + 1, x, pos, mask, ops)

    def run_layers(self, first: int, end: int, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, ops: SmallOps,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [first, end) on residual x: their output residual, written into `out` if given (a buffer a CUDA
        graph keeps). The engine's own layer loop (`Transformer.blocks`), with drop mode's masks."""
        cos, sin = self.model.rope_cos[pos], self.model.rope_sin[pos]
        x, delta = self.model.blocks(x, None, first, end, pos, cos, sin, mask, ops, self.dropped)
        return torch.add(x, delta, out=out)

    def fill_kv(self, x: torch.Tensor, pos: torch.Tensor, first: int, join: bool = True) -> None:
        """K/V of layers [first, L) at position pos, computed from the exit residual x [1, 1, D]. On the GPU with
        quantized layers, join=False leaves the fill running on its side streams until `join_fill`."""
        if first >= self.L:
            return
        a = self.model.args
        h = x.reshape(1, -1).float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        hs = self.attn_norms[first:] * h  # [n, D]: each skipped layer's own attention norm
        if self.kv_w is not None:
            kv = torch.bmm(self.kv_w[first:], hs.unsqueeze(-1)).squeeze(-1)
            if self.kv_b is not None:
                kv = kv + self.kv_b[first:]
        else:
            self._fill_quantized(hs, pos, first)
            if join:
                self.join_fill()
            return
        n, kvd = kv.shape[0], a.n_kv_heads * a.head_dim
        k = kv[:, :kvd].view(n, 1, a.n_kv_heads, a.head_dim)
        v = kv[:, kvd:].view(n, 1, a.n_kv_heads, a.head_dim)
        k = _rotate(k, self.model.rope_cos[pos], self.model.rope_sin[pos])
        for j, layer in enumerate(self.model.layers[first:]):
            layer.kv_cache.update(pos, torch.stack((k[j], v[j]))[:, None])

    def _fill_quantized(self, hs: torch.Tensor, pos: torch.Tensor, first: int) -> None:
        """GPU, quantized k/v: each skipped layer's own k and v GEMVs and RoPE, the layers spread over side streams
        forked from the current one (joined by `join_fill`) so that the small GEMVs overlap."""
        a, model = self.model.args, self.model
        if not self.fill_streams:
            self.fill_streams = [torch.cuda.Stream(hs.device) for _ in range(FILL_STREAMS)]
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        main = torch.cuda.current_stream(hs.device)
        for side in self.fill_streams:
            side.wait_stream(main)
            for t in (hs, cos, sin):  # made on the current stream, read on the side ones (possibly after return)
                t.record_stream(side)
        for j, layer in enumerate(model.layers[first:]):
            with torch.cuda.stream(self.fill_streams[j % FILL_STREAMS]):
                k, v = self.kv_linears[first + j](hs[j:j + 1])
                k, v = k.view(1, 1, a.n_kv_heads, a.head_dim), v.view(1, 1, a.n_kv_heads, a.head_dim)
                model.ops.rope_write(k, k, v, cos, sin, layer.kv_cache.kv, pos)  # the layer's own cache write

    def join_fill(self) -> None:
        """Make the current stream wait for the KV fill's side streams."""
        main = torch.cuda.current_stream()
        for side in self.fill_streams:
            main.wait_stream(side)

    # ---- one sequence -----------------------------------------------------------------------------------
    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full depth over the prompt; returns (last-position logits [V], normed final hidden rows [S, D])."""
        dev = self.model.device
        S = len(prompt)
        tokens = torch.tensor([prompt], device=dev)
        pos = torch.arange(S, device=dev)
        mask = self.model.causal[pos].view(1, 1, S, self.max_seq_len)
        x = F.embedding(tokens, self.model.embed)
        for i in range(self.L):
            x = self.run_layer(i, x, pos, mask, SmallOps())
        hn = final_norm(x[0], self.model.norm, self.eps)
        if self.sp is not None and S > 1:
            self.sp.draft.step(hn[:-1], self.model.embed[tokens[0, 1:]], 0, self.d_cos, self.d_sin)
        return self.model.output(hn[-1]), hn

    def exit_prob(self, layer: int, x: torch.Tensor, rows: torch.Tensor, first: bool) -> float:
        """The exit probability at `layer` for residual x, the draft tokens' LM-head rows [4, D]; `first` marks the
        first evaluated layer of the token (the softmax change is measured from the previous call otherwise). On
        CUDA one fused kernel (kernels/exit_predictor.py), elsewhere the features and MLP in folded form (the norm
        weight in the rows, the standardisation in the first layer), a dozen fewer small ops."""
        if self.fused:
            self.launch_exit_prob(layer, x, rows, first)
            return float(self.prob_out[0])
        if first:
            self.rows_w = fold_norm(rows, self.model.norm)
        prob, self.p_prev = self.sp.predictors.prob_from_hidden(layer, x, self.rows_w, self.eps,
                                                                None if first else self.p_prev)
        return prob

    def launch_exit_prob(self, layer: int, x: torch.Tensor, rows: torch.Tensor, first: bool) -> None:
        """CUDA: queue the fused kernel that writes `exit_prob`'s value into self.prob_out[0] (no host read, so a
        CUDA graph can hold it)."""
        from kernels.exit_predictor import exit_probability

        exit_probability(x.view(-1), self.model.norm, self.eps, rows, self.p_state, self.prob_out, 0, self.mlp,
                         self.sp.predictors.slot[layer], first=first)

    def _timed(self, part: str, t0: float) -> float:
        t = time.perf_counter()
        self.stats.ms[part] += 1000 * (t - t0)
        return t

    def step(self, token: int, t: int, h_prev: torch.Tensor, exits: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decode x_t at position t. Returns (logits [V] used for the next token, normed hidden [D], executed layers)."""
        model, st = self.model, self.stats
        dev = model.device
        emb = model.embed[token]
        t0 = time.perf_counter()
        if exits:
            top4 = self.sp.draft.propose(self.sp.draft.step(h_prev[None], emb[None], t - 1, self.d_cos, self.d_sin))
            rows = self.lm_w[top4]
            top4_set = set(top4.tolist())
            st.proposals.append(top4_set)
            sched = self.online.layers()
            t0 = self._timed("draft", t0)
        pos = torch.tensor([t], device=dev)
        mask = model.causal[pos].view(1, 1, 1, self.max_seq_len)
        x, first, ops = emb.view(1, 1, -1), True, model.ops
        for i in range(self.L - 1):
            x = self.run_layer(i, x, pos, mask, ops)
            if not exits or i not in sched:
                continue
            t0 = self._timed("layers", t0)
            fire = self.exit_prob(i, x, rows, first) > self.thresholds[i]
            first = False
            st.predictor_calls += 1
            t0 = self._timed("predict", t0)
            if not fire:
                continue
            hn = final_norm(x.view(-1), model.norm, self.eps)
            logits = model.output(hn)
            st.verifications += 1
            if int(logits.argmax()) in top4_set:
                t0 = self._timed("verify_accepted", t0)
                self.online.record_exit(i)
                if self.mode == "fill":
                    self.fill_kv(x, pos, i + 1)
                else:
                    self.dropped[i + 1:, t] = float("-inf")
                self._timed("fill", t0)
                return logits, hn, i + 1
            st.rejections += 1
            t0 = self._timed("verify_rejected", t0)
        x = self.run_layer(self.L - 1, x, pos, mask, ops)
        t0 = self._timed("layers", t0)
        hn = final_norm(x.view(-1), model.norm, self.eps)
        logits = model.output(hn)
        self._timed("head", t0)
        if exits:
            self.online.record_exit(self.L - 1)
        return logits, hn, self.L

    def _greedy(self, logits: torch.Tensor) -> int:
        """The greedy token of a step's output (logits here; a decoder whose step returns the token overrides it)."""
        return int(logits.argmax())

    def _check_fallback(self) -> bool:
        """True when exits should be turned off: over the tokens so far they cost more time than they saved."""
        st = self.stats
        if not self.auto_fallback or st.tokens < self.window or st.tokens % self.window:
            return False
        per_layer = st.ms["layers"] / max(st.layers, 1)
        saved = (st.tokens * self.L - st.layers) * per_layer
        cost = sum(st.ms[p] for p in PARTS)
        if cost < saved:
            return False
        st.fallback = (f"exits do not pay here: over {st.tokens} tokens they saved {saved:.1f} ms and cost {cost:.1f} ms; "
                       "decoding the rest at full depth")
        return True

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, force: list[int] | None = None,
                 eos_ids: set[int] = frozenset(), targets: list[int] | None = None,
                 on_token=None, hand_over: bool = False) -> tuple[list[int], ExitStats, list[float]]:
        """Greedy continuation of prompt. With `force`, the fed tokens are force[k] (teacher forcing) while the
        returned tokens are the decoder's own predictions. With `targets`, also returns -log p(target) per step.
        `hand_over`: at the fallback, stop and return the tokens so far plus the next one, not yet passed to
        on_token (stats.handed_over), for the engine's own decode loop to go on from (`Generator.resume`)."""
        S = len(prompt)
        if hand_over and (force is not None or targets is not None or self.mode != "fill"):
            raise MpqError("only free-running greedy decoding in fill mode can hand over to the engine")
        if S + max_new_tokens > self.max_seq_len:
            raise MpqError(f"prompt ({S}) + {max_new_tokens} new tokens exceed the cache of {self.max_seq_len}")
        self.stats = ExitStats(self.L)
        if self.sp is not None:
            self.online = OnlineSchedule(self.sp.offline, self.sp.predictors.layers)
        if self.dropped is not None:
            self.dropped.zero_()
        t0 = time.perf_counter()
        logits, hn = self._prefill(prompt)
        h_prev = hn[-1]
        tok = self._greedy(logits)  # the first token is the prefill's, as the engine's Generator times it
        t1 = time.perf_counter()
        self.stats.prefill_ms = 1000 * (t1 - t0)
        out, nll = [], []
        exits = self.exits_on
        for k in range(max_new_tokens):
            if k:
                tok = self._greedy(logits)
            out.append(tok)
            if on_token is not None:
                on_token([tok])
            if targets is not None:
                nll.append(float(-torch.log_softmax(logits.float(), -1)[targets[k]]))
            if tok in eos_ids and force is None or k == max_new_tokens - 1:
                break
            fed = tok if force is None else force[k]
            logits, h_prev, n = self.step(fed, S + k, h_prev, exits)
            self.stats.record(n)
            if exits and self._check_fallback():
                exits = False
                if hand_over:
                    out.append(self._greedy(logits))
                    self.stats.handed_over = True
                    break
        self.stats.decode_ms = 1000 * (time.perf_counter() - t1)
        return out, self.stats, nll


def run_with_exits(engine, spec: str, prompt: list[int], max_new_tokens: int, sampling, eos: set[int], on_tokens,
                   generator):
    """`mpq run` with exits: (Generation, stats dict), or None where the artifact has no predictors, or (None,
    {"used": False, "reason": ...}) where it has them but leaves decoding to the engine, which it also says on
    stderr. Exits are defined for greedy decoding, so sampling leaves decoding to the engine. Where the decoder
    falls back, the engine's `generator` decodes the rest in the same caches (its one graph a step replayed in
    chunks, no host turnaround per token; the exit decoder's own full-depth step was 16% slower on SmolLM2 on the
    H100), and the stats count those tokens at full depth. On CUDA the live exit
    decoder is one CUDA graph per token with the exit decision on the device and device branches
    (`FlagExitDecoder`): on the H100's 7B shape, replaying the measured exit trace (21.7 of 32 layers), it took 1.92
    (fill) / 1.80 (drop) ms/token against the engine's one-graph step at 2.06 (flag-branches-h100-2026-11-27.json),
    1.93 / 1.82 against 1.99 over 64 tokens (specee-e2e-h100-v31.json).
    Where exits do not pay (SmolLM2 on the GPU: its step is 0.8 ms, launches more than weights), the decoder falls
    back within its first window, hands the rest to the engine's loop and says so."""
    import sys
    from pathlib import Path

    from mpq.runtime.generate import Generation
    from mpq.specee.bundle import has_specee, load_specee
    from mpq.specee.flag_decode import FlagExitDecoder

    if engine.kind != "artifact" or not has_specee(Path(spec)):
        return None
    cuda = engine.model.device.type == "cuda"
    if sampling.temperature > 0:
        reason = "exit-aware decoding is greedy-only; sampling at full depth"
        print(f"note: {reason}", file=sys.stderr)
        return None, {"used": False, "reason": reason}
    cls = FlagExitDecoder if cuda else ExitDecoder
    dec = cls(engine.model, load_specee(Path(spec), engine.config), len(prompt) + max_new_tokens + 1)
    out, st, _ = dec.generate(prompt, max_new_tokens, eos_ids=eos, on_token=on_tokens, hand_over=True)
    if st.fallback:
        print(f"note: {st.fallback}", file=sys.stderr)
    if st.handed_over:
        rest = generator.resume(len(prompt), out, max_new_tokens, eos, on_tokens)
        out = rest.tokens
        st.record(st.num_layers, rest.decode_steps)
        st.decode_ms += rest.decode_ms
    gen = Generation(out, len(prompt), st.prefill_ms, st.decode_ms, st.tokens, stopped_on_eos=bool(out) and out[-1] in eos)
    return gen, {"used": True, **st.to_dict()}
