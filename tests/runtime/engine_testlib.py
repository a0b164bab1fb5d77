"""Helpers for the engine tests: tiny random Llama/Qwen2 models and round-to-nearest artifacts made from them."""

from __future__ import annotations

import torch

from mpq.quant.format import PackedLinear
from mpq.runtime.model import ModelArgs, Transformer, WeightSource

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(kind: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    base = dict(vocab_size=258, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    base.update(overrides)
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**base)


def tiny_hf_model(config, seed: int = 0):
    """A random HF model with bigger-than-default weights, so that logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.3) + (1.0 if "norm" in name else 0.0))
    return model


def engine_from_hf(hf_model, max_seq_len: int = 128) -> Transformer:
    src = WeightSource(hf_model.state_dict(), device=torch.device("cpu"), dtype=torch.float32)
    model = Transformer(ModelArgs.from_hf_config(hf_model.config.to_dict()), src).eval()
    model.setup_caches(max_seq_len)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rtn_pack(w: torch.Tensor, group_size: int = 32, outliers: int = 1, bias: torch.Tensor | None = None, seed: int = 0) -> PackedLinear:
    """Round-to-nearest asymmetric 2/4-bit packing with half the tiles of each row tile at 4 bits (test data only)."""
    N, K = w.shape
    g, R = group_size, 16
    G, T = K // g, N // R
    gen = torch.Generator().manual_seed(seed)
    tile_bits = torch.full((T, G), 2)
    for t in range(T):
        tile_bits[t, torch.randperm(G, generator=gen)[: G // 2]] = 4
    bits = tile_bits.repeat_interleave(R, dim=0)  # [N, G]
    qmax = (2 ** bits - 1).float()
    wg = w.float().reshape(N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    ss = {b: torch.where(bits == b, scale, 0).amax(-1).clamp_min(1e-8) / 255 for b in (2, 4)}
    ss = {b: v.half().float() for b, v in ss.items()}
    s_row = torch.where(bits == 4, ss[4][:, None], ss[2][:, None])
    codes_s = (scale / s_row).round().clamp(1, 255)
    eff = codes_s * s_row
    zero = (-lo / eff).round().clamp(torch.zeros_like(qmax), qmax)
    q = (wg / eff[..., None]).round().add(zero[..., None]).clamp(torch.zeros_like(wg), qmax[..., None].expand_as(wg))
    err = wg - eff[..., None] * (q - zero[..., None])
    off = err.abs().topk(outliers, dim=-1).indices if outliers else torch.zeros(N, G, 0, dtype=torch.long)
    val = torch.gather(err, -1, off)
    return PackedLinear.pack(codes=q.reshape(N, K).to(torch.uint8), tile_bits=tile_bits, scale_codes=codes_s.to(torch.uint8),
                             zeros=zero.to(torch.uint8), super_scale2=ss[2], super_scale4=ss[4], outlier_offsets=off,
                             outlier_values=val, group_size=g, tile_rows=R, bias=bias)


def rtn_artifact(hf_model, out, tokenizer) -> dict[str, PackedLinear]:
    """Save an artifact of hf_model with every decoder linear RTN-packed; returns the packed linears."""
    from mpq.artifact import save_artifact

    sd = hf_model.state_dict()
    cfg = hf_model.config
    linears, floats = {}, {}
    for i in range(cfg.num_hidden_layers):
        for s in LINEAR_SUFFIXES:
            fqn = f"model.layers.{i}.{s}"
            linears[fqn] = rtn_pack(sd[f"{fqn}.weight"], bias=sd.get(f"{fqn}.bias"), seed=i)
    for name, t in sd.items():
        if name.rsplit(".", 1)[0] not in linears and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            floats[name] = t.half()
    config = dict(cfg.to_dict(), quantization_config={"quant_method": "mpq", "note": "test RTN"})
    save_artifact(out, config=config, tokenizer=tokenizer, linears=linears, floats=floats, manifest={})
    return linears
