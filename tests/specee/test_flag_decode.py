"""The one-graph exit decoder (mpq/specee/flag_decode.py): its step, with every exit decision taken by the
kernels on the device, decodes as the eager `ExitDecoder` does. On the CPU the step runs eagerly through the
Triton interpreter (the suite sets TRITON_INTERPRET=1); on CUDA it is captured and replayed."""

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from test_train_e2e import trained  # noqa: F401  (the module-scoped fixture: a tiny artifact with predictors)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the step's Triton kernels need a GPU or the interpreter")


def _signed_head(model, keep):
    """An LM head whose argmax is always one of `keep` (5 ids): rows (v, -v, u, -u, w) there and zero elsewhere,
    so some kept logit is positive and every other one is 0. With the draft proposing the first 4, exits are
    accepted and sometimes (the fifth) rejected, on a model whose intermediate layers mean nothing."""
    from mpq.runtime.model import DenseLinear
    from mpq.specee.decode import lm_head_weight

    w = lm_head_weight(model)
    head = torch.zeros_like(w)
    head[keep[0]], head[keep[1]] = w[keep[0]], -w[keep[0]]
    head[keep[2]], head[keep[3]] = w[keep[2]], -w[keep[2]]
    head[keep[4]] = w[keep[4]]
    model.output = DenseLinear(head)


def _split_model(art, dev):
    """The artifact's engine with its stackable quantized linears kept apart: k/v/q and gate/up become split linears,
    which on CUDA fork their parts onto side streams of their own (as SmolLM2's do, whose parts differ in layout)."""
    from mpq.artifact import load_artifact
    from mpq.runtime.loader import build_model, engine_dtype
    from mpq.runtime.model import SplitLinears, WeightSource

    a = load_artifact(Path(art))
    d = torch.device(dev)
    model = build_model(a.config, WeightSource(a.floats, a.linears, device=d, dtype=engine_dtype(d), stack=False))
    assert all(isinstance(layer.kvq, SplitLinears) for layer in model.layers)
    return model


def _decoders(art, dev, mode, narrow_draft=True, branches=0, split=False, **kwargs):
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.decode import ExitDecoder
    from mpq.specee.flag_decode import FlagExitDecoder

    model = _split_model(art, dev) if split else load_engine(str(art), dev).model
    if dev == "cuda":
        model.compile_small_ops()
    keep = load_specee(art, None).draft.vocab[3:8].to(dev)
    _signed_head(model, keep)
    out = []
    for cls, extra in ((ExitDecoder, {}), (FlagExitDecoder, {"capture": dev == "cuda", "branches": branches})):
        sp = load_specee(art, None)
        if narrow_draft:
            sp.draft.vocab = keep[:4].cpu()
        out.append(cls(model, sp, 96, mode=mode, auto_fallback=False, **kwargs, **extra))
    return out


@pytest.mark.parametrize("mode, branches, split", [("fill", 0, False), ("drop", 0, False), ("fill", 2, False),
                                                   ("drop", 2, False), ("fill", 2, True)])
