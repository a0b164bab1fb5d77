"""The decode engine's Llama-family decoder, in gpt-fast's shape.

`ModelArgs` comes from the HF config dict (never a folder name). Tensors come from a `WeightSource`: a float
HF state dict (`mpq run MODEL`) or an artifact, whose quantized linears become `QuantLinear`s. Float q/k/v and
gate/up are concatenated into one matmul each; quantized ones stack into one linear where their layouts agree
(`WeightSource.linears`). The KV cache is preallocated once (`setup_caches`) and indexed by an `input_pos` tensor,
so the decode step keeps fixed shapes and can be captured in one CUDA graph. The small ops between matmuls are
plain functions (`add_rms_norm`, `rope_write`, `silu_mul`) that `compile_small_ops` swaps on CUDA for GPU
kernels, with one fused kernel for a one-token step's RoPE, cache write and attention; on sm_90+ the step's
kernels launch as programmatic dependents (each starts while the one before finishes). In a one-token step on
CUDA, the quantized linears whose GEMV splits K add their shares into fp32 sums (`PendingSums`) that the next small
op reads and zeroes, rather than handing the shares' partials over inside the GEMV.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import step_ops
from kernels.decode_attention import decode_attention
from kernels.dispatch import pdl_enabled
from kernels.gemv_tc import GROUP_SIZE as TC_GROUP, TILE_ROWS as TC_ROWS
from mpq.errors import ArtifactError, MpqError
from mpq.models import SUPPORTED_ARCHITECTURES
from mpq.quant.format import PackedLinear, stack_biases
from mpq.runtime.quant_linear import QuantLinear, RaggedQuantLinear, StackedQuantLinear

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read an HF config.json dict; refuse what this engine would compute wrongly rather than guess."""
        if cfg.get("model_type") not in SUPPORTED_ARCHITECTURES:
            raise MpqError(f"unsupported architecture '{cfg.get('model_type')}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise MpqError(f"unsupported activation '{cfg.get('hidden_act')}' (the engine implements SwiGLU)")
        if cfg.get("use_sliding_window") or (cfg.get("model_type") == "mistral" and cfg.get("sliding_window")):
            raise MpqError("sliding-window attention is not supported by the decode engine")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise MpqError(f"unsupported rope type '{kind}' (supported: {', '.join(ROPE_TYPES)})")
        try:
            dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(cfg.get("head_dim") or dim // heads),
                intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta, rope_scaling=None if kind == "default" else rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"config.json lacks a usable model field: {e!r}") from None


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies (fp32, as HF computes them), with linear or llama3 scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv
    factor = float(s["factor"])
    if s.get("rope_type", s.get("type")) == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low, high, orig = float(s["low_freq_factor"]), float(s["high_freq_factor"]), float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blended, scaled)


