"""Live exit-aware decoding as one CUDA graph per token: the exit decision stays on the device.

`GraphExitDecoder` replays a piece per predicted layer and lets the host choose the next one; on the lent VM each
replay costs the host ~45 us and the GPU idles at every turnaround, so live exits lost to the engine's one-graph
step (1.2x slower, `specee-e2e-h200-v20.json`). Here the whole step is one graph holding every layer's kernels,
and the decision travels through a control block in device memory (`kernels.exit_flag`):

- after each layer that may carry a predictor, the fused predictor kernel (features, MLP, and the next layer's
  residual add + norm) runs if the host marked the layer active for this token, and asks for a verification
  where its probability passes the layer's threshold;
- the exit head after it (`kernels.exit_head`: final norm, LM head, argmax) runs only when asked; it accepts
  when the argmax is one of the draft's 4 and then sets the exit flag;
- every later kernel reads the flag after its PDL wait and does no work: a skipped layer costs its launches,
  not its weights. In fill mode a skipped layer still runs its attention norm (on the unchanged exit residual),
  the k and v rows of its projection and the cache write, which is the KV fill; in drop mode its attention
  kernel masks the position out of that layer instead;
- every `branches` layers the rest of the step is a device branch (two graph IF nodes, `mpq.runtime.graph_if`):
  after an exit its layers are not launched at all, only their KV fill (or the drop mask). A skipped layer's
  launches cost half a layer; an IF level ~12 us. On the H100's 7B shape, replaying the measured exit trace, one
  every 8 layers was fastest (`flag-branches-h100-2026-11-27.json`: 1.92 ms/token in fill mode against 2.09
  without branches and the engine's 2.06);
- the final exit head runs unless the step exited.

The host writes the control block (the fed token, the active layers from the online schedule, a forced exit
when replaying a trace) and the position into pinned memory, replays the graph, and reads the token, the
executed layers and the counters back: one replay and one sync per token, as the engine's own decode loop.

Tokens, exits, counters, proposals and KV caches equal `ExitDecoder`'s (tests/specee/test_flag_decode.py: the step
run eagerly under the Triton interpreter on the CPU, captured and replayed on CUDA).
"""

from __future__ import annotations

import torch

from kernels.dispatch import pdl_enabled
from kernels.draft_top4 import draft_top4
from kernels.exit_flag import (CTL_ACTIVE, CTL_EVALUATED, CTL_EXECUTED, CTL_FORCED, CTL_REJECTIONS, CTL_TOKEN,
                               CTL_VERIFICATIONS)
from kernels.exit_head import exit_head, head_state
from kernels.exit_predictor import exit_probability
from mpq.errors import MpqError
from mpq.runtime.graph_if import DeviceBranch
from mpq.runtime.graph_if import supported as graph_if_supported
from mpq.runtime.model import SplitLinears, kernel_ops
from mpq.runtime.quant_linear import QuantLinear
from mpq.specee.graph_decode import GraphExitDecoder

RESULT_WORDS = int(CTL_ACTIVE)  # the control block's counters and token, read back after each step
BRANCH_EVERY = 8  # layers between device branches (0: none); see the module docstring


