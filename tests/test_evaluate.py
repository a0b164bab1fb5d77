"""Perplexity / KLD evaluation and the dequantizing reference path (artifact -> transformers model)."""

import copy
import json
import math

import pytest
import torch

from mpq.artifact import load_artifact, save_artifact
from mpq.errors import MpqError
from mpq.evaluate import EvalOptions, compare_logits, evaluate, perplexity, resolve_device
from mpq.quant.format import PackedLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(seed=0, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform outputs; widen it so logits differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def byte_alphabet():
    """GPT-2's byte -> printable-char map, in byte order (ByteLevel.alphabet() comes in random order)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def rtn_pack(w, group_size=32, tile_rows=16, outliers=1):
    """Round-to-nearest asymmetric codes (half the tiles 4-bit, the rest 2-bit + outliers), packed in format v1.

    Returns (packed, the dense dequantized weight computed here independently of PackedLinear.dequantize).
    """
    N, K = w.shape
    G, T = K // group_size, N // tile_rows
    gen = torch.Generator().manual_seed(N * K)
    tile_bits = torch.full((T, G), 2)
    for t in range(T):
        tile_bits[t, torch.randperm(G, generator=gen)[: G // 2]] = 4
    bits = tile_bits.repeat_interleave(tile_rows, dim=0)  # [N, G]
    maxq = (2**bits - 1).float()
    wg = w.float().view(N, G, group_size)
    lo, hi = wg.min(-1).values, wg.max(-1).values
    raw = ((hi - lo) / maxq).clamp_min(1e-6)
    supers = {}
    for b in (2, 4):
        m = torch.where(bits == b, raw, torch.zeros_like(raw)).max(1).values / 255
        supers[b] = torch.where(m > 0, m, torch.full_like(m, 1e-4)).half().float()
    ss = torch.where(bits == 4, supers[4].unsqueeze(1), supers[2].unsqueeze(1))
    s_code = (raw / ss).round().clamp(1, 255)
    scale = ss * s_code
    zero = (-lo / scale).round().clamp(torch.zeros_like(maxq), maxq)
    codes = ((wg / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)).clamp(torch.zeros_like(wg), maxq.unsqueeze(-1))
    deq = scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))
    err = wg - deq
    off = err.abs().topk(outliers, dim=-1).indices  # [N, G, k]
    val = torch.gather(err, -1, off).half()
    val = torch.where((bits == 2).unsqueeze(-1), val, torch.zeros_like(val))
    deq = deq.scatter_add(-1, off, val.float())
    packed = PackedLinear.pack(codes=codes.to(torch.uint8).view(N, K), tile_bits=tile_bits, scale_codes=s_code.to(torch.uint8),
                               zeros=zero.to(torch.uint8), super_scale2=supers[2], super_scale4=supers[4],
                               outlier_offsets=off.to(torch.uint8), outlier_values=val, group_size=group_size, tile_rows=tile_rows)
    return packed, deq.view(N, K)


def make_artifact(model, out, tokenizer=None):
    """Quantize every decoder linear of `model` with RTN and save an artifact; return the dense weights used."""
    linears, dense = {}, {}
    for name, mod in model.named_modules():
        if any(name.endswith(s) for s in LINEARS):
            linears[name], dense[name] = rtn_pack(mod.weight.detach())
    floats = {n: t.detach().half() for n, t in model.state_dict().items()
              if not any(n == f"{q}.weight" for q in linears) and not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    config = dict(model.config.to_dict(), quantization_config={"quant_method": "mpq", "format_version": 1})
    save_artifact(out, config=config, tokenizer=tokenizer, linears=linears, floats=floats, manifest={"source": "tiny"})
    return dense


def dense_copy(model, dense):
    """The float model with the given dense weights (and fp16-rounded floats, as stored in the artifact)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(p.half().float())
        for name, mod in m.named_modules():
            if name in dense:
                mod.weight.copy_(dense[name])
    return m


def direct_ppl(model, windows):
    """Perplexity written out the long way: per-token NLLs, one window at a time."""
    nlls = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            for t in range(len(w) - 1):
                nlls.append(-logp[t, w[t + 1]].item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "tiny-mpq"
    dense = make_artifact(tiny, path, byte_tokenizer())
    return path, dense


def test_perplexity_equals_direct_computation(tiny, windows):
    want, n = direct_ppl(tiny, windows)
    for bs in (1, 2, 5):
        got, tokens = perplexity(tiny, windows, batch_size=bs)
        assert tokens == n == 5 * 23
        assert got == pytest.approx(want, rel=1e-5)
    assert 1.0 < want < 1000


def test_kld_of_model_against_itself_is_zero(tiny, windows):
    r = compare_logits(tiny, tiny, windows)
    assert r["kld"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0 and r["ppl_ratio"] == pytest.approx(1.0) and r["tokens"] == 5 * 23
    assert r["ppl"] == pytest.approx(perplexity(tiny, windows)[0], rel=1e-6)


def test_kld_of_perturbed_model_matches_direct_kl(tiny, windows):
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.add_(0.2 * torch.randn_like(other.model.layers[0].mlp.down_proj.weight))
    r = compare_logits(other, tiny, windows, batch_size=2)
    with torch.no_grad():
        p = torch.log_softmax(tiny(windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(windows).logits[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert r["kld"] > 1e-3
    assert r["kld"] == pytest.approx(kl, rel=1e-4)
    assert r["top1_agreement"] == pytest.approx(top1)
    assert r["ppl_ratio"] == pytest.approx(perplexity(other, windows)[0] / perplexity(tiny, windows)[0], rel=1e-5)


def test_compare_streams_one_batch_at_a_time(tiny, windows):
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            seen.append(input_ids.shape[0])
            return self.inner(input_ids=input_ids, **kw)

    r1 = compare_logits(tiny, Recording(tiny_llama(seed=7)), windows, batch_size=1)
    assert seen == [1] * 5
    seen.clear()
    r5 = compare_logits(tiny, Recording(tiny_llama(seed=7)), windows, batch_size=2)
    assert seen == [2, 2, 1]
    for k in ("kld", "top1_agreement", "ppl", "ref_ppl"):
        assert r1[k] == pytest.approx(r5[k], rel=1e-5)
    assert r1["kld"] > 0.01


def test_artifact_to_hf_model_uses_dequantized_weights(tiny, artifact, windows):
    from mpq.dequantize import artifact_to_hf_model

    path, dense = artifact
    art = load_artifact(path)
    model = artifact_to_hf_model(art)
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    want = dense_copy(tiny, dense)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, want(windows).logits, rtol=1e-4, atol=1e-4)
        assert (model(windows).logits - tiny(windows).logits).abs().max() > 1e-3  # RTN did change the model
    r = compare_logits(model, tiny, windows)
    assert r["kld"] > 0 and r["top1_agreement"] < 1


def test_evaluate_artifact_and_float_reference(tiny, artifact, tmp_path):
    from mpq.calib.data import eval_windows
    from mpq.dequantize import artifact_to_hf_model

    path, _ = artifact
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(32 + (i * 7) % 90) for i in range(400)))
    r = evaluate(EvalOptions(model=str(path), dataset=str(text), windows=3, seq_len=40, device="cpu"))
    art = load_artifact(path)
    assert r["kind"] == "artifact" and r["tokens"] == 3 * 39
    assert r["bits_per_weight"] == pytest.approx(art.bits_per_weight) and 2 < r["bits_per_weight"] < 5
    w = eval_windows(str(text), byte_tokenizer(), 3, 40)
    assert r["ppl"] == pytest.approx(perplexity(artifact_to_hf_model(art), w)[0], rel=1e-6)

    ref_dir = tmp_path / "float"
    tiny.save_pretrained(ref_dir)
    byte_tokenizer().save_pretrained(ref_dir)
    f = evaluate(EvalOptions(model=str(ref_dir), dataset=str(text), windows=3, seq_len=40, device="cpu"))
    assert f["kind"] == "float" and f["bits_per_weight"] == 16.0
    c = evaluate(EvalOptions(model=str(path), dataset=str(text), windows=3, seq_len=40, reference=str(ref_dir), device="cpu"))
    assert c["ppl"] == pytest.approx(r["ppl"], rel=1e-6) and c["ref_ppl"] == pytest.approx(f["ppl"], rel=1e-6)
    assert c["ppl_ratio"] == pytest.approx(r["ppl"] / f["ppl"], rel=1e-6) and c["kld"] > 0 and 0 < c["top1_agreement"] <= 1


def test_cuda_requested_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MpqError, match="^CUDA requested but no GPU is available$"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(MpqError, match="unknown device"):
        resolve_device("tpu")


def test_cli_dequantize_and_eval(tiny, artifact, tmp_path, windows):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from mpq.cli import app
    from mpq.dequantize import artifact_to_hf_model

    path, _ = artifact
    out = tmp_path / "plain"
    res = CliRunner().invoke(app, ["dequantize", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = artifact_to_hf_model(load_artifact(path))
    with torch.no_grad():
        a, b = loaded(windows).logits, ref(windows).logits
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2)  # fp16 storage of the dequantized weights
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.98
    assert AutoTokenizer.from_pretrained(out).decode([72, 105]) == "Hi"

    again = CliRunner().invoke(app, ["dequantize", str(path), "--out", str(out)])
    assert again.exit_code == 2 and again.output.strip().startswith("error: output folder exists")
    assert len(again.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["dequantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "artifact folder not found" in missing.output

    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 30)
    ev = CliRunner().invoke(app, ["eval", str(path), "--dataset", str(text), "--windows", "2", "--seq-len", "50", "--json", "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    last = json.loads(ev.output.strip().splitlines()[-1])
    assert last["tokens"] == 98 and math.isfinite(last["ppl"])
    bad = CliRunner().invoke(app, ["eval", str(path), "--dataset", str(text), "--windows", "20", "--seq-len", "50"])
    assert bad.exit_code == 2 and "300 tokens: 6 windows of 50 fit, 20 requested" in bad.output


@pytest.mark.slow
def test_smollm2_hamlet_perplexity():
    """The real model on the evaluation text: 2 x 128 tokens of Hamlet (the full protocol gives ppl ~41.9)."""
    from mpq.calib.data import eval_windows
    from mpq.models import load_float_model, load_tokenizer, resolve_model

    src = resolve_model("smollm2-135m")
    tok = load_tokenizer(src)
    w = eval_windows("shakespeare:hamlet", tok, windows=2, seq_len=128)
    assert tok.decode(w[0, :5]).startswith("HAMLET")
    ppl, tokens = perplexity(load_float_model(src), w, batch_size=2)
    assert tokens == 254
    assert math.isfinite(ppl) and 5 < ppl < 200


@pytest.mark.slow
def test_loading_the_gguf_model_prints_nothing_of_transformers(capfd):
    """The GGUF reader's own tqdm bar and its "pass dtype=float32" advice (which an mpq user cannot act on) stay
    out of mpq's output; both are back once the load is done, and the model is the same."""
    import logging

    import transformers.modeling_gguf_pytorch_utils as reader

    from mpq.models import load_float_model, resolve_model

    bar = reader.tqdm
    model = load_float_model(resolve_model("smollm2-135m"), torch.bfloat16)
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "fastest in float32" not in err
    assert reader.tqdm is bar and not logging.getLogger("transformers.quantizers.quantizer_gguf").filters
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16

