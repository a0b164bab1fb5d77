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


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main():
    """Console entry point: SIGTERM behaves like Ctrl-C, so writers clean up and the CLI prints one line (exit 130)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    return app()


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


@app.callback()
@one_line_errors
def _global_options(progress: Optional[str] = typer.Option(
        None, "--progress", metavar="auto|plain|json",
        help="progress of long passes: bars on a terminal and lines otherwise (auto), lines (plain), or one JSON "
             "object per step on stderr (json); default: MPQ_PROGRESS, else auto")):
    from mpq.progress import set_progress_mode

    set_progress_mode(progress)


def print_json_last(obj: dict) -> None:
    """Machine-readable result: one JSON object as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=float))


@app.command()
@one_line_errors
def calibrate(
    model: str = typer.Argument(..., help="local HF folder, .gguf file, hub id, or alias smollm2-135m"),
    dataset: str = typer.Option("shakespeare", help="shakespeare | shakespeare:hamlet | pydoc | wikitext2 | c4 | a .txt/.jsonl/.parquet file or folder"),
    samples: int = typer.Option(128, help="number of token windows"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="calibration folder to write (resumable)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
    fisher_samples: int = typer.Option(32, help="windows of the loss-gradient pass that weights the allocation "
                                               "(whole model, one backward each); 0 skips it"),
):
    """Capture per-layer Hessians X^T X, one decoder layer at a time, then the loss gradients (resumable)."""
    from mpq.calib.capture import CalibrationConfig, calibrate as run

    run(CalibrationConfig(model=model, dataset=dataset, samples=samples, seq_len=seq_len, seed=seed, out=out,
                          device=device, trust_remote_code=trust_remote_code, fisher_samples=fisher_samples))


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
    early_exit: bool = typer.Option(False, "--early-exit", help="SpecEE exits vs no exits and the oracle (artifact with predictors)"),
    prompts: int = typer.Option(32, help="--early-exit: Hamlet prompts"),
    new_tokens: int = typer.Option(128, help="--early-exit: greedy tokens per prompt"),
    exit_mode: str = typer.Option("both", help="--early-exit: fill | drop | both (skipped layers' KV)"),
    exit_threshold: Optional[float] = typer.Option(None, help="--early-exit: one predictor threshold for all layers"),
):
    """Perplexity with a fixed protocol (and KLD / top-1 agreement against --reference)."""
    from mpq.evaluate import EvalOptions, evaluate

    if early_exit:
        from mpq.specee.evaluate import ExitEvalOptions, evaluate_exits

        result = evaluate_exits(ExitEvalOptions(artifact=model, dataset=dataset, prompts=prompts, new_tokens=new_tokens,
                                                mode=exit_mode, threshold=exit_threshold, device=device))
        if json_out:
            print_json_last(result)
        return
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
    no_exit: bool = typer.Option(False, "--no-exit", help="ignore the artifact's SpecEE predictors (full depth)"),
    deterministic: bool = typer.Option(False, help="bit-identical runs: split-K GEMVs add their shares in a fixed "
                                                   "order (on the 7B shape ~4% slower decode)"),
):
    """Generate text with the decode engine (one CUDA graph per decode step on the GPU), streamed, with timings."""
    from mpq.runtime.run import RunOptions, run as run_prompt

    result = run_prompt(RunOptions(model=model, prompt=prompt, prompt_file=prompt_file, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, raw=raw, device=device,
                                   stream=not json_out, no_exit=no_exit, deterministic=deterministic))
    if json_out:
        print_json_last(result)


@bench_app.command("kernels")
@one_line_errors
def bench_kernels(json_out: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here"),
                  m: str = typer.Option("1,4,16,2048", "--m", help="activation rows to time, comma-separated")):
    """Format-v1 kernels vs fp16 cuBLAS, the built-in int4 kernel and a copy, on Llama-2-7B shapes (graph-timed)."""
    import torch

    from mpq.bench.kernels import bench_kernels as run_bench

    try:
        ms = tuple(int(v) for v in m.split(",") if v.strip())
    except ValueError:
        ms = ()
    if not ms or not all(1 <= v <= 8192 for v in ms):
        raise MpqError(f"--m takes activation row counts from 1 to 8192 like 1,4,16, not {m!r}")
    if not torch.cuda.is_available():
        raise MpqError("mpq bench kernels needs a CUDA GPU")
    run_bench(json_out, ms=ms)


