"""Prefill, one-token decode, sync-free sampling, and a `Generator` that replays the decode step as one CUDA graph.

The decode step reads the current token and position from static device buffers and writes the next ones back
(plus the token into a per-position output buffer), so replaying the graph N times decodes N tokens with no host
work in between. The host looks at tokens only every `chunk` steps, and only when it must (EOS or streaming).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from mpq.errors import MpqError
from mpq.runtime.model import Transformer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise MpqError(f"bad sampling settings: temperature {self.temperature} (>= 0), top-p {self.top_p} (in (0, 1])")


def sample(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Next token [B] from logits [B, vocab], entirely on the device (no .item(), no multinomial sync)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > s.top_p  # mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(outside, 0.0))
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential-race form of categorical sampling).
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def prefill(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, s: Sampling) -> torch.Tensor:
    return sample(model(tokens, input_pos, last_only=True)[:, -1], s)


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor, s: Sampling) -> torch.Tensor:
    return sample(model(token, input_pos, last_only=True)[:, -1], s)


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float  # wall time of the decode steps (tokens after the first), host reads included
    decode_steps: int
    stopped_on_eos: bool = False

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else float("nan")


@dataclass
class _Timer:
    """Device-side timing on CUDA (events), host clock elsewhere."""

    cuda: bool
    marks: list = field(default_factory=list)

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def ms(self, i: int, j: int) -> float:
        if self.cuda:
            self.marks[j].synchronize()
            return self.marks[i].elapsed_time(self.marks[j])
        return 1000 * (self.marks[j] - self.marks[i])


def cache_length(model: Transformer, positions: int) -> int:
    """The KV-cache length a Generator allocates for `positions`: rounded up to a multiple of 8, which keeps the
    mask rows aligned for the fused SDPA kernels, and no longer than the model's context."""
    return min(-(-positions // 8) * 8, model.args.max_position_embeddings)


class Generator:
    """Owns the KV cache and the static decode buffers of one model; on CUDA, the captured decode graph."""

    def __init__(self, model: Transformer, max_seq_len: int, use_graph: bool | None = None):
        self.model = model
        self.device = model.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.max_seq_len = cache_length(model, max_seq_len)
        self._setup_caches()
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(self.max_seq_len + 1, dtype=torch.long, device=self.device)  # token at each position
        self.sampling: Sampling | None = None

    def _setup_caches(self) -> None:
        """(Re)allocate the model's caches for this generator; a captured graph would point at the old ones."""
        self.model.setup_caches(self.max_seq_len)
        self.cache = self.model.layers[0].kv_cache
        self.graph = None

    def _step(self) -> None:
        nxt = decode_one_token(self.model, self.token, self.pos, self.sampling)
        self.out.index_copy_(0, self.pos + 1, nxt)
        self.token.copy_(nxt.view(1, 1))
        self.pos.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (compiles, autotunes, creates handles), then capture `_step` once.

        Warm-up steps advance the token/position buffers, so they are restored; the KV entries they wrote
        are overwritten by the next prefill, or (`resume`) written again, with the same values, by the first step."""
        saved = self.token.clone(), self.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
                self.token.copy_(saved[0])
                self.pos.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def decode_n_tokens(self, n: int) -> None:
        """Advance n tokens: n graph replays (or eager steps), nothing read back."""
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int | None = None,
                 eos_ids: Iterable[int] = (), on_tokens: Callable[[list[int]], None] | None = None,
                 chunk: int = 8) -> Generation:
        """Generate up to max_new_tokens after prompt; stop at an eos id; call on_tokens with each new batch."""
        S, eos_ids = len(prompt), set(eos_ids)
        if S == 0 or max_new_tokens < 1:
            raise MpqError("need a non-empty prompt and at least one new token")
        if S + max_new_tokens > self.max_seq_len:
            raise MpqError(f"prompt ({S} tokens) + {max_new_tokens} new tokens exceed the cache of {self.max_seq_len}")
        if self.model.layers[0].kv_cache is not self.cache:  # another Generator re-allocated the model's caches
            self._setup_caches()
        if sampling != self.sampling:
            self.sampling, self.graph = sampling, None
        if self.use_graph and self.graph is None:
            self._capture()
        if seed is not None:
            torch.manual_seed(seed)
        timer = _Timer(self.device.type == "cuda")
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        timer.mark()
        first = prefill(self.model, tokens, torch.arange(S, device=self.device), sampling)
        self.out[S:S + 1].copy_(first)
        self.token.copy_(first.view(1, 1))
        self.pos.fill_(S)
        timer.mark()
        out, done, eos = self._decode(S, S, [], max_new_tokens - 1, eos_ids, on_tokens, chunk)
        timer.mark()
        return Generation(out, S, timer.ms(0, 1), timer.ms(1, 2), done, eos)

    @torch.inference_mode()
    def resume(self, prompt_len: int, tokens: list[int], max_new_tokens: int, eos_ids: Iterable[int] = (),
               on_tokens: Callable[[list[int]], None] | None = None, chunk: int = 8) -> Generation:
        """Greedy decoding on from where another decoder of this model stopped, in the caches it filled (SpecEE's
        exit decoder hands over here when exits do not pay): they hold positions [0, prompt_len + len(tokens) -
        1); `tokens` are the new tokens so far, all passed to on_tokens but the last, which is fed next. Returns
        every new token; decode_steps and decode_ms count this call's steps only. The caches stay the other
        decoder's: the next `generate` allocates its own again."""
        S, P, eos_ids = prompt_len, prompt_len + len(tokens) - 1, set(eos_ids)
        cache = self.model.layers[0].kv_cache
        if not tokens or S + max_new_tokens > min(self.max_seq_len, cache.kv.shape[3]) or len(tokens) > max_new_tokens:
            raise MpqError(f"cannot resume {len(tokens)} of {max_new_tokens} new tokens after {S} in these caches")
        if cache is not self.cache or self.sampling != Sampling():
            self.cache, self.sampling, self.graph = cache, Sampling(), None
        self.out[S:P + 1].copy_(torch.tensor(tokens))
        self.token.fill_(tokens[-1])
        self.pos.fill_(P)
        if self.use_graph and self.graph is None:
            self._capture()
        timer = _Timer(self.device.type == "cuda")
        timer.mark()
        out, done, eos = self._decode(S, P, tokens[:-1], S + max_new_tokens - 1 - P, eos_ids, on_tokens, chunk)
        timer.mark()
        self.cache, self.graph = None, None
        return Generation(out, S, 0.0, timer.ms(0, 1), done, eos)

    def _decode(self, prompt_len: int, start: int, emitted: list[int], steps: int, eos_ids: set[int],
                on_tokens: Callable[[list[int]], None] | None, chunk: int) -> tuple[list[int], int, bool]:
        """Replay `steps` decode steps from position `start` (the one self.pos holds), reading tokens back every
        `chunk` steps where someone watches (EOS, streaming), else once at the end. `emitted`: the new tokens
        already passed on; the output buffer holds every new token from position prompt_len. Returns (new tokens,
        steps run, EOS seen)."""
        S = prompt_len
        watch = bool(eos_ids) or on_tokens is not None
        out, done, eos = list(emitted), 0, False
        while True:
            ready = start + 1 + done  # positions [S, ready) hold new tokens
            if watch or done == steps:
                new = self.out[S + len(out):ready].tolist()
                for i, t in enumerate(new):
                    if t in eos_ids:
                        new, eos = new[:i + 1], True
                        break
                out += new
                if on_tokens is not None and new:
                    on_tokens(new)
                if eos or done == steps:
                    break
            k = min(chunk, steps - done) if watch else steps - done
            self.decode_n_tokens(k)
            done += k
        return out, done, eos
