"""The draft head: EAGLE-style, one decoder layer over [final_norm(h_{t-1}), embed(x_t)] of the target, proposing
the top-4 candidates for x_{t+1} through the target's own LM-head rows.

On a 135M model the LM head is about a fifth of the weights, so a draft that ran the full LM head would cost a
fifth of a decode step. The head therefore scores a reduced vocabulary: the V tokens the target predicts most
often on the calibration text, their rows shared with (gathered from) the target's LM head, none stored twice.
The layer's MLP width is a parameter for the same reason (its cost is overhead on every token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpq.specee.features import K_DRAFT, final_norm

PARAM_NAMES = ("fc", "attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down", "norm")
LINEAR_NAMES = ("fc", "q", "k", "v", "o", "gate", "up", "down")
HEAD = "head"  # the reduced-vocabulary head's name among the quantized linears


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding (the HF convention); x [..., S, heads, D], cos/sin [S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class DraftHead(nn.Module):
    """dims: model width D, heads/kv heads/head_dim as the target, MLP width `inter`; vocab: LongTensor [V]."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, inter: int, eps: float,
                 vocab: torch.Tensor, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.eps = dim, n_heads, n_kv_heads, head_dim, eps

        def lin(o, i):
            return nn.Parameter(torch.randn(o, i, generator=gen) / math.sqrt(i))

        self.fc = lin(dim, 2 * dim)
        self.q, self.k, self.v = lin(n_heads * head_dim, dim), lin(n_kv_heads * head_dim, dim), lin(n_kv_heads * head_dim, dim)
        self.o = nn.Parameter(torch.zeros(dim, n_heads * head_dim))
        self.gate, self.up, self.down = lin(inter, dim), lin(inter, dim), nn.Parameter(torch.zeros(dim, inter))
        self.attn_norm, self.mlp_norm, self.norm = (nn.Parameter(torch.ones(dim)) for _ in range(3))
        self.register_buffer("vocab", vocab.long().clone())
        self.rows: torch.Tensor | None = None  # [V, D] LM-head rows, bound by `bind_rows` (shared, not a parameter)
        self.cache: torch.Tensor | None = None
        self.linears: dict[str, nn.Module] | None = None  # optional replacements (e.g. quantized) for the matmuls

    @property
    def inter(self) -> int:
        return self.gate.shape[0]

    def bind_rows(self, lm_head_weight: torch.Tensor) -> None:
        self.rows = lm_head_weight[self.vocab].to(self.fc.dtype)

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.linears is not None:
            return self.linears[name](x)
        return F.linear(x, getattr(self, name))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Reduced-vocab logits of normed states h [..., D]: through `linears["head"]` where the rows were
        quantized for decoding (padded to whole row tiles; the padding's logits are cut off), else the bound rows."""
        if self.linears is not None and HEAD in self.linears:
            return self.linears[HEAD](h)[..., :self.vocab.numel()]
        return h @ self.rows.t()

    def quantize(self, target_bits: float) -> dict:
        """{name: PackedLinear}: the layer's linears data-free at target_bits (mixed 2/4-bit, as the model's), and
        the head's bound rows in 4-bit, padded with zero rows to whole row tiles. What the GPU decoders run, where
        the draft costs what its bytes cost; the rows are 4-bit throughout since they only rank 4 candidates.
        Raises MpqError where a shape does not fit the format."""
        from mpq.quant.pipeline import quantize_state_dict
        from mpq.quant.recipe import Recipe

        packed, _ = quantize_state_dict({n: getattr(self, n).detach().float().cpu() for n in LINEAR_NAMES}, target_bits)
        rows = self.rows.detach().float().cpu()
        rows = F.pad(rows, (0, 0, 0, -rows.shape[0] % Recipe().tile_rows))
        head, _ = quantize_state_dict({HEAD: rows}, None, overrides={HEAD: 4})
        return {**packed, **head}

    def use_quantized(self, packed: dict, device) -> None:
        """Run the linears and the head from `packed` (`quantize`'s output) on `device` from now on."""
        from mpq.runtime.quant_linear import QuantLinear

        self.linears = {n: QuantLinear(p.to(device)) for n, p in packed.items()}

    def _layer(self, x, cos, sin, attend):
        h = final_norm(x, self.attn_norm, self.eps)
        q = self.lin("q", h).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.lin("k", h).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.lin("v", h).unflatten(-1, (self.n_kv_heads, self.head_dim))
        y = attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
        x = x + self.lin("o", y.flatten(-2))
        h = final_norm(x, self.mlp_norm, self.eps)
        x = x + self.lin("down", F.silu(self.lin("gate", h)) * self.lin("up", h))
        return final_norm(x, self.norm, self.eps)

    def _repeat(self, t):
        r = self.n_heads // self.n_kv_heads
        return t if r == 1 else t.repeat_interleave(r, dim=1)

    def forward(self, h_normed: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Training: h_normed, emb [B, T, D] -> logits over the reduced vocabulary [B, T, V] (causal attention)."""

        def attend(q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), is_causal=True).transpose(1, 2)

        x = self.lin("fc", torch.cat((h_normed, emb), dim=-1))
        return self.head_logits(self._layer(x, cos, sin, attend))

    # ---- decode time -------------------------------------------------------------------------------------
    def setup_cache(self, length: int, device, dtype) -> None:
        self.cache = torch.zeros(2, self.n_kv_heads, length, self.head_dim, device=device, dtype=dtype)

    def step(self, h_normed: torch.Tensor, emb: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rows [S, D] at positions pos..pos+S-1 (prompt or one token) -> reduced-vocab logits of the last [V]."""
        S = h_normed.shape[0]

        def attend(q, k, v):
            self.cache[0, :, pos:pos + S] = k.transpose(0, 1)
            self.cache[1, :, pos:pos + S] = v.transpose(0, 1)
            keys, vals = self.cache[0, :, :pos + S], self.cache[1, :, :pos + S]
            mask = torch.ones(S, pos + S, dtype=torch.bool, device=q.device).tril(pos)
            return F.scaled_dot_product_attention(q.transpose(0, 1), self._repeat(keys[None])[0],
                                                  self._repeat(vals[None])[0], attn_mask=mask).transpose(0, 1)

        x = self.lin("fc", torch.cat((h_normed, emb), dim=-1))
        return self.head_logits(self._layer(x, cos[pos:pos + S], sin[pos:pos + S], attend)[-1])

    def step_at(self, h_normed: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """As `step` for one token at position pos (a LongTensor [1] on the device), with fixed shapes: attention
        over the whole cache with the positions after pos masked, so that a CUDA graph can hold it."""

        def attend(q, k, v):
            self.cache[0].index_copy_(1, pos, k.transpose(0, 1))
            self.cache[1].index_copy_(1, pos, v.transpose(0, 1))
            mask = torch.arange(self.cache.shape[2], device=q.device)[None] <= pos
            return F.scaled_dot_product_attention(q.transpose(0, 1), self._repeat(self.cache[0][None])[0],
                                                  self._repeat(self.cache[1][None])[0], attn_mask=mask).transpose(0, 1)

        x = self.lin("fc", torch.cat((h_normed, emb), dim=-1))
        return self.head_logits(self._layer(x, cos[pos], sin[pos], attend)[-1])

    def fused_layer(self, x_in: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops,
                    counters: torch.Tensor, qkv=None, gate_up=None, cache: torch.Tensor | None = None) -> torch.Tensor:
        """The draft layer through the engine's decode kernels (`ops`: a `SmallOps` whose norms, SwiGLU product and
        fused decode attention are the GPU kernels; counters: int32 zeros [kv heads]) from its input x_in [1, 1, 2D]
        (the normed hidden state, then the next token's embedding): the final-normed state [1, 1, D]. qkv / gate_up:
        a module giving (q, k, v) / (gate, up) in one launch (stacked as the engine stacks its own), else the
        draft's own linears; cache: a KV cache [2, kv heads, length, head dim] other than its own. cos/sin [1, D]
        at pos."""
        x = self.lin("fc", x_in)
        _, h = ops.add_rms_norm(x, None, self.attn_norm, self.eps)
        q, k, v = qkv(h) if qkv is not None else (self.lin(n, h) for n in ("q", "k", "v"))
        q = q.view(1, 1, self.n_heads, self.head_dim)
        k, v = k.view(1, 1, self.n_kv_heads, self.head_dim), v.view(1, 1, self.n_kv_heads, self.head_dim)
        y = ops.decode_attention(q, k, v, cos, sin, (self.cache if cache is None else cache)[:, None], pos, counters)
        x, h = ops.add_rms_norm(x, self.lin("o", y), self.mlp_norm, self.eps)
        gate, up = gate_up(h) if gate_up is not None else (self.lin("gate", h), self.lin("up", h))
        _, h = ops.add_rms_norm(x, self.lin("down", ops.silu_mul(gate, up)), self.norm, self.eps)
        return h

    def step_fused(self, h_normed: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, ops, counters: torch.Tensor) -> torch.Tensor:
        """As `step_at` through `fused_layer`: about 12 launches instead of ~30 small ops and an attention over the
        whole cache."""
        h = self.fused_layer(torch.cat((h_normed, emb), dim=-1).view(1, 1, -1), pos, cos, sin, ops, counters)
        return self.head_logits(h).view(-1)

    def propose(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-4 target-vocabulary ids from reduced-vocab logits, largest first, equal logits in vocabulary order
        (as `kernels.draft_top4`, so that every decoder proposes the same 4 even where logits tie)."""
        return self.vocab[logits.sort(dim=-1, descending=True, stable=True).indices[..., :K_DRAFT]]

    def tensors(self, prefix: str = "specee.draft") -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{n}": getattr(self, n).detach().float().contiguous().clone() for n in PARAM_NAMES}
        out[f"{prefix}.vocab"] = self.vocab.clone()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int, eps: float,
                     prefix: str = "specee.draft") -> "DraftHead":
        q = t[f"{prefix}.q"]
        dim = q.shape[1]
        head = cls(dim, n_heads, n_kv_heads, q.shape[0] // n_heads, t[f"{prefix}.gate"].shape[0], eps, t[f"{prefix}.vocab"])
        with torch.no_grad():
            for n in PARAM_NAMES:
                getattr(head, n).copy_(t[f"{prefix}.{n}"])
        return head.eval()