@bench_app.command("e2e")
@one_line_errors
def bench_e2e(json_out: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here"),
              early_exit: bool = typer.Option(False, "--early-exit", help="SpecEE exits, trace-driven (see --trace)"),
              trace: Path = typer.Option(Path("benchmarks/results/specee-trace-smollm2.json"),
                                         help="--early-exit: JSON of `mpq eval --early-exit --json` whose exit histogram is replayed"),
              draft_vocab: int = typer.Option(4096, help="--early-exit: rows of the draft head's reduced vocabulary"),
              recipe: Optional[str] = typer.Option(None, help="recipe name or YAML whose allocation options the data-free quantization uses")):
    """Batch-1 decode of a Llama-2-7B-shaped model: mpq vs this engine in fp16 vs transformers fp16."""
    if early_exit:
        from mpq.specee.bench import bench_early_exit

        r = bench_early_exit(trace, json_out, draft_vocab=draft_vocab)
        typer.echo(f"{r['label']}\nno exits {r['ms_per_token_no_exit']:.3f} ms/token")
        for row in r["rows"]:
            typer.echo(f"{row['trace']} trace, {row['mode']}: {row['ms_per_token_exit']:.3f} ms/token, speed-up "
                       f"{row['speedup']:.3f}x vs ideal {row['ideal_speedup']:.3f}x ({row['speedup_vs_ideal']:.3f} of ideal)")
        live = r["live_eager_ms_per_token"]
        typer.echo(f"live exit decoder, eager: {live['full_depth']:.3f} ms/token at full depth, "
                   f"{live['exits_on']:.3f} with exits on")
        g = r["live_graph_ms_per_token"]
        typer.echo(f"live exit decoder from graph pieces: {g['full_depth']:.3f} ms/token at full depth; replaying the "
                   f"trace {g['trace_fill']:.3f} (fill), {g['trace_drop']:.3f} (drop)")
        f = r["live_one_graph_ms_per_token"]
        typer.echo(f"live exit decoder as one graph a token (what `mpq run` uses on CUDA): {f['no_exit_trace']:.3f} "
                   f"ms/token without exits; replaying the trace {f['trace_fill']:.3f} (fill), {f['trace_drop']:.3f} "
                   f"(drop); without device branches {f['trace_fill_flat']:.3f} (fill), {f['trace_drop_flat']:.3f} "
                   f"(drop); the engine's one-graph step {r['ms_per_token_no_exit']:.3f}")
        print_json_last(r)
        return
    from mpq.bench.e2e import bench_e2e as run_bench
    from mpq.quant.recipe import load_recipe

    result = run_bench(json_out, recipe=load_recipe(recipe) if recipe else None)
    for r in result["rows"]:
        typer.echo(f"{r['impl']:12s} {r['ms_per_token']:8.2f} ms/token {r['tokens_per_s']:8.1f} tokens/s {r['weight_gb']:6.2f} GB")
    typer.echo(f"floor {result['floor_ms_per_token']:.2f} ms/token at {result['copy_tb_s']:.2f} TB/s copy bandwidth")
    print_json_last(result)