class FlagExitDecoder(GraphExitDecoder):
    """`GraphExitDecoder` whose exit step is one graph with the decision on the device. Runs where the step's
    Triton kernels run: CUDA (captured), or eagerly under TRITON_INTERPRET=1 (capture=False), as the tests do."""

    def __init__(self, *args, branches: int = BRANCH_EVERY, **kwargs):
        super().__init__(*args, **kwargs)
        if self.sp is None:
            raise MpqError("the one-graph exit decoder needs predictors (mpq train-predictors)")
        dev, L = self.model.device, self.L
        self.candidates = sorted(j for j in self.sp.predictors.slot if j < L - 1)
        self.ctl = torch.zeros(int(CTL_ACTIVE) + L, dtype=torch.int32, device=dev)
        pinned = dev.type == "cuda"
        self.host_ctl = torch.zeros_like(self.ctl, device="cpu").pin_memory() if pinned else self.ctl.clone()
        self.host_pos = torch.zeros(1, dtype=torch.long, pin_memory=pinned)
        self.host_result = torch.zeros(RESULT_WORDS, dtype=torch.int32, pin_memory=pinned)
        self.host_ctl_np, self.host_pos_np = self.host_ctl.numpy(), self.host_pos.numpy()
        self.host_result_np = self.host_result.numpy()
        self.head_state = head_state(dev)
        slots = self.sp.predictors.slot
        thr = torch.zeros(len(slots), dtype=torch.float32)
        for layer, s in slots.items():
            thr[s] = self.thresholds[layer]
        self.thr = thr.to(dev)
        pdl = pdl_enabled(dev)
        flag = self.ctl[:1]
        self.flag_ops = kernel_ops(pdl, skip=flag)
        self.pdl = pdl
        # the draft through the same kernels without the flag (it runs after the step's exit head), programmatic
        # dependents as the step's own (its ~15 kernels run in a row)
        self.draft_ops = kernel_ops(pdl)
        self.draft_counters = torch.zeros(self.sp.draft.n_kv_heads, dtype=torch.int32, device=dev)
        self.next_emb = torch.zeros_like(self.X[0].view(1, -1))
        self.drafted: int | None = None  # the token the pending draft was computed for
        # every `branches` layers (0: never), the rest of the step sits in a device branch (`graph_if`): after an
        # exit its layers are not launched at all, only their KV fill (or drop mask); between branches, the layers
        # after an exit still launch and skip themselves on the flag
        if self.capture and branches and not graph_if_supported():
            branches = 0  # a driver older than CUDA 12.4: every layer launches, skipped ones return at once
        self.boundaries = {c for c in self.candidates if branches and (c + 1) % branches == 0}
        self.branch = DeviceBranch(self.ctl, torch.cuda.MemPool() if self.capture and self.boundaries else None)

    # ---- the step ----------------------------------------------------------------------------------------
    def _draft_next(self, token: torch.Tensor) -> None:
        """The draft for the token after position `pos` (its embedding from `token`, int [1] on the device; the
        last step's normed state in h_prev): its top-4 and their LM-head rows into fixed buffers, through the
        decode kernels. Queued at the end of a step, so it runs while the host reads the step's token."""
        draft = self.sp.draft
        torch.index_select(self.model.embed, 0, token, out=self.next_emb)
        logits = draft.step_fused(self.h_prev[None], self.next_emb, self.pos, self.d_cos[self.pos],
                                  self.d_sin[self.pos], self.draft_ops, self.draft_counters)
        draft_top4(logits, draft.vocab, self.lm_w, self.top4, self.rows)

    def _set_exit_flags(self, on: bool) -> None:
        """Hand the exit flag to every quantized linear of the layers (None: off). In fill mode the k and v rows of
        the k/v/q projection stay computed on skipped layers: they are the KV fill."""
        a = self.model.args
        kv_rows = 2 * a.n_kv_heads * a.head_dim if self.mode == "fill" else 0
        for layer in self.model.layers:
            for module, keep_rows in ((layer.kvq, kv_rows), (layer.o, 0), (layer.gate_up, 0), (layer.down, 0)):
                offset = 0
                for part in (module.parts if isinstance(module, SplitLinears) else [module]):
                    rows = part.out_features if isinstance(part, QuantLinear) else part.weight.shape[0]
                    if isinstance(part, QuantLinear):
                        keep = min(max(keep_rows - offset, 0), rows)
                        tile = part.geometry["tile_rows"]
                        part.exit_flag = (self.ctl[:1], -(-keep // tile)) if on else None
                    offset += rows

    def _flag_step(self) -> None:
        """Queue one decode step with exits decided on the device (see the module docstring), then the draft for
        the next token."""
        m = self.model
        self.ctl.copy_(self.host_ctl, non_blocking=True)
        self.pos.copy_(self.host_pos, non_blocking=True)
        self.host_top4.copy_(self.top4, non_blocking=True)  # this step's proposals, drafted by the step before
        torch.index_select(m.embed, 0, self.ctl[CTL_TOKEN:CTL_TOKEN + 1], out=self.X[0].view(1, -1))
        cos, sin = m.rope_cos[self.pos], m.rope_sin[self.pos]
        self._layers(0, self.X[0], None, None, cos, sin)
        self.host_result.copy_(self.ctl[:RESULT_WORDS], non_blocking=True)
        self._draft_next(self.ctl[CTL_TOKEN:CTL_TOKEN + 1])

    def _layers(self, first: int, x, delta, normed, cos, sin) -> None:
        """Layers first.. of the step with their predictors and exit heads, then the final head. At a boundary the
        rest becomes a device branch: these layers while the step has not exited, else their KV fill."""
        m, L, eps, ops = self.model, self.L, self.eps, self.flag_ops
        for i in range(first, L):
            layer = m.layers[i]
            x, h = normed or ops.add_rms_norm(x, delta, layer.attn_norm, eps)
            normed = None
            delta = layer.attention(h, self.pos, cos, sin, None, ops, causal_prefix=True,
                                    dropped=None if self.dropped is None else self.dropped[i])
            x, h = ops.add_rms_norm(x, delta, layer.mlp_norm, eps)
            delta = layer.mlp(h, ops)
            if i not in self.candidates:
                continue
            x, h = exit_probability(x.view(-1), m.norm, eps, self.rows, self.p_state, self.prob_out, 0, self.mlp,
                                    self.sp.predictors.slot[i], first=False, delta=delta.view(-1), pdl=self.pdl,
                                    next_norm=m.layers[i + 1].attn_norm, control=(self.ctl, self.thr, i))
            exit_head(x, None, m.norm, eps, self.lm_w, self.h_prev, self.top4, self.ctl, self.head_state, i,
                      final=False, pdl=self.pdl)
            x, delta, normed = x.view(1, 1, -1), None, (x.view(1, 1, -1), h.view(1, 1, -1))
            if i in self.boundaries:
                rest = (x, delta, normed)
                self.branch.if_else(lambda: self._layers(i + 1, *rest, cos, sin),
                                    lambda: self._skip_rest(i + 1, rest[0], cos, sin))
                return
        exit_head(x.view(-1), None if delta is None else delta.view(-1), m.norm, eps, self.lm_w, self.h_prev,
                  self.top4, self.ctl, self.head_state, L - 1, final=True, pdl=self.pdl)

    def _skip_rest(self, first: int, x, cos, sin) -> None:
        """Layers first.. after an exit: in fill mode each one's K/V from the exit residual x, as a skipped layer
        computes it under the flag (its norm, the k and v rows of its projection, the cache write of the attention
        kernel); in drop mode the position masked out of each."""
        m, eps, ops = self.model, self.eps, self.flag_ops
        if self.dropped is not None:
            self.dropped[first:].index_fill_(1, self.pos, float("-inf"))
            return
        for layer in m.layers[first:]:
            _, h = ops.add_rms_norm(x, None, layer.attn_norm, eps)
            q, k, v = layer.qkv(h)
            ops.decode_attention(q, k, v, cos, sin, layer.kv_cache.kv, self.pos, layer.kv_cache.counters, None)

    def _replay(self) -> None:
        key = ("flag_step",)
        if self.capture and key in self.graphs:
            self.graphs[key].replay()
            return
        self._set_exit_flags(True)
        self.branch.warming = self.capture  # the run before the capture; eager steps take one side
        try:  # the warm-up run before a capture must leave the draft's input as it found it (the cache entries it
            # writes, the replay writes again with the same values; it runs both sides of each branch, the fill
            # first)
            restore = self._draft_inputs() + (() if self.dropped is None else (self.dropped,))
            self._run(key, self._flag_step, restore=restore)
        finally:
            self.branch.warming = False
            self._set_exit_flags(False)

    # ---- one token ---------------------------------------------------------------------------------------
    def step(self, token: int, t: int, h_prev: torch.Tensor, exits: bool):
        """As `ExitDecoder.step`, but returns the token itself in place of the logits (see `_greedy`)."""
        if not exits:
            return super().step(token, t, h_prev, exits)
        if h_prev is None:
            raise MpqError("exits cannot resume after a step without them (no normed hidden state for the draft)")
        if h_prev.data_ptr() != self.h_prev.data_ptr():
            self.h_prev.copy_(h_prev)
        st, L = self.stats, self.L
        if self.drafted != token:  # the first step, or a fed token other than the one the last step drafted for
            self.pos.fill_(t - 1)
            self._draft_next(torch.tensor([token], device=self.pos.device))
        sched = self.online.layers()
        forced = -1
        if self.trace is not None:  # trace-driven: the replayed exit layer carries a predictor and is accepted;
            # no other predictor fires (at full depth the forced layer is the last, which carries none)
            forced = self.trace[st.tokens % len(self.trace)] - 1
            if forced < L - 1:
                sched = {j for j in sched if j < forced} | {forced}
        ctl = self.host_ctl_np
        ctl[:] = 0
        ctl[CTL_TOKEN], ctl[CTL_FORCED] = token, forced
        for j in sched:
            if j < L - 1:
                ctl[int(CTL_ACTIVE) + j] = 1
        self.host_pos_np[0] = t
        self.host_result_np[CTL_TOKEN] = -1  # a token is >= 0: the poll waits for this step's
        self._replay()
        if self.capture:
            self._poll(self.host_result_np, CTL_TOKEN)
        res = self.host_result.tolist()
        self.drafted = res[CTL_TOKEN]
        executed = res[CTL_EXECUTED]
        st.predictor_calls += res[CTL_EVALUATED]
        st.verifications += res[CTL_VERIFICATIONS]
        st.rejections += res[CTL_REJECTIONS]
        st.proposals.append(set(self.host_top4.tolist()))
        self.online.record_exit(executed - 1)
        return res[CTL_TOKEN], self.h_prev, executed

    def _greedy(self, out) -> int:
        return out if isinstance(out, int) else int(out.argmax())

    def generate(self, prompt, max_new_tokens, *args, targets=None, **kwargs):
        if targets is not None:
            raise MpqError("the one-graph exit decoder returns tokens, not logits: no per-token losses")
        self.drafted = None
        self._capture_ahead(min(len(prompt), self.max_seq_len - 1))
        return super().generate(prompt, max_new_tokens, *args, **kwargs)

    def _capture_ahead(self, position: int) -> None:
        """CUDA: capture the exit step and the full-depth step (the fallback's) before the timers start, as the
        engine's Generator captures its step: compiling and capturing are set-up, not decode time (they made the
        first `mpq run` with exits report 24 ms/token on SmolLM2 against 0.8 for the engine). Their runs write KV
        entries at `position`, which the first decode step writes again, and leave the draft's input as they
        found it; no predictor is active, so neither exits."""
        if not self.capture or ("flag_step",) in self.graphs:
            return
        ctl = self.host_ctl_np
        ctl[:] = 0
        ctl[CTL_FORCED] = -1
        self.host_pos_np[0] = position
        saved = [t.clone() for t in self._draft_inputs()]
        self._replay()
        self.token.fill_(0)
        self.pos.fill_(position)
        self._full_depth()
        for t, s in zip(self._draft_inputs(), saved):
            t.copy_(s)
        torch.cuda.synchronize()

    def _draft_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the step reads from the step before (the predictor state, the normed hidden state, the draft's
        tokens and their LM-head rows): a run outside decoding must leave it as it found it."""
        return self.p_state, self.h_prev, self.top4, self.rows