def test_flag_decoder_decodes_as_the_eager_decoder(trained, mode, branches, split, monkeypatch):  # noqa: F811
    """Every scheduled layer's predictor fires (threshold 0): tokens, exit layers, predictor calls,
    verifications, rejections and the draft's proposals equal the eager decoder's, exits accepted at several
    layers and some rejected. The KV caches they leave agree too: in fill mode every entry (the skipped layers'
    ones are the fill; the caches, which both decoders share, are poisoned before each run), in drop mode the masks
    of what each layer skipped. branches=2: every second layer the rest of the step is a device branch
    (`mpq.runtime.graph_if`), whose skipped side fills or masks instead. split: k/v/q and gate/up as split
    linears, which fork inside the branched step too, each onto side streams of its own (forks onto torch's pooled
    streams crashed the driver's instantiation of a branched graph on SmolLM2, GPU)."""
    from mpq.runtime.model import SplitLinears
    from mpq.specee.flag_decode import FlagExitDecoder

    _, art, _, _ = trained
    prompt = list(b"To be, or not to be, that is")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    forks = []  # each split linear call's parallel setting, flag steps between "step" and "end"
    split_forward = SplitLinears.forward
    monkeypatch.setattr(SplitLinears, "forward", lambda self, x: (forks.append(self.parallel), split_forward(self, x))[1])
    flag_step = FlagExitDecoder._flag_step
    monkeypatch.setattr(FlagExitDecoder, "_flag_step",
                        lambda self: (forks.append("step"), flag_step(self), forks.append("end"))[1])
    runs, states = [], []
    for dec in _decoders(art, dev, mode, branches=branches, split=split, threshold=0.0):
        for layer in dec.model.layers:  # an entry a decoder leaves unwritten keeps this, not the other's value
            layer.kv_cache.kv.fill_(7.0)
        out, st, _ = dec.generate(prompt, 16)
        runs.append((out, dict(st.exits), st.predictor_calls, st.verifications, st.rejections, st.proposals))
        n = len(prompt) + st.tokens
        states.append(torch.stack([layer.kv_cache.kv[:, :, :, :n].float() for layer in dec.model.layers])
                      if mode == "fill" else dec.dropped[:, :n].clone())
    assert runs[0] == runs[1], runs
    if mode == "fill":
        torch.testing.assert_close(states[1], states[0], rtol=2e-2 if dev == "cuda" else 1e-4, atol=1e-3)
    else:
        assert torch.equal(states[0], states[1]) and bool(torch.isinf(states[0]).any())
    _, exits, calls, verifications, rejections, _ = runs[0]
    assert verifications == calls > rejections > 0 and len([k for k in exits if k < 5]) > 1
    if split:  # inside the branched step every split linear forks (on CUDA: onto streams no other module uses)
        in_step, inside = [], False
        for f in forks:
            if f in ("step", "end"):
                inside = f == "step"
            elif inside:
                in_step.append(f)
        assert in_step and all(in_step)
        if dev == "cuda":  # the driver's streams, not torch's pool (which cycles once the sets outnumber it)
            sides = [st for layer in dec.model.layers for mod in (layer.kvq, layer.gate_up) for st in mod._streams]
            assert sides and len({st.cuda_stream for st in sides}) == len(sides)
            assert all(isinstance(st, torch.cuda.ExternalStream) for st in sides)


def test_run_hands_the_rest_to_the_engine_at_the_fallback(trained, monkeypatch):  # noqa: F811
    """Where exits stop paying, `mpq run` leaves the rest to the engine's decode loop (`Generator.resume`, its graph
    on CUDA) in the caches the exit decoder filled: the tokens equal the exit decoder's going on at full depth by
    itself, the engine's loop decodes every step after the fallback, each token is streamed once, in order, and the
    stats count the rest at full depth. Exits are accepted before the fallback, so the caches hold KV fill."""
    from functools import partialmethod

    import mpq.specee.bundle as bundle
    from mpq.runtime.generate import Generator, Sampling
    from mpq.runtime.loader import load_engine
    from mpq.specee.decode import ExitDecoder, run_with_exits
    from mpq.specee.flag_decode import FlagExitDecoder

    _, art, _, _ = trained
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    engine = load_engine(str(art), dev)
    load = bundle.load_specee
    keep = load(art, None).draft.vocab[3:8].to(dev)
    _signed_head(engine.model, keep)

    def narrow_draft(path, config=None):
        sp = load(path, config)
        sp.draft.vocab = keep[:4].cpu()
        return sp

    prompt, n, at = list(b"To be, or not to be, that is"), 24, 14
    cls = FlagExitDecoder if dev == "cuda" else ExitDecoder  # the decoder run_with_exits picks

    def forced_fallback(self):
        if self.stats.tokens != at:
            return False
        self.stats.fallback = "forced"
        return True

    monkeypatch.setattr(bundle, "load_specee", narrow_draft)
    monkeypatch.setattr(cls, "_check_fallback", forced_fallback)
    monkeypatch.setattr(cls, "__init__", partialmethod(cls.__init__, threshold=0.0))
    ref, ref_st, _ = cls(engine.model, narrow_draft(art), len(prompt) + n + 1).generate(prompt, n)
    assert ref_st.fallback == "forced" and len([k for k in ref_st.exits if k < engine.model.args.n_layers]) > 1
    engine_steps, streamed = [], []
    decode_n_tokens = Generator.decode_n_tokens
    monkeypatch.setattr(Generator, "decode_n_tokens", lambda self, k: (engine_steps.append(k), decode_n_tokens(self, k)))
    gen, info = run_with_exits(engine, str(art), prompt, n, Sampling(), set(), streamed.extend,
                               Generator(engine.model, len(prompt) + n))
    assert gen.tokens == ref == streamed and gen.decode_steps == ref_st.tokens == n - 1
    assert sum(engine_steps) == n - 1 - at
    assert info["fallback"] == "forced" and info["tokens"] == ref_st.tokens
    assert info["mean_layers"] == ref_st.mean_layers and info["exit_histogram"] == ref_st.to_dict()["exit_histogram"]