# ---- the small ops between matmuls (eager reference; CUDA may use compiled copies) ------------------------
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 consume: bool = False):
    """Residual add then RMSNorm, with HF's rounding: normalise in fp32, cast back, then scale. consume: delta is a
    pending sum (`PendingSums`): read rounded to x's dtype, then zeroed."""
    if delta is not None:
        x = x + (delta.to(x.dtype, copy=True) if consume else delta)
        if consume:
            delta.zero_()
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * h.to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k [B, S, heads, D] by the half-split convention HF checkpoints use; cos/sin [S, D].

    Returns q and the stacked (k, v) [2, B, S, kv heads, D], so that one kernel feeds one cache write."""
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), torch.stack((rotate(k), v))


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """`rope`, then k and v written into the cache [2, B, heads, length, D] at input_pos; returns the rotated q.
    One op, so that its compiled copy writes the cache from the rotation kernel (no separate index_copy_)."""
    q, kv = rope(q, k, v, cos, sin)
    cache.index_copy_(3, input_pos, kv.transpose(2, 3))
    return q


def silu_mul(gate: torch.Tensor, up: torch.Tensor, consume: bool = False,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """consume: gate and up are pending sums (`PendingSums`): read rounded to dtype, then zeroed."""
    if consume:
        g, u = gate.to(dtype or gate.dtype, copy=True), up.to(dtype or up.dtype, copy=True)
        gate.zero_()
        up.zero_()
        return F.silu(g) * u
    return F.silu(gate) * up


@dataclass
class PendingSums:
    """fp32 sums that the one-token step's split-K GEMVs add their shares into (`QuantLinear.add_into`), one per
    projection, shared by the layers. Zero at rest: the small op after each GEMV reads its sum and zeroes it. This
    takes the hand-over of the shares' partials out of every such GEMV: 1.918 against 1.997 ms a token on the 7B
    step (benchmarks/e2e-notes.md, run 33)."""

    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    def holds(self, t: torch.Tensor | None) -> bool:
        return any(t is s for s in (self.o, self.gate_up, self.down))

    def zero_(self) -> None:
        for s in (self.o, self.gate_up, self.down):
            s.zero_()


def _project(linear: nn.Module, x: torch.Tensor, acc: torch.Tensor | None):
    """linear(x); or, where acc (fp32, zero) is given and the linear adds into it (`QuantLinear.add_into`), acc
    itself, as a pending sum for the next small op to consume."""
    if (acc is not None and acc.shape[:-1] == x.shape[:-1] and hasattr(linear, "add_into")
            and linear.add_into(x, acc)):
        return acc
    return linear(x)


@dataclass
class SmallOps:
    """The ops between matmuls, swappable as a set (eager here; compiled ones from `compile_small_ops`).
    `decode_attention` (CUDA): RoPE, the cache write and attention over the causal prefix of one new token in one
    kernel, used where the caller's mask is that prefix; None: `rope_write` then SDPA under the mask."""

    add_rms_norm: Callable = add_rms_norm
    rope: Callable = rope
    silu_mul: Callable = silu_mul
    rope_write: Callable = rope_write
    decode_attention: Callable | None = None


def kernel_ops(pdl: bool, skip: torch.Tensor | None = None) -> SmallOps:
    """The residual add + RMSNorm, the SwiGLU product and the one-token attention as the step's GPU kernels (the
    rotations stay eager): programmatic dependents where pdl; with `skip` (an exit flag) they do no work once it is
    set."""
    return SmallOps(add_rms_norm=functools.partial(step_ops.add_rms_norm, pdl=pdl, skip=skip),
                    silu_mul=functools.partial(step_ops.silu_mul, pdl=pdl, skip=skip),
                    decode_attention=functools.partial(decode_attention, pdl=pdl, skip=skip))


# ---- linears -------------------------------------------------------------------------------------------
class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FusedLinear(DenseLinear):
    """Float linears sharing one input, run as one matmul (one launch, one weight stream); returns the parts."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        bias = stack_biases(biases, [w.shape[0] for w in weights], weights[0])
        super().__init__(torch.cat(weights), bias)
        self.splits = [w.shape[0] for w in weights]

    def forward(self, x):
        return super().forward(x).split(self.splits, dim=-1)


class SplitLinears(nn.Module):
    """Linears sharing one input that cannot all be stacked into one (a float-pinned part, or quantized parts with
    different layouts); a part may itself be a stack. On CUDA each part after the first runs on a side stream
    forked from and joined back into the current one, so the small decode GEMVs overlap; a captured CUDA graph
    keeps the fork/join as parallel branches. The side streams are this module's own (`graph_if.side_stream`), so
    that it can fork inside a device branch too. `parallel = False` runs them in turn."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.parallel = True
        self._streams: list[torch.cuda.Stream] = []

    def leading(self, n: int) -> nn.Module:
        """A module computing the first n outputs (the same modules, run in turn)."""
        lead = []
        for part in self.parts:
            width = len(part.splits) if isinstance(part, StackedQuantLinear) else 1
            if width > n:
                part = part.leading(n)
            lead.append(part)
            n -= min(width, n)
            if n == 0:
                break
        if len(lead) == 1 and isinstance(lead[0], StackedQuantLinear):
            return lead[0]
        split = SplitLinears(lead)
        split.parallel = False
        return split

    def forward(self, x):
        if not (self.parallel and x.is_cuda and len(self.parts) > 1):
            return _flat([p(x) for p in self.parts])
        if not self._streams:  # created on the first (warm-up) call, never inside a capture
            from mpq.runtime.graph_if import side_stream

            self._streams = [side_stream(x.device) for _ in self.parts[1:]]
        main = torch.cuda.current_stream(x.device)
        outs = []
        for part, side in zip(self.parts[1:], self._streams):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                outs.append(part(x))
        first = self.parts[0](x)
        for side in self._streams:
            main.wait_stream(side)
        return _flat([first, *outs])


