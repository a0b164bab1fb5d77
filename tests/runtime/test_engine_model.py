"""The engine's decoder against transformers' forward on tiny random models, float and quantized."""

import pytest
import torch

from engine_testlib import engine_from_hf, rel_err, rtn_artifact, rtn_pack, tiny_config, tiny_hf_model
from mpq.errors import MpqError
from mpq.runtime.model import ModelArgs, SplitLinears, Transformer, WeightSource, weight_bytes
from mpq.runtime.quant_linear import StackedQuantLinear

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "llama-gqa-llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    kind, overrides = CONFIGS[name]
    hf = tiny_hf_model(tiny_config(kind, **overrides))
    if kind == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None  # the bias path is really exercised
    model = engine_from_hf(hf)
    ids = torch.randint(0, 258, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, torch.arange(100))
    assert rel_err(out, ref) < 1e-3


def test_incremental_decode_matches_full_forward():
    """Prefill part of a sequence, feed the rest one token at a time through the KV cache: same logits."""
    model = engine_from_hf(tiny_hf_model(tiny_config(rope_scaling=LLAMA3_ROPE)))
    ids = torch.randint(0, 258, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, torch.arange(40))
        steps = [model(ids[:, :30], torch.arange(30))[:, -1]]
        steps += [model(ids[:, p:p + 1], torch.tensor([p]))[:, -1] for p in range(30, 40)]
    assert rel_err(torch.stack(steps[1:], 1), full[:, 30:40]) < 1e-5
    assert rel_err(steps[0], full[:, 29]) < 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope type"),
    (dict(model_type="gpt2"), "architecture"),
    (dict(hidden_act="gelu"), "activation"),
])
def test_unsupported_configs_are_refused(change, message):
    cfg = dict(tiny_config().to_dict(), **change)
    with pytest.raises(MpqError, match=message):
        ModelArgs.from_hf_config(cfg)


def test_context_longer_than_the_model_is_refused():
    model = engine_from_hf(tiny_hf_model(tiny_config()))
    with pytest.raises(MpqError, match="context"):
        model.setup_caches(257)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_artifact_logits_match_dequantized_reference(kind, tmp_path, byte_tokenizer):
    """Engine on a saved artifact == transformers with each linear replaced by its reference dequantization."""
    from mpq.artifact import load_artifact

    hf = tiny_hf_model(tiny_config(kind))
    packed = rtn_artifact(hf, tmp_path / "art", byte_tokenizer)
    art = load_artifact(tmp_path / "art")
    model = Transformer(ModelArgs.from_hf_config(art.config),
                        WeightSource(art.floats, art.linears, device=torch.device("cpu"), dtype=torch.float32)).eval()
    model.setup_caches(64)
    with torch.no_grad():
        for fqn, p in packed.items():
            hf.get_submodule(fqn).weight.copy_(p.dequantize())
            if p.bias is not None:
                hf.get_submodule(fqn).bias.copy_(p.bias.float())
        for name, t in art.floats.items():
            hf.get_parameter(name).copy_(t.float())
        ids = torch.randint(0, 258, (1, 50), generator=torch.Generator().manual_seed(3))
        ref, out = hf(ids).logits, model(ids, torch.arange(50))
    assert rel_err(out, ref) < 1e-3
    # the RTN layouts match within each shared-input set, so each set runs as one stacked linear
    assert all(isinstance(m, StackedQuantLinear) for layer in model.layers for m in (layer.kvq, layer.gate_up))
    float_model = engine_from_hf(tiny_hf_model(tiny_config(kind)))
    assert weight_bytes(model) < weight_bytes(float_model) / 2  # packed linears, fp32 for the rest


def test_engine_on_the_data_free_quantizer_matches_its_dequantization():
    """The bench's path (quantize_state_dict, as `--calib none`) feeds the engine the weights the quantizer meant."""
    from mpq.bench.e2e import quantized_source

    hf = tiny_hf_model(tiny_config(intermediate_size=256))  # group sizes must divide every input dimension
    src = quantized_source(hf.state_dict(), 2, torch.device("cpu"), torch.float32, target_bits=3.0)
    assert len(src.packed) == 14
    model = Transformer(ModelArgs.from_hf_config(hf.config.to_dict()), src).eval()
    model.setup_caches(32)
    with torch.no_grad():
        for fqn, p in src.packed.items():
            hf.get_submodule(fqn).weight.copy_(p.dequantize())
        ids = torch.randint(0, 258, (1, 32), generator=torch.Generator().manual_seed(4))
        assert rel_err(model(ids, torch.arange(32)), hf(ids).logits) < 1e-3


