"""Live exit-aware decoding from CUDA graphs: SpecEE on the GPU without a Python launch per kernel.

The eager `ExitDecoder` launches every kernel of a step from Python and reads each predictor's decision back; on
the H100's 7B shape that ran 20x slower than the engine's one-graph step. Here a step is a few captured pieces,
replayed, and the host only chooses the next piece. A piece runs from where the last one stopped to the next
scheduled layer p: its layers, the predictor at p, and layer p + 1, so that the GPU has that layer to run while
the host reads the predictor's probability. On a continue nothing is lost; on a predicted exit layer p + 1 ran for
nothing (its KV entry at this position is then overwritten by the fill, or masked in drop mode): one layer per
exit. The first piece of a token also gathers the embedding and forks the draft head onto its own stream (it
overlaps the first layers and joins before the first predictor); the last one, past the last scheduled layer,
ends with the LM head. Besides those: the exit head at a layer (final norm, LM head, argmax, and whether that
argmax is one of the draft's 4), the KV fill of the layers after an exit (fill mode), and, without exits (off, or
after the fallback), the whole step as one graph, as the engine's own.

So a token costs the host one replay per predicted layer, plus the exit head and fill where it exits. Each
decision reaches the host through pinned memory that the piece writes and the host polls (no CUDA call per
read: on the lent VM each costs ~10 us). Pieces pass the residual through fixed buffers (`X[i]`: the residual
entering layer i), so any piece can follow any other. Tokens, exits and counters equal the eager decoder's
(tests/specee/test_train_e2e.py).

Pieces are captured on first use. `capture=False` runs the same pieces eagerly, which is how the CPU tests check
the host logic. `trace` (the GPU bench only) replays given exit layers instead of the predictors' decisions, with
the predictors, the reads and the exit heads still really run.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from kernels.draft_top4 import draft_top4
from mpq.errors import MpqError
from mpq.specee.decode import ExitDecoder
from mpq.specee.features import final_norm


class GraphExitDecoder(ExitDecoder):
    """`ExitDecoder` whose decode step replays captured pieces (CUDA) or runs them eagerly (capture=False)."""

    def __init__(self, *args, capture: bool | None = None, trace: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        dev, dt = model.device, model.dtype
        self.capture = dev.type == "cuda" if capture is None else capture
        self.trace = None if trace is None else list(trace)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h_prev = torch.zeros(model.args.dim, dtype=dt, device=dev)
        self.top4 = torch.zeros(4, dtype=torch.long, device=dev)
        self.rows = torch.zeros(4, model.args.dim, dtype=dt, device=dev)
        self.X = torch.zeros(self.L + 1, 1, 1, model.args.dim, dtype=dt, device=dev)  # X[i]: residual into layer i
        pinned = dev.type == "cuda"
        self.host_prob = torch.zeros(1, dtype=torch.float32, pin_memory=pinned)
        self.host_head = torch.zeros(2, dtype=torch.long, pin_memory=pinned)  # (argmax, among the draft's 4)
        self.host_top4 = torch.zeros(4, dtype=torch.long, pin_memory=pinned)
        self.host_prob_np, self.host_head_np = self.host_prob.numpy(), self.host_head.numpy()  # cheap host writes
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple, object] = {}
        # high priority: the first predicted layer waits for the draft's tokens, so the draft's kernels go first
        # where both streams have work (at normal priority the one-graph step waited ~0.2 ms a token for it)
        self.draft_stream = torch.cuda.Stream(dev, priority=-1) if self.capture else None
        self.prob_value = 0.0  # eager pieces: the last predictor's probability
        self.full_ms: float | None = None
        self.window_mark: tuple[float, int] | None = None  # (start time, tokens then) of the fallback's window

    # ---- pieces ------------------------------------------------------------------------------------------
    def _run(self, key: tuple, fn, restore: tuple[torch.Tensor, ...] = ()):
        """fn() now (eager), or its CUDA graph, captured on first use; `restore`: state a warm-up run must not
        change (the capture needs one run outside the graph first). Each graph has its own memory pool: pieces
        replay in varying orders, so one graph's temporaries must never lie under another's outputs."""
        if not self.capture:
            return fn()
        g = self.graphs.get(key)
        if g is None:
            saved = [t.clone() for t in restore]
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(restore, saved):
                t.copy_(s)
            g = torch.cuda.CUDAGraph()
            gc.collect()  # a memory pool that dies during the capture aborts the process (torch 2.11)
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(g):
                    self.outputs[key] = fn()
            finally:
                if collecting:
                    gc.enable()
            self.graphs[key] = g
        g.replay()
        return self.outputs[key]

    def _draft(self) -> None:
        """The draft head's top-4 for this token (from the last token's normed hidden state and this embedding) and
        their LM-head rows, into fixed buffers."""
        draft = self.sp.draft
        logits = draft.step_at(self.h_prev[None], self.X[0].view(1, -1), self.pos - 1, self.d_cos, self.d_sin)
        draft_top4(logits, draft.vocab, self.lm_w, self.top4, self.rows)
        self.host_top4.copy_(self.top4, non_blocking=True)

    def _head_fn(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and LM head on layer i's output; (argmax, among the draft's 4) to the host."""
        hn = final_norm(self.X[i + 1].view(-1), self.model.norm, self.eps)
        logits = self.model.output(hn)
        top = logits.argmax()
        self.host_head.copy_(torch.stack((top, (self.top4 == top).any().long())), non_blocking=True)
        return logits, hn

    def _piece(self, c: int, p: int | None, first: bool):
        """Queue layers c..p from X[c] (c = 0: after the embedding, with the draft forked), then the predictor at p
        and layer p + 1; p None: layers c..L-1 and the LM head, whose (logits, hn) it returns."""
        mask = lambda: self.model.causal[self.pos].view(1, 1, 1, self.max_seq_len)  # noqa: E731
        last = self.L - 1 if p is None else p

        def fn():
            main = torch.cuda.current_stream() if self.capture else None
            if c == 0:
                torch.index_select(self.model.embed, 0, self.token, out=self.X[0].view(1, -1))
                if self.capture:  # the draft on its own stream, beside the first layers
                    self.draft_stream.wait_stream(main)
                    with torch.cuda.stream(self.draft_stream):
                        self._draft()
                else:
                    self._draft()
            if c <= last:
                self.run_layers(c, last + 1, self.X[c], self.pos, mask(), self.model.ops, out=self.X[last + 1])
            if c == 0 and self.capture:
                main.wait_stream(self.draft_stream)
            if p is None:
                return self._head_fn(self.L - 1)
            if self.capture:
                self.launch_exit_prob(p, self.X[p + 1], self.rows, first)
                self.host_prob.copy_(self.prob_out, non_blocking=True)
            else:
                self.prob_value = self.exit_prob(p, self.X[p + 1], self.rows, first)
            if p + 1 < self.L:  # run while the host reads the decision
                self.run_layers(p + 1, p + 2, self.X[p + 1], self.pos, mask(), self.model.ops, out=self.X[p + 2])
            return None

        if p is not None:
            self.host_prob_np[0] = -1.0  # a probability is >= 0: the poll waits for this piece's
        else:
            self.host_head_np[1] = -1
        return self._run(("piece", c, p, first), fn, restore=(self.p_state,))

    def _poll(self, view, index: int):
        """view[index] (a pinned buffer's numpy view) once the GPU has written it (it was set to -1 before the piece
        was queued): a spin on pinned host memory, no CUDA call per read."""
        spins = 0
        while view[index] == -1:
            spins += 1
            if spins % 100_000 == 0 and torch.cuda.current_stream().query() and view[index] == -1:
                raise MpqError("a piece of the exit decoder finished without writing its decision to the host")
        return view[index]

    def _read_prob(self) -> float:
        return float(self._poll(self.host_prob_np, 0)) if self.capture else self.prob_value

    def _head(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit head at layer i; the host learns (argmax, among the draft's 4)."""
        self.host_head_np[1] = -1
        out = self._run(("head", i), lambda: self._head_fn(i))
        if self.capture:
            self._poll(self.host_head_np, 1)
        return out

    def _full_depth(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole step without exits as one piece (one graph): the baseline the fallback compares with, and what
        decodes once exits are off. In fill mode it is the engine's own step (residual adds fused into the next
        norm; no normed hidden state is returned, since no draft runs after it); drop mode needs the decoder's
        layer loop, which masks the positions skipped layers left empty."""
        if self.mode == "fill":
            return self._run(("full",), lambda: (self.model(self.token.view(1, 1), self.pos, last_only=True).view(-1),
                                                 None))

        def fn():
            x = self.model.embed[self.token].view(1, 1, -1)
            mask = self.model.causal[self.pos].view(1, 1, 1, self.max_seq_len)
            x = self.run_layers(0, self.L, x, self.pos, mask, self.model.ops)
            hn = final_norm(x.view(-1), self.model.norm, self.eps)
            return self.model.output(hn), hn

        return self._run(("full",), fn)

    def _fill(self, first: int) -> None:
        self._run(("fill", first), lambda: self.fill_kv(self.X[first], self.pos, first))

    # ---- one token ---------------------------------------------------------------------------------------
    def step(self, token: int, t: int, h_prev: torch.Tensor, exits: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """As `ExitDecoder.step`, from the pieces above."""
        st, L = self.stats, self.L
        self.token.fill_(token)
        self.pos.fill_(t)
        if not exits:
            return (*self._full_depth(), L)
        if h_prev is None:
            raise MpqError("exits cannot resume after a step without them (no normed hidden state for the draft)")
        if h_prev.data_ptr() != self.h_prev.data_ptr():  # the draft's input: the last token's normed hidden state
            self.h_prev.copy_(h_prev)
        sched = self.online.layers()
        exit_at = None
        if self.trace is not None:  # trace-driven: the replayed exit layer always carries a predictor
            exit_at = self.trace[st.tokens % len(self.trace)] - 1
            sched = ({j for j in sched if j < exit_at} | {exit_at}) if exit_at < L - 1 else sched
        sched = sorted(j for j in sched if j < L - 1)
        queued, first, result = 0, True, None  # layers [0, queued) are queued
        for p in [*sched, None]:
            if p is None:  # past the last scheduled layer: the rest and the LM head
                logits, hn = self._piece(queued, None, first)
                if self.capture:
                    self._poll(self.host_head_np, 1)
                self.online.record_exit(L - 1)
                result = logits, hn, L
                break
            self._piece(queued, p, first)
            first = False
            st.predictor_calls += 1
            queued = min(p + 2, L)
            prob = self._read_prob()
            if (prob > self.thresholds[p]) if exit_at is None else p == exit_at:
                result = self._try_exit(p, None if exit_at is None else True)
                if result is not None:
                    break
        st.proposals.append(set(self.host_top4.tolist()))
        return result

    def _try_exit(self, j: int, forced: bool | None):
        """The exit head at layer j: (logits, hn, j + 1) with the skipped layers' KV filled (or dropped) if its
        argmax is among the draft's 4 (or `forced`), else None (a rejected verification)."""
        st = self.stats
        logits, hn = self._head(j)
        st.verifications += 1
        accepted = bool(self.host_head[1]) if self.capture else bool((self.top4 == logits.argmax()).any())
        if forced is not None:
            accepted = forced
        if not accepted:
            st.rejections += 1
            return None
        self.online.record_exit(j)
        if self.mode == "fill":
            self._fill(j + 1)
        else:
            self.dropped[j + 1:, self.pos] = float("-inf")
        return logits, hn, j + 1

    # ---- fallback ----------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens, *args, **kwargs):
        self.full_ms, self.window_mark = None, None
        return super().generate(prompt, max_new_tokens, *args, **kwargs)

    def _full_depth_ms(self) -> float:
        """ms of the one-graph full-depth step, timed on the position just decoded (its KV entries there are
        restored afterwards)."""
        t = self.pos.clone()
        saved_kv = [layer.kv_cache.kv.index_select(3, t) for layer in self.model.layers]
        times = []
        for _ in range(3):
            if self.capture:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits, _ = self._full_depth()
            int(logits.argmax())  # as generate reads each token
            times.append(1000 * (time.perf_counter() - t0))
        for layer, kv in zip(self.model.layers, saved_kv):
            layer.kv_cache.kv.index_copy_(3, t, kv)
        return statistics.median(times)

    def _check_fallback(self) -> bool:
        """Every `window` tokens: were the steps with exits faster than the one-graph full-depth step? (The eager
        decoder's per-part host timers mean nothing here: the GPU runs ahead of the host.)"""
        st = self.stats
        if not self.auto_fallback:
            return False
        now = time.perf_counter()
        if self.window_mark is None:
            self.window_mark = now, st.tokens
            return False
        start, tokens = self.window_mark
        if st.tokens - tokens < self.window:
            return False
        per_token = 1000 * (now - start) / (st.tokens - tokens)
        if self.full_ms is None:
            self.full_ms = self._full_depth_ms()
        self.window_mark = time.perf_counter(), st.tokens
        if per_token < self.full_ms:
            return False
        st.fallback = (f"exits do not pay here: {per_token:.2f} ms/token with exits against {self.full_ms:.2f} at "
                       f"full depth over the last {st.tokens - tokens} tokens; decoding the rest at full depth")
        return True
