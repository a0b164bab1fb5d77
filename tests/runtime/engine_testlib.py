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


def rtn_pack(w: torch.Tensor, group_size: int = 32, outliers: int = 1, bias: torch.Tensor | None = None, seed: int = 0,
             n4: int | None = None) -> PackedLinear:
    """The data-free quantizer (round to nearest on clipped grids) with n4 (default: half) of the tiles of each row
    tile at 4 bits."""
    from mpq.quant.quantizer import LinearSpec, quantize_linear

    N, K = w.shape
    G, T = K // group_size, N // 16
    gen = torch.Generator().manual_seed(seed)
    is4 = torch.zeros(T, G, dtype=torch.bool)
    for t in range(T):
        is4[t, torch.randperm(G, generator=gen)[: G // 2 if n4 is None else n4]] = True
    return quantize_linear(w.float(), None, LinearSpec(is4, outliers, group_size, 16), bias=bias).packed


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


def random_packed_layers(hf_model, ss2: float, ss4: float, ov: float) -> tuple[dict, dict]:
    """(packed, floats) for hf_model with every decoder linear a random format-v1 layer of 128-column groups
    (`mpq.bench.kernels.random_layer`), its 2-bit / 4-bit super-scales and outliers multiplied by ss2 / ss4 / ov so
    that the weights stay small; floats: the rest of its state dict."""
    import dataclasses

    from mpq.bench.kernels import random_layer

    sd = hf_model.state_dict()
    packed = {}
    for i in range(hf_model.config.num_hidden_layers):
        for s in LINEAR_SUFFIXES:
            n, k = sd[f"model.layers.{i}.{s}.weight"].shape
            p = random_layer(n, k, 1, "cpu", seed=10 * i + len(s))
            packed[f"model.layers.{i}.{s}"] = dataclasses.replace(p, ss2=p.ss2 * ss2, ss4=p.ss4 * ss4, ov=p.ov * ov)
    return packed, {name: t for name, t in sd.items() if name.rsplit(".", 1)[0] not in packed}


def record_in_place_adds(monkeypatch) -> list[bool]:
    """What each `QuantLinear.add_into` call returned (True: it added in place), in order."""
    from mpq.runtime.quant_linear import QuantLinear

    added = []
    add_into = QuantLinear.add_into
    monkeypatch.setattr(QuantLinear, "add_into", lambda self, x, acc: added.append(add_into(self, x, acc)) or added[-1])
    return added
