"""Perplexity with a fixed protocol, and KL divergence / top-1 agreement against a float reference.

Protocol (the one every reported number uses): the first `windows` consecutive non-overlapping windows of
`seq_len` tokens of the evaluation text tokenized as one stream (mpq.calib.data.eval_windows); each window is
run independently, as is (no BOS); ppl = exp(mean NLL over every predicted token, i.e. windows x (seq_len - 1)).
Artifacts run through the dequantizing reference path (mpq.dequantize.artifact_to_hf_model) in fp32, so the
number measures the quantization, not a kernel. Float models run in fp32 too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mpq.artifact import is_artifact
from mpq.devices import resolve_device
from mpq.errors import MpqError


@dataclass
class EvalOptions:
    model: str
    dataset: str = "shakespeare:hamlet"
    windows: int = 16
    seq_len: int = 512
    reference: str | None = None
    device: str = "auto"
    batch_size: int = 1


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits for every position but the last (the ones with a target in the window)."""
    out = model(input_ids=ids.to(_device_of(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, :-1].float()


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [n, seq_len >= 2], got {list(windows.shape)}")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """(exp(mean NLL over all predicted tokens), number of predicted tokens); windows are independent sequences.

    `model` is any HF-style causal LM: called as model(input_ids=..., use_cache=False), returning .logits.
    """
    _check_windows(windows)
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = _logits(model, ids)
        targets = ids[:, 1:].to(logits.device)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").double())
        count += targets.numel()
    return math.exp(nll / count), count


@torch.no_grad()
def compare_logits(model, reference, windows: torch.Tensor, batch_size: int = 1) -> dict:
    """KL(ref || model) per token in nats (mean), top-1 agreement, both perplexities and their ratio.

    Streams: each batch of windows runs through both models and is reduced before the next, so only one
    batch of reference logits exists at a time.
    """
    _check_windows(windows)
    kl_sum, agree, nll, ref_nll, count = 0.0, 0, 0.0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = _logits(model, ids)
        ref = _logits(reference, ids).to(logits.device)
        if ref.shape != logits.shape:
            raise MpqError(f"model and reference disagree on the vocabulary ({logits.shape[-1]} vs {ref.shape[-1]} logits)")
        logp, ref_logp = F.log_softmax(logits, dim=-1), F.log_softmax(ref, dim=-1)
        del logits, ref
        kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(dtype=torch.float64))
        agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        targets = ids[:, 1:].to(logp.device).unsqueeze(-1)
        nll -= float(logp.gather(-1, targets).sum(dtype=torch.float64))
        ref_nll -= float(ref_logp.gather(-1, targets).sum(dtype=torch.float64))
        count += targets.numel()
    ppl, ref_ppl = math.exp(nll / count), math.exp(ref_nll / count)
    return {"kld": max(kl_sum / count, 0.0), "top1_agreement": agree / count, "ppl": ppl, "ref_ppl": ref_ppl,
            "ppl_ratio": ppl / ref_ppl, "tokens": count}


def load_for_eval(spec: str, device: torch.device):
    """(model on `device` in fp32, tokenizer, bits/weight, kind) for an artifact folder or a float MODEL."""
    from mpq.models import load_float_model, load_tokenizer, resolve_model

    if is_artifact(spec):
        from mpq.artifact import load_artifact
        from mpq.dequantize import artifact_to_hf_model

        art = load_artifact(Path(spec).expanduser())
        model = artifact_to_hf_model(art, torch.float32)
        src = resolve_model(str(Path(spec).expanduser()))
        return model.to(device), load_tokenizer(src), art.bits_per_weight, "artifact"
    src = resolve_model(spec)
    model = load_float_model(src, torch.float32)
    return model.to(device), load_tokenizer(src), 16.0, "float"


def evaluate(opts: EvalOptions) -> dict:
    """Run the protocol on opts.model (and opts.reference on the same windows); print a summary; return numbers."""
    from mpq.calib.data import eval_windows

    if opts.windows < 1 or opts.seq_len < 2:
        raise MpqError("--windows must be >= 1 and --seq-len >= 2")
    device = resolve_device(opts.device)
    t0 = time.perf_counter()
    model, tokenizer, bpw, kind = load_for_eval(opts.model, device)
    windows = eval_windows(opts.dataset, tokenizer, opts.windows, opts.seq_len)
    result = {"model": opts.model, "kind": kind, "dataset": opts.dataset, "windows": opts.windows, "seq_len": opts.seq_len,
              "device": str(device), "bits_per_weight": bpw}
    if opts.reference is None:
        ppl, tokens = perplexity(model, windows, opts.batch_size)
        result.update(ppl=ppl, tokens=tokens)
    else:
        reference, ref_tok, _, _ = load_for_eval(opts.reference, device)
        ref_windows = eval_windows(opts.dataset, ref_tok, opts.windows, opts.seq_len)
        if not torch.equal(ref_windows, windows):
            raise MpqError("model and reference tokenize the evaluation text differently; they are not comparable")
        result.update(compare_logits(model, reference, windows, opts.batch_size), reference=opts.reference)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    _print_summary(result)
    return result


def _print_summary(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mpq eval", show_header=False, title_justify="left")
    table.add_row("model", f"{r['model']} ({r['kind']})")
    table.add_row("data", f"{r['dataset']}: first {r['windows']} x {r['seq_len']} tokens, on {r['device']}")
    table.add_row("perplexity", f"{r['ppl']:.4f}")
    table.add_row("bits/weight", f"{r['bits_per_weight']:.3f}")
    table.add_row("predicted tokens", str(r["tokens"]))
    if "kld" in r:
        table.add_row("reference", str(r["reference"]))
        table.add_row("reference perplexity", f"{r['ref_ppl']:.4f}")
        table.add_row("ppl ratio", f"{r['ppl_ratio']:.4f}")
        table.add_row("KL(ref || model), nats/token", f"{r['kld']:.5f}")
        table.add_row("top-1 agreement", f"{100 * r['top1_agreement']:.2f}%")
    table.add_row("time", f"{r['seconds']:.1f} s")
    Console(stderr=False).print(table)
