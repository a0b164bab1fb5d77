"""train-predictors end to end on a tiny quantized artifact: stages, resume, the artifact add-on, the decoder
with exits, `mpq run` / `mpq eval --early-exit`, and refusal of predictors that belong to other weights."""

import json
import shutil

import pytest
import torch

from engine_testlib import rtn_artifact, tiny_config, tiny_hf_model
from mpq.errors import MpqError
from mpq.specee.train import TrainOptions, train_predictors_cli

TEXT = "".join(f"To be, or not to be, that is the question {i % 7}: whether 'tis nobler in the mind.\n" for i in range(300))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, byte_tokenizer):
    root = tmp_path_factory.mktemp("specee")
    hf = tiny_hf_model(tiny_config(num_hidden_layers=5, hidden_size=64), seed=2)
    art = root / "art"
    rtn_artifact(hf, art, byte_tokenizer)
    (root / "text.txt").write_text(TEXT)
    opts = dict(artifact=art, dataset=str(root / "text.txt"), samples=6, seq_len=40, draft_vocab=48, draft_inter=64,
                draft_epochs=3, pred_epochs=3)
    summary = train_predictors_cli(TrainOptions(**opts))
    return root, art, opts, summary


def test_training_writes_a_loadable_addon(trained):
    from mpq.specee.bundle import load_specee

    root, art, _, summary = trained
    assert len(summary["predictors"]["layer_metrics"]) == 4
    assert 0 < summary["draft"]["vocab_size"] <= 48
    sp = load_specee(art)
    assert sp.predictors.layers == list(range(4))
    assert all(0 <= s <= 3 for s in sp.offline)
    assert ((sp.predictors.threshold >= 0) & (sp.predictors.threshold <= 1.01)).all()
    manifest_keys = json.loads((root / "art.specee-work" / "job.json").read_text())["done"]
    assert manifest_keys == ["collect", "draft", "predictors", "write"]


def test_resume_skips_done_stages_and_refuses_other_inputs(trained):
    root, art, opts, _ = trained
    collected = (root / "art.specee-work" / "collect.safetensors").stat().st_mtime_ns
    train_predictors_cli(TrainOptions(**opts))
    assert (root / "art.specee-work" / "collect.safetensors").stat().st_mtime_ns == collected
    with pytest.raises(MpqError, match="other inputs"):
        train_predictors_cli(TrainOptions(**dict(opts, samples=5)))


def test_exit_decoding_runs_and_counts(trained):
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder

    _, art, _, _ = trained
    model = load_engine(str(art), "cpu").model
    prompt = list(b"To be, or not to be, that is")
    full, _, _ = ExitDecoder(model, None, 96, exits=False).generate(prompt, 20)
    dec = ExitDecoder(model, load_specee(art), 96, threshold=0.0, auto_fallback=False)  # every scheduled layer fires
    out, st, _ = dec.generate(prompt, 20, force=full)
    assert st.tokens == 19 and st.verifications == st.predictor_calls >= st.rejections
    accepted = st.verifications - st.rejections
    assert st.layers == 5 * 19 - sum((5 - k) * v for k, v in st.exits.items())
    assert sum(v for k, v in st.exits.items() if k < 5) == accepted
    none, st0, _ = ExitDecoder(model, load_specee(art), 96, threshold=1.5).generate(prompt, 20)
    assert none == full and st0.mean_layers == 5 and st0.verifications == 0


class _LimitedHead(torch.nn.Module):
    """An LM head whose argmax is always one of `keep`: with the draft's vocabulary set to 4 of them, exits are
    accepted (and, with a fifth, sometimes rejected) on a model whose intermediate layers mean nothing."""

    def __init__(self, inner, weight, keep):
        super().__init__()
        self.inner, self.weight = inner, weight
        self.register_buffer("bias", torch.full((weight.shape[0],), -1e4, dtype=weight.dtype, device=weight.device))
        self.bias[keep] = 0

    def forward(self, h):
        return self.inner(h) + self.bias


