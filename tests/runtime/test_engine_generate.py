"""Greedy decode against transformers' generate, sampling, EOS and streaming, on tiny random models."""

import pytest
import torch

from engine_testlib import engine_from_hf, tiny_config, tiny_hf_model
from mpq.errors import MpqError
from mpq.runtime.generate import Generator, Sampling, sample


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model(tiny_config(), seed=5)
    hf.generation_config.eos_token_id = None  # decode the full length, as the engine does without eos ids
    return hf, engine_from_hf(hf)


def test_greedy_matches_transformers_generate(pair):
    hf, model = pair
    gen = Generator(model, 96)
    for seed in range(3):
        prompt = torch.randint(0, 258, (1, 20 + 7 * seed), generator=torch.Generator().manual_seed(seed))
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
        got = gen.generate(prompt[0].tolist(), 24)
        assert got.tokens == want
        assert got.decode_steps == 23


def test_sampling_is_seeded_and_differs_from_greedy(pair):
    _, model = pair
    gen = Generator(model, 64)
    prompt = list(range(10, 30))
    s = Sampling(temperature=1.0, top_p=0.95)
    a, b, c = (gen.generate(prompt, 30, s, seed=k).tokens for k in (7, 7, 8))
    assert a == b and a != c
    assert a != gen.generate(prompt, 30).tokens


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05]])).expand(2000, 4)
    torch.manual_seed(0)
    drawn = sample(logits, Sampling(temperature=1.0, top_p=0.5))
    assert drawn.eq(1).all()
    drawn = sample(logits, Sampling(temperature=1.0, top_p=0.85))
    assert set(drawn.tolist()) == {1, 2}
    freq = drawn.eq(1).float().mean().item()
    assert abs(freq - 0.6 / 0.9) < 0.05  # renormalised over the nucleus
    assert sample(logits, Sampling()).eq(1).all()


def test_eos_stops_and_streaming_sees_every_token(pair):
    _, model = pair
    gen = Generator(model, 96)
    prompt = list(range(40, 60))
    full = gen.generate(prompt, 30).tokens
    eos = full[12]
    first = full.index(eos)
    seen = []
    got = gen.generate(prompt, 30, eos_ids={eos}, on_tokens=seen.extend, chunk=5)
    assert got.stopped_on_eos and got.tokens == full[:first + 1] == seen


def test_too_long_a_request_is_refused(pair):
    _, model = pair
    gen = Generator(model, 32)
    with pytest.raises(MpqError, match="exceed"):
        gen.generate(list(range(20)), 13)
    with pytest.raises(MpqError, match="sampling"):
        Sampling(temperature=-1.0)


def test_resume_goes_on_in_the_caches_as_one_generation(pair):
    """`Generator.resume` (where SpecEE's fallback hands over) decodes on in the caches as they are: 9 tokens, then
    the rest, equal one generation of 30; it streams only what was not passed on yet, and refuses a length the
    caches do not hold."""
    _, model = pair
    gen = Generator(model, 96)
    prompt = list(range(40, 60))
    full = gen.generate(prompt, 30).tokens
    head = gen.generate(prompt, 9).tokens
    seen = []
    got = gen.resume(len(prompt), head, 30, on_tokens=seen.extend, chunk=4)
    assert got.tokens == full and seen == full[8:] and got.decode_steps == 21
    with pytest.raises(MpqError, match="cannot resume"):
        gen.resume(len(prompt), head, 200)
