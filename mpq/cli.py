"""The typer layer: each command parses options and calls one library function. No logic lives here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mpq.errors import MpqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mpq: mixed 2/4/16-bit quantization and speculative early exit for Llama-family LLMs.")
bench_app = typer.Typer(no_args_is_help=True, help="GPU benchmarks (results as JSON).")
app.add_typer(bench_app, name="bench")


def one_line_errors(fn):
    """Show the tool's own errors (and Ctrl-C) as one line with an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MpqError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing half-written was left; rerun the same command to resume", err=True)
            raise typer.Exit(130)
        except MemoryError:
            typer.echo("error: out of memory (lower --samples / --seq-len, or use --device cpu)", err=True)
            raise typer.Exit(2)
        except OSError as e:
            typer.echo(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or 'I/O'})", err=True)
            raise typer.Exit(2)

    return wrapper


def print_json_last(obj: dict) -> None:
    """Machine-readable result: one JSON object as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=float))


@app.command()
@one_line_errors
def calibrate(
    model: str = typer.Argument(..., help="local HF folder, .gguf file, hub id, or alias smollm2-135m"),
    dataset: str = typer.Option("shakespeare", help="shakespeare | shakespeare:hamlet | wikitext2 | c4 | a .txt/.jsonl/.parquet file or folder"),
    samples: int = typer.Option(128, help="number of token windows"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="calibration folder to write (resumable)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Capture per-layer Hessians X^T X, one decoder layer at a time (resumable)."""
    from mpq.calib.capture import CalibrationConfig, calibrate as run

    run(CalibrationConfig(model=model, dataset=dataset, samples=samples, seq_len=seq_len, seed=seed, out=out,
                          device=device, trust_remote_code=trust_remote_code))


@app.command()
@one_line_errors
def quantize(
    model: str = typer.Argument(...),
    calib: str = typer.Option(..., help="calibration folder, or 'none' for data-free (range-only sensitivity)"),
    target_bits: Optional[float] = typer.Option(None, help="all-in bits/weight budget over the quantized linears"),
    out: Path = typer.Option(..., help="artifact folder to write"),
    recipe: Optional[Path] = typer.Option(None, help="recipes/NAME.yaml: defaults for every option below"),
    override: List[str] = typer.Option([], help="PATTERN=2|4|16 pins matching modules (repeatable)"),
    gptq: Optional[bool] = typer.Option(None, "--gptq/--no-gptq", help="GPTQ error compensation"),
    group_size: Optional[int] = typer.Option(None),
    outliers: Optional[int] = typer.Option(None, help="fp16 outliers per 2-bit group (default: per recipe)"),
    plan_only: bool = typer.Option(False, help="compute and print the allocation, write plan JSON, pack nothing"),
    max_ppl_ratio: Optional[float] = typer.Option(None, help="quality gate on held-back calibration windows"),
    force: bool = typer.Option(False, help="write the artifact even if the quality gate fails"),
    overwrite: bool = typer.Option(False),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
):
    """Allocate 2/4-bit tiles under the budget, quantize (GPTQ), pack into format v1."""
    from mpq.quant.pipeline import QuantizeOptions, quantize_model

    quantize_model(QuantizeOptions.build(
        model=model, calib=calib, target_bits=target_bits, out=out, recipe=recipe, overrides=override, gptq=gptq,
        group_size=group_size, outliers=outliers, plan_only=plan_only, max_ppl_ratio=max_ppl_ratio, force=force,
        overwrite=overwrite, device=device, trust_remote_code=trust_remote_code))


@app.command("eval")
@one_line_errors
def eval_(
    model: str = typer.Argument(..., help="an artifact folder or a float MODEL"),
    dataset: str = typer.Option("shakespeare:hamlet"),
    windows: int = typer.Option(16),
    seq_len: int = typer.Option(512),
    reference: Optional[str] = typer.Option(None, help="float MODEL to compare against (KLD, top-1)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object last"),
    device: str = typer.Option("auto"),
):
    """Perplexity with a fixed protocol (and KLD / top-1 agreement against --reference)."""
    from mpq.evaluate import EvalOptions, evaluate

    result = evaluate(EvalOptions(model=model, dataset=dataset, windows=windows, seq_len=seq_len, reference=reference, device=device))
    if json_out:
        print_json_last(result)


@app.command()
@one_line_errors
def dequantize(
    art: Path = typer.Argument(..., help="artifact folder"),
    out: Path = typer.Option(..., help="folder for the plain HF float checkpoint"),
    overwrite: bool = typer.Option(False),
):
    """Write an artifact as a plain HF float checkpoint (dequantized linears) that transformers loads as is."""
    from mpq.dequantize import dequantize_artifact

    dequantize_artifact(art, out, overwrite=overwrite)
    typer.echo(f"wrote {out}")


@app.command()
@one_line_errors
def run(
    model: str = typer.Argument(..., help="an artifact folder or a float MODEL"),
    prompt: Optional[str] = typer.Option(None, help="prompt text (else --prompt-file, else stdin)"),
    prompt_file: Optional[Path] = typer.Option(None),
    max_new_tokens: int = typer.Option(128),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object last (text goes into it, not to stdout)"),
    raw: bool = typer.Option(False, help="skip the chat template"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Generate text with the decode engine (one CUDA graph per decode step on the GPU), streamed, with timings."""
    from mpq.runtime.run import RunOptions, run as run_prompt

    result = run_prompt(RunOptions(model=model, prompt=prompt, prompt_file=prompt_file, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, raw=raw, device=device,
                                   stream=not json_out))
    if json_out:
        print_json_last(result)


@bench_app.command("e2e")
@one_line_errors
def bench_e2e(json_out: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here")):
    """Batch-1 decode of a Llama-2-7B-shaped model: mpq vs this engine in fp16 vs transformers fp16."""
    from mpq.bench.e2e import bench_e2e as run_bench

    result = run_bench(json_out)
    for r in result["rows"]:
        typer.echo(f"{r['impl']:12s} {r['ms_per_token']:8.2f} ms/token {r['tokens_per_s']:8.1f} tokens/s {r['weight_gb']:6.2f} GB")
    typer.echo(f"floor {result['floor_ms_per_token']:.2f} ms/token at {result['copy_tb_s']:.2f} TB/s copy bandwidth")
    print_json_last(result)


if __name__ == "__main__":
    app()
