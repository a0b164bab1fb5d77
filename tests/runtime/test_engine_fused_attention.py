"""The engine's one-token steps through its GPU kernels (Triton interpreter on the CPU, fp32): the fused decode
attention (its wiring in `Block.attention`: the KV cache, its counters, the drop-mode bias) and the small-op
kernels of `kernels.step_ops`, against the eager path."""

import os

import pytest
import torch

from engine_testlib import engine_from_hf, tiny_config, tiny_hf_model
from mpq.runtime.generate import Generator
from mpq.runtime.model import SmallOps

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the Triton kernel on CPU tensors (TRITON_INTERPRET=1, as scripts/test.sh sets)",
                allow_module_level=True)

from kernels import step_ops  # noqa: E402
from kernels.decode_attention import decode_attention  # noqa: E402


def test_greedy_decode_with_the_step_kernels_matches_transformers_generate():
    hf = tiny_hf_model(tiny_config(num_attention_heads=4, num_key_value_heads=2), seed=11)
    hf.generation_config.eos_token_id = None
    model = engine_from_hf(hf)
    calls = []

    def counted(*args, **kw):
        calls.append(1)
        return decode_attention(*args, **kw)

    # prefill keeps the eager ops; decode steps run the kernels compile_small_ops puts in on CUDA (rotations aside)
    model.ops = SmallOps(add_rms_norm=step_ops.add_rms_norm, silu_mul=step_ops.silu_mul, decode_attention=counted)
    prompt = torch.randint(0, 258, (1, 21), generator=torch.Generator().manual_seed(2))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 21:].tolist()
    assert Generator(model, 80).generate(prompt[0].tolist(), 12).tokens == want
    assert len(calls) == 11 * model.args.n_layers  # every layer of every decode step


def test_drop_bias_matches_sdpa_under_the_same_mask():
    """SpecEE's drop mode: the layer's skipped positions as a bias of the fused kernel, against SDPA with the
    causal mask plus those positions."""
    model = engine_from_hf(tiny_hf_model(tiny_config(num_attention_heads=4, num_key_value_heads=2), seed=12))
    model.setup_caches(64)
    layer, p = model.layers[0], 40
    layer.kv_cache.kv.normal_(generator=torch.Generator().manual_seed(3))
    h = torch.randn(1, 1, model.args.dim, generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([p])
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    dropped = torch.zeros(64)
    dropped[torch.randperm(p, generator=torch.Generator().manual_seed(5))[:15]] = float("-inf")
    mask = (model.causal[pos] + dropped).view(1, 1, 1, 64)
    saved = layer.kv_cache.kv.clone()
    with torch.no_grad():
        want = layer.attention(h, pos, cos, sin, mask, SmallOps())
        layer.kv_cache.kv.copy_(saved)
        got = layer.attention(h, pos, cos, sin, None, SmallOps(decode_attention=decode_attention),
                              causal_prefix=True, dropped=dropped)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert not layer.kv_cache.counters.any()
