"""`mpq sweep`: one calibration, many budgets. Measure once, then allocate + quantize + evaluate per budget,
beside uniform RTN and GPTQ points, all against the float model on the same windows."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mpq.errors import MpqError


@dataclass
class SweepOptions:
    model: str
    calib: str
    bits: tuple[float, ...] = (2.3, 2.5, 2.7, 2.9, 3.2, 3.5, 4.0)
    baseline_bits: tuple[int, ...] = (2, 3, 4)
    dataset: str = "shakespeare:hamlet"
    windows: int = 16
    seq_len: int = 512
    recipe: str | None = None
    plot: Path | None = None
    ablation_bits: float | None = None  # also run mpq without outliers, without GPTQ, and with relative allocation


def _cached_hessians(calib: str, num_layers: int):
    """Layer Hessians read once from the calibration folder and kept: the sweep never captures again."""
    from mpq.calib.capture import load_layer_hessians

    cache = {i: load_layer_hessians(Path(calib), i) for i in range(num_layers)}
    return lambda i: cache[i]


def uniform_model(model, hessians, bits: int, use_gptq: bool, recipe):
    """The float model with every decoder linear replaced by a uniform b-bit quantization."""
    import copy

    from mpq.quant.baselines import uniform_quantize
    from mpq.quant.pipeline import LINEAR_SUFFIXES

    q = copy.deepcopy(model)
    for i, layer in enumerate(q.model.layers):
        hs = hessians(i)
        for s in LINEAR_SUFFIXES:
            mod = layer.get_submodule(s)
            mod.weight.data = uniform_quantize(mod.weight.data, hs.get(s), bits, recipe.group_size_for(mod.in_features), use_gptq)
    return q


def uniform_bits_of(model, bits: int, recipe) -> float:
    from mpq.quant.baselines import uniform_bits
    from mpq.quant.pipeline import LINEAR_SUFFIXES

    total = weighted = 0
    for layer in model.model.layers:
        for s in LINEAR_SUFFIXES:
            mod = layer.get_submodule(s)
            n = mod.weight.numel()
            total += n
            weighted += n * uniform_bits(bits, recipe.group_size_for(mod.in_features))
    return weighted / total


def sweep(opts: SweepOptions) -> dict:
    from mpq.calib.capture import read_calibration
    from mpq.calib.data import eval_windows
    from mpq.evaluate import compare_logits, perplexity
    from mpq.models import config_fingerprint, load_config, load_float_model, load_tokenizer, resolve_model
    from mpq.quant.allocation import allocate, parse_overrides, pins_for
    from mpq.quant.pipeline import (calibration_fisher, check_target_reachable, dequantized_copy, linear_shapes,
                                    measure_model, measured_bits, quantize_model_linears)
    from mpq.quant.recipe import load_recipe
    from mpq.versions import environment

    torch.set_flush_denormal(True)
    recipe = load_recipe(opts.recipe)
    src = resolve_model(opts.model)
    shapes = linear_shapes(load_config(src))
    pins = pins_for((name for name, _, _ in shapes), parse_overrides(recipe.overrides))
    for b in [*opts.bits, *([] if opts.ablation_bits is None else [opts.ablation_bits])]:
        check_target_reachable(shapes, recipe, pins, b)  # before any loading or measuring
    model = load_float_model(src)
    job = read_calibration(Path(opts.calib))
    if job["fingerprint"]["config"] != config_fingerprint(model.config):
        raise MpqError(f"calibration folder {opts.calib} was made for another model")
    tokenizer = load_tokenizer(src)
    windows = eval_windows(opts.dataset, tokenizer, opts.windows, opts.seq_len)
    fp_ppl, _ = perplexity(model, windows)
    hessians = _cached_hessians(opts.calib, model.config.num_hidden_layers)
    fisher = calibration_fisher(opts.calib, shapes, recipe)
    costs = measure_model(model, hessians, recipe, fisher) if opts.bits or opts.ablation_bits is not None else []
    points = []

    def add(method: str, bits: float, qmodel, started: float, **extra):
        r = compare_logits(qmodel, model, windows)
        point = {"method": method, "bits_per_weight": round(bits, 4), "ppl": r["ppl"], "ppl_ratio": r["ppl"] / fp_ppl,
                 "kld": r["kld"], "top1_agreement": r["top1_agreement"], "seconds": round(time.time() - started, 1), **extra}
        points.append(point)
        print(f"{method:5s} {bits:6.3f} b/w  ppl {point['ppl']:10.2f}  x{point['ppl_ratio']:8.3f}  "
              f"KLD {point['kld']:.4f}  top-1 {point['top1_agreement']:.3f}", flush=True)

    def add_mpq(target: float, r, variant_costs, variant: str):
        t0 = time.time()
        plan = allocate(variant_costs, target, pins, recipe.tied_sets)
        results = quantize_model_linears(model, hessians, plan, variant_costs, r)
        add("mpq", measured_bits(results, plan), dequantized_copy(model, results), t0, target_bits=target, variant=variant)

    for target in opts.bits:
        add_mpq(target, recipe, costs, "default")
    if opts.ablation_bits is not None:
        # each variant measures with its own recipe, as a user running that recipe would (without GPTQ the
        # sensitivities carry no GPTQ gains)
        no_gptq = replace(recipe, gptq=False)
        add_mpq(opts.ablation_bits, no_gptq, measure_model(model, hessians, no_gptq, fisher), "no-gptq")
        no_outliers = replace(recipe, outliers=0)
        add_mpq(opts.ablation_bits, no_outliers, measure_model(model, hessians, no_outliers, fisher), "no-outliers")
        relative = replace(recipe, allocation="relative")  # quant v2's allocation, without the loss gradients
        add_mpq(opts.ablation_bits, relative, measure_model(model, hessians, relative), "relative-allocation")
    for b in opts.baseline_bits:
        for method, use_gptq in (("rtn", False), ("gptq", True)):
            t0 = time.time()
            add(method, uniform_bits_of(model, b, recipe), uniform_model(model, hessians, b, use_gptq, recipe), t0)
    result = {**environment(next(model.parameters()).device), "model": opts.model, "dataset": opts.dataset, "windows": opts.windows,
              "seq_len": opts.seq_len, "calibration": job["fingerprint"], "fp_ppl": fp_ppl, "points": points}
    if opts.plot:
        plot_sweep(result, opts.plot)
    return result


def plot_sweep(result: dict, path: Path) -> None:
    """bits/weight against ppl ratio: mpq's curve beside the uniform RTN/GPTQ points (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"mpq": ("o-", "mpq (2/4-bit tiles + outliers, GPTQ)"), "gptq": ("s", "uniform GPTQ"), "rtn": ("^", "uniform RTN")}
    for method, (style, label) in styles.items():
        pts = sorted((p["bits_per_weight"], p["ppl_ratio"]) for p in result["points"]
                     if p["method"] == method and p.get("variant", "default") == "default")
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("all-in bits / weight (decoder linears)")
    ax.set_ylabel(f"perplexity / float ({result['dataset']})")
    ax.set_title(f"{result['model']}: float ppl {result['fp_ppl']:.2f}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