def test_flag_decoder_follows_its_draft_and_fed_tokens(trained):  # noqa: F811
    """With the trained draft's own vocabulary (its proposals now decide which exits verify) and teacher forcing
    (each fed token re-drafts when it is not the one the step before drafted for), as the eager decoder."""
    _, art, _, _ = trained
    prompt = list(b"To be, or not to be, that is")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fed = list(b" the question: whether 'tis no")
    runs = []
    for dec in _decoders(art, dev, "fill", narrow_draft=False, threshold=0.0):
        out, st, _ = dec.generate(prompt, 16, force=fed)
        runs.append((out, dict(st.exits), st.predictor_calls, st.verifications, st.rejections, st.proposals))
    assert runs[0] == runs[1], runs
    assert runs[0][3] > 0


def test_flag_decoder_replays_a_trace(trained):  # noqa: F811
    """Trace-driven (the GPU bench): each token exits at the trace's layer, whatever the predictors say."""
    from mpq.runtime.loader import load_engine
    from mpq.specee.bundle import load_specee
    from mpq.specee.flag_decode import FlagExitDecoder

    _, art, _, _ = trained
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_engine(str(art), dev).model
    if dev == "cuda":
        model.compile_small_ops()
    trace = [2, 5, 1, 3, 5, 4]
    dec = FlagExitDecoder(model, load_specee(art, None), 96, auto_fallback=False, capture=dev == "cuda",
                          trace=trace)
    _, st, _ = dec.generate(list(b"To be, or not"), 13)
    assert st.tokens == 12 and dict(st.exits) == dict(Counter(trace * 2))
    assert st.layers == 2 * sum(trace) and st.rejections == 0


def test_draft_step_through_the_decode_kernels_matches_its_eager_step():
    """`DraftHead.step_fused` (the one-graph decoder's draft) against `step_at`, a few positions in a row, each
    writing the draft's own cache."""
    import functools

    from kernels import step_ops
    from kernels.decode_attention import decode_attention
    from mpq.runtime.model import SmallOps
    from mpq.specee.draft import DraftHead, rope_tables

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    d = DraftHead(64, 4, 2, 16, 48, 1e-5, torch.arange(30)).to(dev, dt)
    with torch.no_grad():
        d.o.normal_(0, 0.2)
        d.down.normal_(0, 0.2)
    d.bind_rows(torch.randn(100, 64, device=dev, dtype=dt))
    cos, sin = (t.to(dev, dt) for t in rope_tables(1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16), 40))
    ops = SmallOps(add_rms_norm=step_ops.add_rms_norm, silu_mul=step_ops.silu_mul,
                   decode_attention=functools.partial(decode_attention))
    counters = torch.zeros(2, dtype=torch.int32, device=dev)
    caches = []
    for fused in (False, True):
        d.setup_cache(40, dev, dt)
        gen = torch.Generator().manual_seed(1)
        outs = []
        for p in range(5):
            h, e = (torch.randn(1, 64, generator=gen).to(dev, dt) for _ in range(2))
            pos = torch.tensor([p], device=dev)
            outs.append(d.step_fused(h, e, pos, cos[pos], sin[pos], ops, counters) if fused
                        else d.step_at(h, e, pos, cos, sin))
        caches.append((torch.stack(outs).float(), d.cache.float()))
    tol = dict(rtol=2e-2, atol=2e-2) if dev == "cuda" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1][0], caches[0][0], **tol)
    torch.testing.assert_close(caches[1][1], caches[0][1], **tol)
