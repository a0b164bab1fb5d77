"""`mpq run`: one prompt through the decode engine, streamed to the terminal, with timings."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.errors import MpqError
from mpq.runtime.generate import Generator, Sampling
from mpq.runtime.loader import Engine, load_engine
from mpq.runtime.model import weight_bytes


@dataclass
class RunOptions:
    model: str
    prompt: str | None = None
    prompt_file: Path | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    raw: bool = False  # skip the chat template
    device: str = "auto"
    stream: bool = True  # print text to stdout as it is generated
    no_exit: bool = False  # ignore SpecEE predictors in the artifact (full depth)
    deterministic: bool = False  # no pending sums: each split-K GEMV sums its shares in one fixed order


def read_prompt(opts: RunOptions) -> str:
    if opts.prompt is not None and opts.prompt_file is not None:
        raise MpqError("give either --prompt or --prompt-file, not both")
    if opts.prompt is not None:
        text = opts.prompt
    elif opts.prompt_file is not None:
        try:
            text = Path(opts.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise MpqError(f"cannot read prompt file {opts.prompt_file}: {type(e).__name__}") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise MpqError("no prompt: pass --prompt TEXT, --prompt-file F, or pipe text on stdin")
    if not text.strip():
        raise MpqError("the prompt is empty")
    return text


def encode_prompt(tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids, through the tokenizer's chat template when it has one (unless raw)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def eos_ids(engine: Engine) -> set[int]:
    ids = engine.config.get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if engine.tokenizer.eos_token_id is not None:
        ids.add(engine.tokenizer.eos_token_id)
    return ids


class TextStream:
    """Print newly decoded text as tokens arrive; hold back an incomplete UTF-8 tail (shown as U+FFFD)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.ids, self.shown = tokenizer, enabled, [], ""

    def __call__(self, new: list[int]) -> None:
        self.ids += new
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.enabled and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def run(opts: RunOptions) -> dict:
    """Load, generate, report. Returns the result dict (`mpq run --json` prints it); callers may add keys."""
    from rich.console import Console

    text = read_prompt(opts)
    sampling = Sampling(opts.temperature, opts.top_p)
    if opts.max_new_tokens < 1:
        raise MpqError("--max-new-tokens must be at least 1")
    engine = load_engine(opts.model, opts.device)
    engine.model.sum_in_place = not opts.deterministic
    cuda = engine.model.device.type == "cuda"
    prompt = encode_prompt(engine.tokenizer, text, opts.raw)
    gen = Generator(engine.model, len(prompt) + opts.max_new_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stream = TextStream(engine.tokenizer, opts.stream)
    exit_run = None
    if not opts.no_exit:  # an artifact with SpecEE predictors decodes with exits
        from mpq.specee.decode import run_with_exits

        exit_run = run_with_exits(engine, opts.model, prompt, opts.max_new_tokens, sampling, eos_ids(engine), stream, gen)
    if exit_run is not None and exit_run[0] is not None:
        result = exit_run[0]
    else:
        result = gen.generate(prompt, opts.max_new_tokens, sampling, seed=opts.seed, eos_ids=eos_ids(engine), on_tokens=stream)
    if opts.stream:
        sys.stdout.write("\n")
    out = {
        "text": engine.tokenizer.decode(result.tokens, skip_special_tokens=True),
        "prefill_ms": result.prefill_ms,
        "decode_ms_per_token": result.decode_ms_per_token,
        "tokens": len(result.tokens),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "prompt_tokens": result.prompt_tokens,
        "decode_tokens_per_s": 1000 / result.decode_ms_per_token if result.decode_steps else None,
        "weight_gb": weight_bytes(engine.model) / 1e9,
        "bits_per_weight": engine.bits_per_weight,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "stopped_on_eos": result.stopped_on_eos,
    }
    if exit_run is not None:
        out["early_exit"] = exit_run[1]
    Console(stderr=True).print(
        f"[dim]{out['prompt_tokens']} prompt tokens, prefill {out['prefill_ms']:.1f} ms; {out['tokens']} new tokens, "
        f"decode {out['decode_ms_per_token']:.2f} ms/token ({out['decode_tokens_per_s'] or 0:.1f} tokens/s); "
        f"weights {out['weight_gb']:.2f} GB" + (f", peak GPU memory {out['peak_mem_gb']:.2f} GB" if cuda else "") + "[/dim]")
    return out