def test_stacked_and_split_quantized_linears_give_the_same_logits(tmp_path, byte_tokenizer):
    """Stacking is a runtime layout only: the engine with each set stacked equals the one with its parts apart, and
    a set whose layouts differ falls back to separate parts."""
    from mpq.artifact import load_artifact

    hf = tiny_hf_model(tiny_config("llama"))
    rtn_artifact(hf, tmp_path / "art", byte_tokenizer)
    art = load_artifact(tmp_path / "art")
    ids = torch.randint(0, 258, (1, 20), generator=torch.Generator().manual_seed(5))
    logits = []
    for stack in (True, False):
        src = WeightSource(art.floats, art.linears, device=torch.device("cpu"), dtype=torch.float32, stack=stack)
        model = Transformer(ModelArgs.from_hf_config(art.config), src).eval()
        assert isinstance(model.layers[0].kvq, StackedQuantLinear if stack else SplitLinears)
        model.setup_caches(32)
        with torch.no_grad():
            logits.append(model(ids, torch.arange(20)))
    assert rel_err(logits[0], logits[1]) < 1e-5
    # layer 0's q with two outliers per group: k/v still stack, q runs beside them; layer 1 stays one stack
    linears = dict(art.linears)
    linears["model.layers.0.self_attn.q_proj"] = rtn_pack(hf.state_dict()["model.layers.0.self_attn.q_proj.weight"], outliers=2)
    src = WeightSource(art.floats, linears, device=torch.device("cpu"), dtype=torch.float32)
    model = Transformer(ModelArgs.from_hf_config(art.config), src)
    kvq = model.layers[0].kvq
    assert isinstance(kvq, SplitLinears) and isinstance(kvq.parts[0], StackedQuantLinear)
    assert isinstance(model.layers[1].kvq, StackedQuantLinear)
    h = torch.randn(3, 64)
    with torch.no_grad():
        k, v, q = kvq(h)
        for lead in (kvq.leading(2), model.layers[1].kvq.leading(2)):
            assert isinstance(lead, StackedQuantLinear) and len(lead.splits) == 2
        lk, lv = kvq.leading(2)(h)
    assert torch.equal(lk, k) and torch.equal(lv, v) and q.shape == (3, 64)


def test_linears_differing_only_in_n4_form_a_ragged_stack():
    """Quantized linears with one input that differ in their 4-bit tile count (16-row tiles, g = 128) become one
    ragged stack, also with another outlier count where zero outliers for the others add little (q here, one
    outlier short): on the reference path its outputs equal the parts' own, bias included; its leading parts are a
    ragged stack again (or the one linear); a part whose count would cost many zero outliers stays beside it, and
    stack=False keeps all apart."""
    from mpq.runtime.quant_linear import QuantLinear, RaggedQuantLinear

    gen = torch.Generator().manual_seed(9)
    shapes = {"k": (32, 1, 1), "v": (48, 0, 1), "q": (64, 2, 0), "o": (16, 1, 4)}  # rows, n4, outliers
    packed = {f: rtn_pack(torch.randn(n, 384, generator=gen), 128, outliers=ko, n4=n4, seed=i,
                          bias=torch.randn(n, generator=gen) if f == "v" else None)
              for i, (f, (n, n4, ko)) in enumerate(shapes.items())}
    assert [(packed[f].n4, packed[f].outliers) for f in shapes] == [(1, 1), (0, 1), (2, 0), (1, 4)]
    src = WeightSource({}, packed, device=torch.device("cpu"), dtype=torch.float32)
    h = torch.randn(2, 3, 384, generator=gen)
    want = {f: torch.nn.functional.linear(h, p.dequantize(), None if p.bias is None else p.bias.float())
            for f, p in packed.items()}
    ragged = src.linears(["k", "v", "q"])
    assert isinstance(ragged, RaggedQuantLinear) and ragged.part_slots == ((2, 2, 1), (3, 3, 0), (4, 1, 2))
    assert ragged.geometry["outliers"] == 1
    with torch.no_grad():
        for got, f in zip(ragged(h), "kvq"):
            assert rel_err(got, want[f]) < 1e-6
        lead = ragged.leading(2)
        assert isinstance(lead, RaggedQuantLinear) and isinstance(ragged.leading(1), QuantLinear)
        for got, f in zip(lead(h), "kv"):
            assert rel_err(got, want[f]) < 1e-6
    split = src.linears(["k", "v", "q", "o"])
    assert isinstance(split, SplitLinears) and isinstance(split.parts[0], RaggedQuantLinear)
    assert isinstance(split.parts[1], QuantLinear) and not isinstance(split.parts[1], RaggedQuantLinear)
    apart = WeightSource({}, packed, device=torch.device("cpu"), dtype=torch.float32, stack=False)
    assert isinstance(apart.linears(["k", "v", "q"]), SplitLinears)
