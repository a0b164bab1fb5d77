"""The exit decoder's layer loop against the engine, and KV filling against a reference built from the engine's
own linears (float and quantized artifacts)."""

import pytest
import torch

from engine_testlib import engine_from_hf, rtn_artifact, tiny_config, tiny_hf_model
from mpq.runtime.generate import Generator
from mpq.runtime.model import SmallOps
from mpq.specee.decode import ExitDecoder


@pytest.fixture(scope="module")
def float_model():
    hf = tiny_hf_model(tiny_config(num_hidden_layers=4), seed=3)
    return engine_from_hf(hf)


def _quant_engine(tmp_path_factory, byte_tokenizer, device: str):
    from mpq.runtime.loader import load_engine

    hf = tiny_hf_model(tiny_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256), seed=4)
    out = tmp_path_factory.mktemp("art") / "a"
    rtn_artifact(hf, out, byte_tokenizer)
    return load_engine(str(out), device).model


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory, byte_tokenizer):
    return _quant_engine(tmp_path_factory, byte_tokenizer, "cpu")


@pytest.fixture(scope="module")
def quant_model_cuda(tmp_path_factory, byte_tokenizer):
    """The same kind of artifact on the GPU: k/v are Triton-kernel linears, so the fill takes its GPU path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _quant_engine(tmp_path_factory, byte_tokenizer, "cuda")


def test_full_depth_loop_reproduces_the_engine(float_model):
    prompt = list(range(30, 50))
    want = Generator(float_model, 64).generate(prompt, 16).tokens
    got, stats, _ = ExitDecoder(float_model, None, 64, exits=False).generate(prompt, 16)
    assert got == want
    assert stats.mean_layers == 4 and stats.tokens == 15


def _decode_rest(dec, tokens, start):
    """Full-depth logits of tokens fed at positions start, start+1, ..."""
    model, out = dec.model, []
    for k, tok in enumerate(tokens):
        pos = torch.tensor([start + k], device=model.device)
        mask = model.causal[pos].view(1, 1, 1, -1)
        x = model.embed[tok].view(1, 1, -1)
        for i in range(dec.L):
            x = dec.run_layer(i, x, pos, mask, SmallOps())
        out.append(model.output(model.norm * torch.nn.functional.rms_norm(x.view(-1), (x.shape[-1],), eps=model.args.norm_eps)))
    return torch.stack(out)


def _reference_fill(model, x, pos, first):
    """What the skipped layers would have written at pos, each layer's own q/k/v linears applied to its attention
    norm of the exit state, rotated by the engine's own rope."""
    ops = SmallOps()
    a = model.args
    for layer in model.layers[first:]:
        _, h = ops.add_rms_norm(x, None, layer.attn_norm, a.norm_eps)
        k, v, q = layer.kvq(h)
        _, kv = ops.rope(q.view(1, 1, a.n_heads, a.head_dim), k.view(1, 1, a.n_kv_heads, a.head_dim),
                         v.view(1, 1, a.n_kv_heads, a.head_dim), model.rope_cos[pos], model.rope_sin[pos])
        layer.kv_cache.update(pos, kv)


@pytest.mark.parametrize("which", ["float_model", "quant_model", "quant_model_cuda"])
@pytest.mark.parametrize("exit_after", [1, 2])
def test_forced_exit_then_continue_matches_reference_fill(request, which, exit_after):
    model = request.getfixturevalue(which)
    prompt, rest = list(range(60, 80)), [7, 99, 150, 3]
    results = []
    for fill in ("decoder", "reference", "none"):
        dec = ExitDecoder(model, None, 64, exits=False)
        dec._prefill(prompt)
        t = len(prompt)
        pos = torch.tensor([t], device=model.device)
        mask = model.causal[pos].view(1, 1, 1, -1)
        x = model.embed[42].view(1, 1, -1)
        for i in range(exit_after):  # the forced exit: token 42 at position t runs `exit_after` layers only
            x = dec.run_layer(i, x, pos, mask, SmallOps())
        if fill == "decoder":
            dec.fill_kv(x, pos, exit_after)
        elif fill == "reference":
            _reference_fill(model, x, pos, exit_after)
        else:
            for layer in model.layers[exit_after:]:
                layer.kv_cache.kv[:, :, :, t].zero_()
        results.append(_decode_rest(dec, rest, t + 1))
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol)
    assert (results[0] - results[2]).abs().max() > 10 * tol  # the filled entries matter: the check can fail


def test_drop_mode_masks_the_skipped_positions(float_model):
    dec = ExitDecoder(float_model, None, 64, mode="drop", exits=False)
    dec._prefill(list(range(60, 80)))
    dec.dropped[2:, 19] = float("-inf")  # position 19 dropped from layers 2 and 3
    for layer in float_model.layers[2:]:
        layer.kv_cache.kv[:, :, :, 19].normal_()  # whatever is there must not matter
    a = _decode_rest(dec, [5, 6], 20)
    for layer in float_model.layers[2:]:
        layer.kv_cache.kv[:, :, :, 19].normal_()
    b = _decode_rest(dec, [5, 6], 20)
    torch.testing.assert_close(a, b)


def test_run_decodes_with_exits_when_greedy(monkeypatch, capsys):
    """`mpq run` on an artifact with predictors reaches the exit decoder on CUDA (one graph a token) and on the
    CPU when greedy; sampling decodes at full depth in the engine and says why."""
    from types import SimpleNamespace

    import mpq.specee.bundle as bundle
    from mpq.runtime.generate import Sampling
    from mpq.specee.decode import run_with_exits

    monkeypatch.setattr(bundle, "has_specee", lambda path: True)
    reached = []

    def fake_load(path, config=None):
        reached.append(path)
        raise RuntimeError("exit decoder reached")

    monkeypatch.setattr(bundle, "load_specee", fake_load)
    engine = SimpleNamespace(kind="artifact", model=SimpleNamespace(device=torch.device("cuda")), config={})
    gen, info = run_with_exits(engine, "art", [1, 2], 4, Sampling(0.7, 1.0), set(), None, None)
    assert gen is None and "greedy-only" in info["reason"] and not reached
    assert "greedy-only" in capsys.readouterr().err
    for dev in ("cuda", "cpu"):
        engine.model.device = torch.device(dev)
        with pytest.raises(RuntimeError, match="exit decoder reached"):
            run_with_exits(engine, "art", [1, 2], 4, Sampling(0.0, 1.0), set(), None, None)
    assert len(reached) == 2