@pytest.mark.parametrize("mode", ["fill", "drop"])
def test_graph_decoder_decodes_as_the_eager_decoder(trained, mode):
    """The graph decoder's pieces, run eagerly (its host logic: the next layer queued before a predictor's
    decision is read, the exit head and fill after it), give the eager decoder's tokens, exits and counters; on
    CUDA also when captured and replayed. Without exits, its one-piece step decodes as the eager one."""
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder, lm_head_weight
    from mpq.specee.graph_decode import GraphExitDecoder

    _, art, _, _ = trained
    prompt = list(b"To be, or not to be, that is")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        model = load_engine(str(art), dev).model
        keep = load_specee(art, None).draft.vocab[3:8].to(dev)
        model.output = _LimitedHead(model.output, lm_head_weight(model), keep)
        runs = []
        for cls, extra in ((ExitDecoder, {}), (GraphExitDecoder, {"capture": False}),
                           *([(GraphExitDecoder, {"capture": True})] if dev == "cuda" else [])):
            sp = load_specee(art, None)
            sp.draft.vocab = keep[:4].cpu()  # the draft proposes 4 of the 5 tokens the head can give
            dec = cls(model, sp, 96, mode=mode, threshold=0.0, auto_fallback=False, **extra)
            out, st, _ = dec.generate(prompt, 24)
            runs.append((out, dict(st.exits), st.predictor_calls, st.verifications, st.rejections, st.proposals))
        assert all(r == runs[0] for r in runs[1:]), (dev, runs)
        plain = [cls(model, None if cls is ExitDecoder else load_specee(art, None), 96, mode=mode, exits=False,
                     **extra).generate(prompt, 24)[0]
                 for cls, extra in ((ExitDecoder, {}), (GraphExitDecoder, {"capture": dev == "cuda"}))]
        assert plain[0] == plain[1]  # without exits: the whole step as one piece
        _, exits, calls, verifications, rejections, _ = runs[0]
        assert verifications == calls > 0
        if dev == "cpu":  # accepted exits at several layers, and rejected ones
            assert verifications > rejections > 0 and len([k for k in exits if k < 5]) > 1


def test_graph_decoder_replays_a_trace(trained):
    """Trace-driven (the GPU bench): each token exits at the trace's layer, whatever the predictors say."""
    from collections import Counter

    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.graph_decode import GraphExitDecoder

    _, art, _, _ = trained
    model = load_engine(str(art), "cpu").model
    trace = [2, 5, 1, 3, 5, 4]
    dec = GraphExitDecoder(model, load_specee(art, None), 96, auto_fallback=False, capture=False, trace=trace)
    _, st, _ = dec.generate(list(b"To be, or not"), 13)
    assert st.tokens == 12 and dict(st.exits) == dict(Counter(trace * 2))
    assert st.layers == 2 * sum(trace) and st.rejections == 0


def test_graph_decoder_falls_back_when_exits_do_not_pay(trained):
    """After a window whose steps with exits were not faster than the one-piece full-depth step (here made to
    cost nothing), the decoder says so and decodes the rest at full depth."""
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.graph_decode import GraphExitDecoder

    _, art, _, _ = trained
    model = load_engine(str(art), "cpu").model
    dec = GraphExitDecoder(model, load_specee(art, None), 96, threshold=0.0, window=4, capture=False)
    dec._full_depth_ms = lambda: 0.0
    _, st, _ = dec.generate(list(b"To be, or not"), 20)
    assert st.fallback.startswith("exits do not pay here") and "at full depth" in st.fallback
    assert len(st.proposals) == 5  # the first token opens the window, four more close it; then no draft runs
    kv = [layer.kv_cache.kv.clone() for layer in model.layers]
    assert GraphExitDecoder._full_depth_ms(dec) > 0  # the real timer leaves the cache as it found it
    assert all(torch.equal(a, layer.kv_cache.kv) for a, layer in zip(kv, model.layers))


