"""The engine on CUDA (skipped without a GPU): fp16 against the fp32 CPU reference, graph == eager, compiled ops."""

import pytest
import torch

from engine_testlib import engine_from_hf, rel_err, rtn_artifact, tiny_config, tiny_hf_model
from mpq.runtime.generate import Generator, Sampling
from mpq.runtime.model import ModelArgs, SmallOps, Transformer, WeightSource

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
CUDA = torch.device("cuda")


def cuda_engine(hf, max_seq_len=128, packed=None, floats=None) -> Transformer:
    floats = hf.state_dict() if floats is None else floats
    model = Transformer(ModelArgs.from_hf_config(hf.config.to_dict()),
                        WeightSource(floats, packed, device=CUDA, dtype=torch.float16)).eval()
    model.setup_caches(max_seq_len)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fp16_logits_match_fp32_reference(kind):
    hf = tiny_hf_model(tiny_config(kind, **CFG))
    ids = torch.randint(0, 258, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = engine_from_hf(hf)(ids, torch.arange(64))
        out = cuda_engine(hf)(ids.cuda(), torch.arange(64, device=CUDA))
    assert rel_err(out.float().cpu(), ref) < 1e-2


def test_graph_replay_equals_eager_and_compiled_ops_agree():
    hf = tiny_hf_model(tiny_config(**CFG))
    model = cuda_engine(hf)
    prompt = list(range(30, 60))
    eager = Generator(model, 96, use_graph=False).generate(prompt, 40).tokens
    graph = Generator(model, 96).generate(prompt, 40).tokens
    assert graph == eager
    tok, pos = torch.tensor([[7]], device=CUDA), torch.tensor([30], device=CUDA)
    with torch.no_grad():
        plain = model(tok, pos)
        model.compile_small_ops()
        fused = model(tok, pos)
    model.ops = SmallOps()
    assert rel_err(fused.float(), plain.float()) < 5e-3


def test_seeded_sampling_replays_identically():
    model = cuda_engine(tiny_hf_model(tiny_config(**CFG)))
    gen = Generator(model, 96)
    s = Sampling(temperature=1.0, top_p=0.9)
    a, b = gen.generate(list(range(20)), 40, s, seed=3).tokens, gen.generate(list(range(20)), 40, s, seed=3).tokens
    assert a == b and a != gen.generate(list(range(20)), 40, s, seed=4).tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_quantized_engine_matches_cpu_reference(kind, tmp_path, byte_tokenizer):
    """The Triton kernels inside the engine (prefill, then graph-replayed GEMV decode) against the CPU reference."""
    from mpq.artifact import load_artifact

    hf = tiny_hf_model(tiny_config(kind, **CFG))
    rtn_artifact(hf, tmp_path / "art", byte_tokenizer)
    art = load_artifact(tmp_path / "art")
    ref = Transformer(ModelArgs.from_hf_config(art.config),
                      WeightSource(art.floats, art.linears, device=torch.device("cpu"), dtype=torch.float32)).eval()
    ref.setup_caches(128)
    model = cuda_engine(hf, packed=art.linears, floats=art.floats)
    ids = torch.randint(0, 258, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids, torch.arange(80)), model(ids.cuda(), torch.arange(80, device=CUDA))
        assert rel_err(got.float().cpu(), want) < 1e-2  # prefill: M = 80
        tok = torch.tensor([[5]])
        step_want, step_got = ref(tok, torch.tensor([80])), model(tok.cuda(), torch.tensor([80], device=CUDA))
        assert rel_err(step_got.float().cpu(), step_want) < 1e-2  # decode: M = 1
    prompt = ids[0].tolist()
    graph = Generator(model, 128).generate(prompt, 24).tokens
    assert graph == Generator(model, 128, use_graph=False).generate(prompt, 24).tokens


def test_programmatic_dependent_launch_changes_no_token(tmp_path, byte_tokenizer):
    """With PDL (sm_90+) each GEMV and compiled small op launches while the kernel before it runs and waits for its
    output on the device; a missing wait would read a stale activation. The graph-replayed decode, small ops
    compiled, must give the same tokens and logits as with every launch in plain stream order."""
    from kernels import dispatch
    from mpq.artifact import load_artifact

    if not dispatch.pdl_enabled(CUDA):
        pytest.skip("programmatic dependent launch needs sm_90+")
    hf = tiny_hf_model(tiny_config(**CFG))
    rtn_artifact(hf, tmp_path / "art", byte_tokenizer)
    art = load_artifact(tmp_path / "art")
    prompt = list(range(40, 90))
    runs = []
    for pdl in (True, False):
        dispatch.PDL = pdl
        try:
            torch._dynamo.reset()
            model = cuda_engine(hf, packed=art.linears, floats=art.floats)
            model.compile_small_ops()
            gen = Generator(model, 128)
            runs.append(gen.generate(prompt, 48).tokens)
        finally:
            dispatch.PDL = True
    assert runs[0] == runs[1]


def test_run_cli_on_cuda(tmp_path, byte_tokenizer):
    import json

    from typer.testing import CliRunner

    from mpq.cli import app

    rtn_artifact(tiny_hf_model(tiny_config(**CFG)), tmp_path / "art", byte_tokenizer)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "art"), "--prompt", "hi", "--max-new-tokens", "20", "--json",
                                   "--device", "cuda"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["peak_mem_gb"] > 0 and out["device"] != "cpu" and out["tokens"] >= 1


def test_pending_sums_change_no_token(monkeypatch):
    """With 128-column groups and K of 8 groups or more the decode GEMVs split K; their shares then add into the
    engine's pending fp32 sums (`PendingSums`), which the next small op reads and zeroes. Against the same engine
    with each GEMV handing its partials over itself: the same greedy tokens (graph-replayed, small ops compiled),
    one-token logits within 1e-3, and every sum zero after a step."""
    from engine_testlib import random_packed_layers, record_in_place_adds

    hf = tiny_hf_model(tiny_config(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                                   num_key_value_heads=8))
    packed, floats = random_packed_layers(hf, 0.05, 0.1, 0.02)  # weights of ~0.02
    model = cuda_engine(hf, packed=packed, floats=floats)
    model.compile_small_ops()
    added = record_in_place_adds(monkeypatch)
    tokens = {}
    for on in (True, False):
        model.sum_in_place = on
        added.clear()
        tokens[on] = Generator(model, 128).generate(list(range(10, 40)), 24).tokens
        assert added.count(True) >= 3 * hf.config.num_hidden_layers if on else not added
    assert tokens[True] == tokens[False]
    tok, pos = torch.tensor([[7]], device=CUDA), torch.tensor([40], device=CUDA)
    logits = {}
    with torch.no_grad():
        for on in (True, False):
            model.sum_in_place = on
            logits[on] = model(tok, pos).float()
            assert not any(s.any() for s in (model.sums.o, model.sums.gate_up, model.sums.down))
    assert torch.isfinite(logits[True]).all() and logits[True].std() > 0.1
    assert rel_err(logits[True], logits[False]) < 1e-3