def _flat(outputs: list) -> tuple[torch.Tensor, ...]:
    """The parts' outputs in order, a stacked part's own outputs spliced in."""
    return tuple(y for out in outputs for y in (out if isinstance(out, tuple) else (out,)))


RAGGED_PAD_MAX = 0.05  # zero outliers a ragged stack may add to give its parts one count, as a share of its bytes


class WeightSource:
    """Tensors by HF name (float) and PackedLinears by HF module name, delivered on one device and dtype."""

    def __init__(self, floats: dict[str, torch.Tensor], packed: dict[str, PackedLinear] | None = None, *,
                 device: torch.device, dtype: torch.dtype, stack: bool = True):
        self.floats, self.packed, self.device, self.dtype = floats, packed or {}, device, dtype
        self.stack = stack  # False keeps stackable quantized linears apart (A/B timing of the stacking)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.floats:
            raise ArtifactError(f"missing tensor {name}")
        return self.floats[name].to(device=self.device, dtype=self.dtype, copy=True)

    def _bias(self, fqn: str) -> torch.Tensor | None:
        return self.tensor(f"{fqn}.bias") if f"{fqn}.bias" in self.floats else None

    def _stackable(self, a: str, b: str) -> bool:
        """Whether b joins a's stack: one layout (`PackedLinear.stack_key`), or, where the tensor-core GEMV can run
        a ragged stack (16-row tiles, g = 128), one up to n4 and the outlier count, if giving the pair one outlier
        count (`_stack`) adds at most RAGGED_PAD_MAX of its bytes."""
        if not (self.stack and a in self.packed and b in self.packed):
            return False
        pa, pb = self.packed[a], self.packed[b]
        if pa.stack_key() == pb.stack_key():
            return True
        if pa.ragged_key()[:3] != pb.ragged_key()[:3] or (pa.group_size, pa.tile_rows) != (TC_GROUP, TC_ROWS):
            return False
        k = max(pa.outliers, pb.outliers)
        pad = sum((k - p.outliers) * p.outlier_slot_bytes() for p in (pa, pb))
        return pad <= RAGGED_PAD_MAX * (pa.stored_bytes() + pb.stored_bytes())

    def linear(self, fqn: str) -> nn.Module:
        if fqn in self.packed:
            return QuantLinear(self.packed[fqn].to(self.device))
        return DenseLinear(self.tensor(f"{fqn}.weight"), self._bias(fqn))

    def linears(self, fqns: list[str]) -> nn.Module:
        """One module for linears that read the same input; it returns their outputs in the order of `fqns`.
        Consecutive quantized ones with one layout (`PackedLinear.stack_key`) stack into one linear, and those that
        differ only in n4 into a ragged stack: one launch either way."""
        if any(f in self.packed for f in fqns):
            runs: list[list[str]] = []
            for f in fqns:
                if runs and self._stackable(runs[-1][-1], f):
                    runs[-1].append(f)
                else:
                    runs.append([f])
            parts = [self._stack([self.packed[f].to(self.device) for f in run]) if len(run) > 1
                     else self.linear(run[0]) for run in runs]
            return parts[0] if len(parts) == 1 else SplitLinears(parts)
        return FusedLinear([self.tensor(f"{f}.weight") for f in fqns], [self._bias(f) for f in fqns])

    @staticmethod
    def _stack(parts: list[PackedLinear]) -> StackedQuantLinear:
        if len({p.stack_key() for p in parts}) == 1:
            return StackedQuantLinear.of(parts)
        k = max(p.outliers for p in parts)  # zero outliers added where a part has fewer: the same values
        return RaggedQuantLinear([p.with_outliers(k) for p in parts])