def test_mismatched_predictors_are_refused(trained, tmp_path):
    from safetensors import safe_open

    from mpq.artifact import read_manifest, write_tensors
    from mpq.specee.bundle import load_specee

    _, art, _, _ = trained
    _, manifest, files = read_manifest(art)
    with safe_open(str(files[0]), framework="pt") as st:
        tensors = {n: st.get_tensor(n) for n in st.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01  # other weights, same predictors
    other = tmp_path / "other"
    shutil.copytree(art, other)
    write_tensors(other, tensors, {k: v for k, v in manifest.items() if k != "tensors"})
    with pytest.raises(MpqError, match="another artifact"):
        load_specee(other)


def test_cli_run_json_and_eval_early_exit(trained):
    from typer.testing import CliRunner

    from mpq.cli import app

    root, art, _, _ = trained
    r = CliRunner().invoke(app, ["run", str(art), "--prompt", "To be, or", "--max-new-tokens", "12", "--raw",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output.strip().splitlines()[-1])["early_exit"]
    assert stats["used"] is True and stats["tokens"] == 11 and 1 <= stats["mean_layers"] <= 5
    r = CliRunner().invoke(app, ["run", str(art), "--prompt", "To be", "--max-new-tokens", "4", "--raw", "--device", "cpu",
                                 "--json", "--no-exit"])
    assert r.exit_code == 0 and "early_exit" not in json.loads(r.output.strip().splitlines()[-1])
    r = CliRunner().invoke(app, ["eval", str(art), "--early-exit", "--dataset", str(root / "text.txt"), "--prompts", "2",
                                 "--new-tokens", "8", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    for key in ("mean_layers", "oracle_layers", "num_layers", "agreement", "ppl_exit", "ppl_no_exit", "overhead_fraction"):
        assert key in res
    assert res["num_layers"] == 5 and 1 <= res["oracle_layers"] <= res["num_layers"]
    assert res["oracle_layers"] <= res["draft_bound_layers"] <= res["draft_settled_bound_layers"] <= res["num_layers"]
    assert res["oracle_layers"] <= res["settled_layers"] <= res["draft_settled_bound_layers"] and 0 <= res["draft_recall"] <= 1
    assert set(res["overhead_split"]) == {"draft_head", "features_predictors", "verify_rejected", "kv_filling"}
    assert "drop" in res and 0 <= res["drop"]["agreement"] <= 1


def test_cuda_decoder_fused_exit_probability_matches_reference(trained):
    """On the GPU the decoder's predicted layers run one fused kernel; it must give the reference path's
    probabilities on the decoder's own hidden states (first and later layers), and the same decode at full depth."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder
    from mpq.runtime.model import SmallOps

    _, art, _, _ = trained
    model = load_engine(str(art), "cuda").model
    dec = ExitDecoder(model, load_specee(art, None), 96, auto_fallback=False)
    assert dec.fused
    dec._prefill(list(b"To be, or not to be"))
    pos = torch.tensor([19], device="cuda")
    mask = model.causal[pos].view(1, 1, 1, -1)
    x = model.embed[42].view(1, 1, -1)
    rows = dec.lm_w[torch.tensor([5, 42, 7, 99], device="cuda")]
    with torch.inference_mode():
        for i in range(4):
            x = dec.run_layer(i, x, pos, mask, SmallOps())
            dec.fused = True
            fused = dec.exit_prob(i, x, rows, first=i == 0)
            dec.fused = False
            ref = dec.exit_prob(i, x, rows, first=i == 0)
            assert abs(fused - ref) < 5e-3, (i, fused, ref)  # the reference does not round the norm to fp16
    dec.fused = True
    prompt = list(b"To be, or not to be, that is")
    full, _, _ = ExitDecoder(model, None, 96, exits=False).generate(prompt, 12)
    none, st, _ = ExitDecoder(model, load_specee(art, None), 96, threshold=1.5).generate(prompt, 12)
    assert none == full and st.predictor_calls > 0 and st.verifications == 0


@pytest.mark.parametrize("bad", [{"draft_samples": -1}, {"draft_inter": 0}])
def test_bad_draft_options_are_refused_before_any_work(trained, tmp_path, bad):
    root, art, opts, _ = trained
    work = tmp_path / "work"
    with pytest.raises(MpqError, match="--draft-samples >= 0 and --draft-inter >= 1"):
        train_predictors_cli(TrainOptions(**dict(opts, work=work, **bad)))
    assert not work.exists()


def test_the_addon_carries_the_draft_quantized_for_the_gpu(trained):
    """`train-predictors` stores the draft as the GPU decoders run it (the layer at the artifact's bits, the head's
    rows in 4-bit), scores it on the held-out windows beside the float draft, and the loader checks its shapes."""
    from mpq.errors import ArtifactError
    from mpq.specee.bundle import _quantized_draft, load_specee, quantized_draft_tensors
    from mpq.specee.draft import HEAD, LINEAR_NAMES, DraftHead

    _, art, _, summary = trained
    q = summary["draft"]["quantized"]
    assert 2.5 <= q["bits_per_weight"] <= 4.0 and 0.0 <= q["heldout_top4_recall"] <= 1.0
    sp = load_specee(art)
    packed = sp.quantized_draft
    assert set(packed) == {*LINEAR_NAMES, HEAD}
    for name in LINEAR_NAMES:
        w = getattr(sp.draft, name).detach()
        assert packed[name].dequantize().shape == w.shape
        assert (packed[name].dequantize() - w).norm() < 0.5 * w.norm()  # mixed 2/4-bit of a trained layer
    V, head = sp.draft.vocab.numel(), packed[HEAD]
    assert head.n4 == head.groups and V <= head.out_features < V + head.tile_rows  # all 4-bit, padded to whole tiles
    # the quantized draft runs on the reference path and scores the V tokens of its vocabulary
    draft = sp.draft
    draft.bind_rows(torch.randn(int(draft.vocab.max()) + 1, draft.dim))
    draft.use_quantized(packed, "cpu")
    assert draft.head_logits(torch.randn(3, draft.dim)).shape == (3, V)
    # a quantized draft of another draft's shapes is refused
    other = DraftHead(draft.dim, draft.n_heads, draft.n_kv_heads, draft.head_dim, draft.inter // 2, draft.eps, draft.vocab)
    with pytest.raises(ArtifactError):
        _quantized_draft(quantized_draft_tensors(packed), {"draft_quantized": {n: p.meta() for n, p in packed.items()}},
                         other)