@app.command()
@one_line_errors
def verify(
    art: Path = typer.Argument(..., help="artifact folder"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object last"),
):
    """Check an artifact before serving it: integrity, kernels, quality, predictors (exit 0 only if all pass)."""
    from mpq.verify import Check, verify as run_verify

    result = run_verify(art, device)
    for c in result["checks"]:
        typer.echo(Check(**c).line())
    typer.echo("verify: " + ("PASS" if result["passed"] else "FAIL"))
    if json_out:
        print_json_last(result)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def inspect(
    artifact: Path = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json", help="print the provenance as one JSON object"),
    plot: Optional[Path] = typer.Option(None, help="write a heatmap of the allocation (PNG)"),
):
    """Provenance, plan and versions of an artifact (from its manifest; no tensor is loaded)."""
    from mpq.inspect import artifact_info, plot_allocation, print_info

    info = artifact_info(artifact)
    if plot:
        plot_allocation(info, plot)
    if json_out:
        print_json_last(info)
    else:
        print_info(info)


@app.command()
@one_line_errors
def sweep(
    model: str = typer.Argument(...),
    calib: str = typer.Option(..., help="calibration folder (measured once, reused for every budget)"),
    bits: str = typer.Option("2.3,2.5,2.7,2.9,3.2,3.5,4.0", help="comma-separated all-in budgets"),
    baselines: str = typer.Option("2,3,4", help="uniform RTN/GPTQ bit widths beside them ('' for none)"),
    dataset: str = typer.Option("shakespeare:hamlet"),
    windows: int = typer.Option(16),
    seq_len: int = typer.Option(512),
    recipe: Optional[str] = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[Path] = typer.Option(None, help="bits/weight against ppl ratio (PNG)"),
    ablation: Optional[float] = typer.Option(None, help="also quantize at this budget without outliers, without GPTQ, "
                                                         "and without the loss gradients (relative allocation)"),
):
    """Quantize at several budgets from one calibration and evaluate each against the float model."""
    from mpq.sweep import SweepOptions, sweep as run_sweep

    try:
        budgets = tuple(float(b) for b in bits.split(",") if b.strip())
        uniform = tuple(int(b) for b in baselines.split(",") if b.strip())
    except ValueError:
        raise MpqError("--bits takes numbers like 2.5,3.0 and --baselines integers like 2,3,4") from None
    result = run_sweep(SweepOptions(model=model, calib=calib, bits=budgets, baseline_bits=uniform, dataset=dataset,
                                    windows=windows, seq_len=seq_len, recipe=recipe, plot=plot, ablation_bits=ablation))
    if json_out:
        print_json_last(result)


@app.command("train-predictors")
@one_line_errors
def train_predictors(
    art: Path = typer.Argument(..., help="artifact folder (the draft head and predictors are added to it)"),
    dataset: str = typer.Option("shakespeare", help="calibration text (see mpq calibrate)"),
    samples: int = typer.Option(24, help="token windows of calibration text"),
    seq_len: int = typer.Option(256),
    layers: str = typer.Option("auto", help="offline schedule: auto, or layer indices like 14,16,18"),
    budget: Optional[int] = typer.Option(None, help="number of offline layers K (default: auto from the histogram)"),
    draft_vocab: int = typer.Option(4096, help="reduced vocabulary of the draft head"),
    draft_samples: int = typer.Option(0, help="extra calibration windows for the draft head only (final hidden states)"),
    draft_inter: int = typer.Option(384, help="MLP width of the draft head's decoder layer (its cost is paid every token)"),
    target_agreement: float = typer.Option(0.985, help="held-out agreement the thresholds are chosen for"),
    seed: int = typer.Option(0),
    restart: bool = typer.Option(False, help="discard an earlier run's work folder instead of resuming it"),
    json_out: bool = typer.Option(False, "--json"),
):
    """SpecEE: train the draft head, per-layer exit predictors and schedule on calibration text (resumable)."""
    from mpq.specee.train import TrainOptions, train_predictors_cli

    result = train_predictors_cli(TrainOptions(artifact=art, dataset=dataset, samples=samples, seq_len=seq_len, layers=layers,
                                               budget=budget, draft_vocab=draft_vocab, draft_samples=draft_samples, draft_inter=draft_inter,
                                               target_agreement=target_agreement,
                                               seed=seed, restart=restart))
    if json_out:
        print_json_last(result)


if __name__ == "__main__":
    main()