# ---- the decoder ---------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Keys and values in one buffer [2, B, heads, length, D]. The layer writes it through `rope_write` (one
    kernel with the rotation once compiled); `update` is the plain write for callers outside the layer."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("kv", torch.zeros(2, batch, heads, length, head_dim, dtype=dtype, device=device), persistent=False)
        # the fused decode attention's per-head arrival counters (zero between calls)
        self.register_buffer("counters", torch.zeros(batch * heads, dtype=torch.int32, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, kv: torch.Tensor):
        """kv [2, B, S, heads, D] for positions input_pos [S]; returns the whole cache's k and v."""
        self.kv.index_copy_(3, input_pos, kv.transpose(2, 3))
        return self.kv[0], self.kv[1]


class Block(nn.Module):
    def __init__(self, args: ModelArgs, w: WeightSource, i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.args = args
        self.register_buffer("attn_norm", w.tensor(p + "input_layernorm.weight"))
        self.register_buffer("mlp_norm", w.tensor(p + "post_attention_layernorm.weight"))
        # k and v lead, so that the exit decoder's KV fill runs on a prefix of the same weights (`leading(2)`)
        self.kvq = w.linears([p + "self_attn.k_proj", p + "self_attn.v_proj", p + "self_attn.q_proj"])
        self.o = w.linear(p + "self_attn.o_proj")
        self.gate_up = w.linears([p + "mlp.gate_proj", p + "mlp.up_proj"])
        self.down = w.linear(p + "mlp.down_proj")
        self.kv_cache: KVCache | None = None

    def qkv(self, h):
        """q, k, v of h [B, S, dim] as [B, S, heads, head_dim] (k and v: kv heads), before RoPE."""
        a = self.args
        B, S, _ = h.shape
        k, v, q = self.kvq(h)
        return (q.view(B, S, a.n_heads, a.head_dim), k.view(B, S, a.n_kv_heads, a.head_dim),
                v.view(B, S, a.n_kv_heads, a.head_dim))

    def attention(self, h, input_pos, cos, sin, mask, ops: SmallOps, causal_prefix: bool = False,
                  dropped: torch.Tensor | None = None, sums: PendingSums | None = None):
        """causal_prefix: the mask is the causal one (positions 0..input_pos) plus `dropped` (None, or an additive
        row over the cache: SpecEE's drop mode), so a one-token step may run the fused decode kernel, which
        ignores `mask`. sums: the o projection may return `sums.o`, pending (`_project`)."""
        a = self.args
        B, S, _ = h.shape
        q, k, v = self.qkv(h)
        cache = self.kv_cache.kv
        if causal_prefix and S == 1 and ops.decode_attention is not None:
            y = ops.decode_attention(q, k, v, cos, sin, cache, input_pos, self.kv_cache.counters, dropped)
            return _project(self.o, y, None if sums is None else sums.o)
        q = ops.rope_write(q, k, v, cos, sin, cache, input_pos)
        k, v = cache[0], cache[1]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, S, a.n_heads * a.head_dim)
        return _project(self.o, y, None if sums is None else sums.o)

    def mlp(self, h, ops: SmallOps, sums: PendingSums | None = None):
        """sums: gate/up may add into `sums.gate_up` (consumed by the SwiGLU product) and down return `sums.down`,
        pending (`_project`)."""
        acc = None if sums is None or not hasattr(self.gate_up, "splits") else sums.gate_up
        out = _project(self.gate_up, h, acc)
        if out is acc:
            gate, up = acc.split(self.gate_up.splits, dim=-1)
            act = ops.silu_mul(gate, up, consume=True, dtype=h.dtype)
        else:
            act = ops.silu_mul(*out)
        return _project(self.down, act, None if sums is None else sums.down)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, w: WeightSource):
        super().__init__()
        self.args = args
        self.register_buffer("embed", w.tensor("model.embed_tokens.weight"))
        self.layers = nn.ModuleList(Block(args, w, i) for i in range(args.n_layers))
        self.register_buffer("norm", w.tensor("model.norm.weight"))
        if "lm_head" in w.packed or not args.tie_embeddings:
            self.output = w.linear("lm_head")
        else:
            self.output = DenseLinear(self.embed)
        self.ops = SmallOps()
        self.max_seq_len = 0
        self.sums: PendingSums | None = None  # CUDA, from setup_caches
        self.sum_in_place = True  # one-token steps use `sums` (False: every GEMV hands its partials over itself)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def setup_caches(self, max_seq_len: int, batch: int = 1) -> None:
        """Allocate the KV cache, rope tables and causal mask once, for positions < max_seq_len."""
        a, dev = self.args, self.device
        if max_seq_len > a.max_position_embeddings:
            raise MpqError(f"{max_seq_len} positions exceed the model's context of {a.max_position_embeddings}")
        self.max_seq_len = max_seq_len
        for layer in self.layers:
            layer.kv_cache = KVCache(batch, a.n_kv_heads, max_seq_len, a.head_dim, self.dtype, dev)
        freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * rope_inv_freq(a)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(dev, self.dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(dev, self.dtype), persistent=False)
        # additive (0 / -inf) rather than bool: SDPA would otherwise convert the mask in every layer
        causal = torch.full((max_seq_len, max_seq_len), float("-inf"), dtype=self.dtype, device=dev).triu(1)
        self.register_buffer("causal", causal, persistent=False)
        if dev.type == "cuda":
            width = {"o": a.dim, "gate_up": 2 * a.intermediate_size, "down": a.dim}
            self.sums = PendingSums(**{k: torch.zeros(batch, 1, n, device=dev) for k, n in width.items()})

    def parallel_linears(self, on: bool) -> None:
        """Overlap the quantized q/k/v and gate/up calls on side streams (CUDA), or run them one after another."""
        for module in self.modules():
            if isinstance(module, SplitLinears):
                module.parallel = on

    def compile_small_ops(self) -> None:
        """The step's small ops as GPU kernels (CUDA only; the matmuls stay as they are): the residual add + RMSNorm
        and the SwiGLU product as the kernels of `kernels.step_ops`, the rotations through torch.compile, and one
        fused kernel for a one-token step's RoPE, cache write and attention.

        Where the GEMV runs as a programmatic dependent (sm_90+, `kernels.dispatch.pdl_enabled`), these kernels do
        too: each launches while the kernel before it runs and waits for its output on the device, so a decode
        step does not pay a launch gap at every one of its ~8 kernels per layer."""
        import torch._inductor.config as inductor_config

        pdl = pdl_enabled(self.device)
        options = {"triton.enable_pdl": True} if pdl and hasattr(inductor_config.triton, "enable_pdl") else None
        self.ops = replace(kernel_ops(pdl), rope=torch.compile(rope, dynamic=False, options=options),
                           rope_write=torch.compile(rope_write, dynamic=False, options=options))

    def blocks(self, x: torch.Tensor, delta: torch.Tensor | None, first: int, end: int, input_pos: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, ops: SmallOps,
               dropped: torch.Tensor | None = None,
               sums: PendingSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers [first, end) on the residual x + delta (delta None: x alone), each residual add fused into the
        next norm. Returns the last layer's (x, delta): its output is their sum. dropped: None, or additive rows
        [n_layers, cache length] masking the positions each layer skipped (SpecEE's drop mode). sums: the GEMVs
        may leave pending sums (`PendingSums`), consumed here, except that the returned delta may be one."""
        for i in range(first, end):
            layer, skipped = self.layers[i], None if dropped is None else dropped[i]
            pending = sums is not None and sums.holds(delta)
            x, h = ops.add_rms_norm(x, delta, layer.attn_norm, self.args.norm_eps, consume=pending)
            delta = layer.attention(h, input_pos, cos, sin, mask if skipped is None else mask + skipped, ops,
                                    causal_prefix=True, dropped=skipped, sums=sums)
            pending = sums is not None and sums.holds(delta)
            x, h = ops.add_rms_norm(x, delta, layer.mlp_norm, self.args.norm_eps, consume=pending)
            delta = layer.mlp(h, ops, sums)
        return x, delta

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S or 1, vocab] for tokens [B, S] at positions input_pos [S]; writes the KV cache."""
        S = tokens.shape[1]
        ops = self.ops if S == 1 else SmallOps()  # compiled ops are specialised to the decode shape
        sums = self.sums if S == 1 and self.sum_in_place else None
        if S > 1 and self.sums is not None:  # a step stopped between a GEMV and its reader left a sum behind
            self.sums.zero_()
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        mask = self.causal[input_pos].view(1, 1, S, self.max_seq_len)  # unused where the fused kernel runs
        x, delta = self.blocks(F.embedding(tokens, self.embed), None, 0, len(self.layers), input_pos, cos, sin,
                               mask, ops, sums=sums)
        _, h = ops.add_rms_norm(x, delta, self.norm, self.args.norm_eps, consume=sums is not None and sums.holds(delta))
        return self.output(h[:, -1:] if last_only else h)


def weight_bytes(model: Transformer) -> int:
    """Bytes of every weight tensor the model holds (shared tensors once), caches and tables excluded."""
    seen, total = set(), 0
    skip = ("rope_cos", "rope_sin", "causal")
    for name, t in model.named_buffers():
        if name in skip or ".kv_cache." in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
