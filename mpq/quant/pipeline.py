"""`mpq quantize`: measure -> allocate -> quantize -> gate -> pack, for a whole model.

measure: per linear, group sensitivities (2-bit with k outliers vs 4-bit) from W and the calibration
Hessian's diagonal; allocate: one global greedy plan under the all-in budget and the pins; quantize: GPTQ
per linear on its grid; gate: perplexity on held-back calibration windows against the float model;
pack: format v1, written atomically as an HF-style folder.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mpq.errors import MpqError, QualityGateError
from mpq.quant.allocation import (LinearCosts, Plan, allocate, linear_costs, parse_overrides, pins_for, reachable_range,
                                  tile_choice)
from mpq.quant.format import SUPPORTED_GROUP_SIZES, PackedLinear
from mpq.quant.gptq import single_threaded
from mpq.quant.quantizer import LinearSpec, quantize_linear
from mpq.quant.recipe import Recipe, load_recipe
from mpq.quant.sensitivity import gptq_gain, group_sensitivity

KEEP_MASKS_MAX_WEIGHTS = 2 * 10**9  # models up to this many linear weights keep the measure pass's outlier masks
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class QuantizeOptions:
    model: str
    calib: str
    out: Path
    recipe: Recipe
    recipe_source: str | None = None
    cli_overrides: dict = field(default_factory=dict)
    plan_only: bool = False
    force: bool = False
    overwrite: bool = False
    device: str = "auto"
    trust_remote_code: bool = False

    @classmethod
    def build(cls, *, model, calib, out, recipe=None, overrides=(), target_bits=None, gptq=None, group_size=None,
              outliers=None, max_ppl_ratio=None, **rest) -> "QuantizeOptions":
        """Recipe defaults, then command-line options on top."""
        r = load_recipe(recipe)
        changes = {k: v for k, v in dict(target_bits=target_bits, gptq=gptq, group_size=group_size,
                                         outliers=outliers, max_ppl_ratio=max_ppl_ratio).items() if v is not None}
        r = replace(r, **changes)
        r.check()
        return cls(model=model, calib=calib, out=Path(out), recipe=r, recipe_source=None if recipe is None else str(recipe),
                   cli_overrides=parse_overrides(list(overrides)), **rest)

    @property
    def overrides(self) -> dict[str, int]:
        return {**parse_overrides(self.recipe.overrides), **self.cli_overrides}


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """(fqn, out_features, in_features) of every decoder linear, from the HF config alone."""
    d, f = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    return [(f"model.layers.{i}.{s}", *shapes[s]) for i in range(config.num_hidden_layers) for s in LINEAR_SUFFIXES]


def check_layout(shapes, recipe: Recipe) -> None:
    """Refuse, before any work, shapes the format cannot hold with this recipe."""
    if recipe.group_size != "auto" and int(recipe.group_size) not in SUPPORTED_GROUP_SIZES:
        raise MpqError(f"--group-size {recipe.group_size} is not supported (choose from {SUPPORTED_GROUP_SIZES})")
    for name, n, k in shapes:
        g = recipe.group_size_for(k)
        if k % g:
            raise MpqError(f"group size {g} does not divide the input dimension {k} of {name}")
        if n % recipe.tile_rows:
            raise MpqError(f"tile rows {recipe.tile_rows} do not divide the output dimension {n} of {name}")
    if recipe.outliers != "auto" and not 0 <= int(recipe.outliers) <= 4:
        raise MpqError("--outliers must be 0..4")


def outlier_choices(recipe: Recipe) -> tuple[int, ...]:
    return (0, 1) if recipe.outliers == "auto" else (int(recipe.outliers),)


def measure_linear(name: str, w: torch.Tensor, h: torch.Tensor | None, recipe: Recipe, keep_masks: bool = False,
                   grad2: torch.Tensor | None = None) -> LinearCosts:
    """The linear's error tables. `grad2` [N]: its loss-gradient energy per output row (calibration's fisher pass),
    used by `allocation: fisher`; without it that mode ranks as `relative` does."""
    n, k = w.shape
    g = recipe.group_size_for(k)
    hdiag = torch.ones(k, device=w.device) if h is None else torch.diag(h).to(w.device)
    gains = (1.0, 1.0)
    if recipe.gptq and recipe.gptq_aware and h is not None:
        hd = h.to(w.device)
        gains = tuple(gptq_gain(w, hd, g, maxq, recipe.damp, recipe.act_order) for maxq in (3, 15))
    sens = group_sensitivity(w, hdiag, g, outlier_choices(recipe), gains)
    importance = 1.0
    if recipe.allocation == "fisher" and grad2 is not None:
        # ~ loss increase: row r's output error times g[r] (fisher.py); per row, so it also picks the row tiles
        rows = grad2.to(w.device).float()[:, None]
        for s in sens.values():
            s.err2, s.err4 = s.err2 * rows, s.err4 * rows
    elif recipe.allocation != "absolute":  # error relative to the linear's output energy tr(W H W^T)
        wf = w.float()
        energy = wf.square().sum() if h is None else torch.einsum("nk,kl,nl->", wf, h.to(w.device).float(), wf)
        importance = 1.0 / float(energy.clamp(min=1e-12))
    return linear_costs(name, sens, n, k, g, recipe.tile_rows, importance, keep_masks)


def quantize_planned(name: str, w: torch.Tensor, h: torch.Tensor | None, plan_row, costs: LinearCosts, recipe: Recipe,
                     bias: torch.Tensor | None = None):
    spec = LinearSpec(tile_choice(costs, plan_row.n4, plan_row.outliers), plan_row.outliers, costs.group_size, costs.tile_rows)
    return quantize_linear(w, h, spec, use_gptq=recipe.gptq, bias=bias, act_order=recipe.act_order, damp=recipe.damp,
                           outlier_mask=costs.outlier_masks.get(plan_row.outliers), refit_scales=recipe.refit_scales,
                           coarse_first=recipe.coarse_first)


def quantize_state_dict(weights: dict[str, torch.Tensor], target_bits: float | None, recipe: Recipe | None = None,
                        overrides: dict[str, int] | None = None) -> tuple[dict[str, PackedLinear], Plan]:
    """Data-free quantization (identity Hessian, range-only sensitivity) of {fqn: W}; used by GPU benchmarks.
    target_bits None: every linear is pinned by `overrides`, and the pins alone set the bits."""
    recipe = recipe or (Recipe() if target_bits is None else Recipe(target_bits=target_bits))
    check_layout([(n, *w.shape) for n, w in weights.items()], recipe)
    pins = pins_for(weights, overrides or {})
    costs = [measure_linear(n, w, None, recipe) for n, w in weights.items()]
    if target_bits is None:
        if set(pins) != set(weights):
            raise ValueError("target_bits None needs every linear pinned")
        target_bits = reachable_range(costs, pins)[1]
    plan = allocate(costs, target_bits, pins, recipe.tied_sets)
    packed = {}
    for c, row in zip(costs, plan.linears):
        if row.pinned != 16:
            packed[c.name] = quantize_planned(c.name, weights[c.name], None, row, c, recipe).packed
    return packed, plan


def quantize_model(opts: QuantizeOptions) -> Plan:
    from mpq.models import config_fingerprint, load_config, load_float_model, load_tokenizer, resolve_model

    torch.set_flush_denormal(True)
    recipe = opts.recipe
    src = resolve_model(opts.model)
    config = load_config(src, opts.trust_remote_code)
    shapes = linear_shapes(config)
    check_layout(shapes, recipe)
    if opts.out.exists() and not opts.overwrite and not opts.plan_only:
        raise MpqError(f"output folder exists: {opts.out} (pass --overwrite to replace it)")
    calib = _open_calibration(opts.calib, config, config_fingerprint(config))
    pins = pins_for((name for name, _, _ in shapes), opts.overrides)
    check_target_reachable(shapes, recipe, pins, recipe.target_bits)
    _check_host_memory(config, shapes)
    model = load_float_model(src, torch.float32, opts.trust_remote_code)
    started = time.time()

    def hessians(i):
        if calib is None:
            return {}
        from mpq.calib.capture import load_layer_hessians
        return load_layer_hessians(Path(opts.calib), i)

    fisher = calibration_fisher(opts.calib if calib is not None else None, shapes, recipe)
    costs = measure_model(model, hessians, recipe, fisher)
    plan = allocate(costs, recipe.target_bits, pins, recipe.tied_sets)
    if opts.plan_only:
        _write_plan(opts.out, plan)
        print_plan(plan)
        return plan
    results = quantize_model_linears(model, hessians, plan, costs, recipe)
    if os.environ.get("MPQ_TEST_BREAK_QUANTIZATION") == "1":  # test hook: the gate must catch a broken result
        for r in results.values():
            r.packed.ss2.mul_(64)
            r.packed.ss4.mul_(64)
    bits = measured_bits(results, plan)
    print_layer_table(plan, results, config.num_hidden_layers)
    print(f"all-in bits/weight over the quantized linears: {bits:.4f} (target {recipe.target_bits})")
    tokenizer = load_tokenizer(src, opts.trust_remote_code)
    gate = None if calib is None else quality_gate(model, results, calib, tokenizer, recipe, opts.force)
    used = "relative" if recipe.allocation == "fisher" and fisher is None else recipe.allocation
    manifest = provenance(opts, src, config, model, calib, plan, bits, gate, time.time() - started, used)
    from mpq.verify import reference_quality  # the figure `mpq verify` checks the artifact against
    manifest["verify_reference"] = reference_quality(dequantized_copy(model, results), tokenizer)
    save_quantized(opts.out, model, config, tokenizer, results, plan, manifest, opts.overwrite)
    print(f"wrote {opts.out}")
    return plan


def calibration_fisher(calib: str | None, shapes, recipe: Recipe) -> dict | None:
    """The calibration's loss-gradient energies where the recipe allocates by them; says so when they are missing."""
    if recipe.allocation != "fisher" or calib is None:
        return None
    from mpq.calib.fisher import load_fisher

    fisher = load_fisher(calib, {name: n for name, n, _ in shapes})
    if fisher is None:
        print(f"note: {calib} has no loss gradients (rerun `mpq calibrate` with the same options to add them); "
              "allocating by relative error")
    return fisher


def measure_model(model, hessians, recipe: Recipe, fisher: dict | None = None) -> list[LinearCosts]:
    """Error tables of every decoder linear, in plan order; `hessians(i)` gives layer i's {suffix: H} ({} = data-free);
    `fisher` {fqn: grad2} from the calibration (None: none there)."""
    from mpq.progress import layer_progress

    costs = []
    cpu_threads = single_threaded() if next(model.parameters()).device.type == "cpu" else nullcontext()
    keep = sum(layer.get_submodule(s).weight.numel() for layer in model.model.layers for s in LINEAR_SUFFIXES) <= KEEP_MASKS_MAX_WEIGHTS
    with layer_progress(len(model.model.layers), "measure") as advance, cpu_threads:
        for i, layer in enumerate(model.model.layers):
            hs = hessians(i)
            for s in LINEAR_SUFFIXES:
                w, fqn = layer.get_submodule(s).weight.data, f"model.layers.{i}.{s}"
                costs.append(measure_linear(fqn, w, hs.get(s), recipe, keep, (fisher or {}).get(fqn)))
            advance(i)
    return costs


def quantize_model_linears(model, hessians, plan: Plan, costs: list[LinearCosts], recipe: Recipe) -> dict:
    """{fqn: LinearResult} for every linear the plan does not keep in float."""
    from mpq.progress import layer_progress

    results = {}
    per = len(LINEAR_SUFFIXES)
    cpu_threads = single_threaded() if next(model.parameters()).device.type == "cpu" else nullcontext()
    with layer_progress(len(model.model.layers), "quantize") as advance, cpu_threads:
        for i, layer in enumerate(model.model.layers):
            hs = hessians(i)
            for j, s in enumerate(LINEAR_SUFFIXES):
                row, c, mod = plan.linears[i * per + j], costs[i * per + j], layer.get_submodule(s)
                if row.pinned != 16:
                    results[row.name] = quantize_planned(row.name, mod.weight.data, hs.get(s), row, c, recipe, mod.bias)
            advance(i)
    return results


def _open_calibration(calib: str, config, fingerprint: str) -> dict | None:
    if calib == "none":
        return None
    from mpq.calib.capture import read_calibration

    job = read_calibration(Path(calib))
    if job.get("fingerprint", {}).get("config") != fingerprint or job.get("num_layers") != config.num_hidden_layers:
        raise MpqError(f"calibration folder {calib} was made for another model (config fingerprint differs)")
    return job


def check_target_reachable(shapes, recipe: Recipe, pins: dict[str, int], target_bits: float) -> None:
    """Refuse an unreachable budget from the shapes alone, before loading or measuring anything."""

    ks = outlier_choices(recipe)
    stubs = [LinearCosts(n, o, i, recipe.group_size_for(i), recipe.tile_rows, {k: None for k in ks}, {}) for n, o, i in shapes]
    lo, hi = reachable_range(stubs, pins)
    if not lo - 1e-9 <= target_bits <= hi + 1e-9:
        raise MpqError(f"--target-bits {target_bits} is outside what the format can reach here: {lo:.3f} to {hi:.3f} bits/weight")


def _check_host_memory(config, shapes) -> None:
    """Print the peak host RAM estimate (fp32 model, its dequantized copy for the gate, masks) and refuse if it won't fit."""
    from mpq.calib.capture import check_memory

    linear = sum(n * k for _, n, k in shapes)
    other = 2 * config.vocab_size * config.hidden_size
    host_gb = (2 * 4 * (linear + other) + linear) / 1e9 + 1.0
    print(f"memory estimate: {host_gb:.1f} GB host")
    check_memory(host_gb, 0.0, torch.device("cpu"))


def measured_bits(results: dict, plan: Plan) -> float:
    """All-in bits/weight from the packed bytes themselves (float-pinned linears count 16)."""
    total = stored_bits = 0
    for row in plan.linears:
        n = row.shape[0] * row.shape[1]
        total += n
        stored_bits += 16 * n if row.pinned == 16 else 8 * results[row.name].packed.stored_bytes()
    return stored_bits / total


def dequantized_copy(model, results: dict):
    """The float model with each quantized linear's weight replaced by its reference dequantization."""
    import copy

    q = copy.deepcopy(model)
    for name, r in results.items():
        q.get_submodule(name).weight.data = r.packed.dequantize().to(q.get_submodule(name).weight.dtype)
    return q


def quality_gate(model, results: dict, calib: dict, tokenizer, recipe: Recipe, force: bool) -> dict | None:
    """Perplexity on held-back calibration windows (none overlaps a calibration window) against the float model."""
    from mpq.calib.data import held_out_windows
    from mpq.evaluate import perplexity

    fp = calib["fingerprint"]
    windows = held_out_windows(fp["dataset"], tokenizer, fp["samples"], fp["seq_len"], fp["seed"], recipe.gate_windows,
                               min(recipe.gate_seq_len, fp["seq_len"]))
    if windows.shape[0] == 0:
        print("quality gate skipped: the calibration windows cover the whole dataset, none is held back")
        return None
    fp_ppl, _ = perplexity(model, windows)
    q_ppl, _ = perplexity(dequantized_copy(model, results), windows)
    ratio = q_ppl / fp_ppl
    gate = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "fp_ppl": fp_ppl, "ppl": q_ppl,
            "ppl_ratio": ratio, "max_ppl_ratio": recipe.max_ppl_ratio, "passed": ratio <= recipe.max_ppl_ratio}
    print(f"quality gate: ppl {q_ppl:.2f} vs float {fp_ppl:.2f} on {windows.shape[0]} held-back windows (x{ratio:.3f}, limit x{recipe.max_ppl_ratio})")
    if not gate["passed"] and not force:
        raise QualityGateError(f"quality gate failed: ppl x{ratio:.2f} over the float model (limit x{recipe.max_ppl_ratio}); no artifact written (--force to keep it)")
    return gate


def provenance(opts: QuantizeOptions, src, config, model, calib, plan: Plan, bits: float, gate, seconds: float,
               allocation_used: str) -> dict:
    import hashlib
    import platform

    import transformers

    import mpq
    from mpq.versions import git_commit, triton_version

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    fp = (calib or {}).get("fingerprint", {})
    return {
        "source_model": opts.model,
        "tool": {"mpq": mpq.__version__, "commit": git_commit(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "triton": triton_version(), "python": platform.python_version()},
        "source": {"config_sha256": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest(),
                   "weights_sha256": h.hexdigest()},
        "calibration": None if calib is None else {"path": str(opts.calib), "dataset": fp.get("dataset"), "data": fp.get("data"),
                                                   "samples": fp.get("samples"), "seq_len": fp.get("seq_len"), "seed": fp.get("seed")},
        "recipe": opts.recipe.to_dict(), "recipe_source": opts.recipe_source, "overrides": opts.cli_overrides,
        "allocation_used": allocation_used,
        "plan": plan.to_dict(), "bits_per_weight": bits, "gate": gate, "quantize_seconds": round(seconds, 1),
    }


def save_quantized(out: Path, model, config, tokenizer, results: dict, plan: Plan, manifest: dict, overwrite: bool) -> None:
    from mpq.artifact import save_artifact
    from mpq.quant.format import FORMAT_VERSION, QUANT_VERSION

    floats = {}
    float_linears = []
    quantized = set(results)
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if module.split(".")[-1] in {s.split(".")[-1] for s in LINEAR_SUFFIXES} and module not in float_linears:
            float_linears.append(module)
        floats[name] = t.detach().to(torch.float16)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "mpq", "format_version": FORMAT_VERSION, "quant_version": QUANT_VERSION,
                                  "group_size": manifest["recipe"]["group_size"], "tile_rows": manifest["recipe"]["tile_rows"],
                                  "target_bits": plan.target_bits, "bits_per_weight": round(manifest["bits_per_weight"], 4)}
    manifest = dict(manifest, float_linears=float_linears)
    save_artifact(out, config=cfg, tokenizer=tokenizer, linears={n: r.packed for n, r in results.items()}, floats=floats,
                  manifest=manifest, overwrite=overwrite)


def _write_plan(out: Path, plan: Plan) -> None:
    path = out if out.suffix == ".json" else out.with_suffix(".plan.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=1))
    tmp.replace(path)
    print(f"wrote plan {path}")


def print_plan(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plan: {plan.bits_per_weight:.4f} bits/weight (target {plan.target_bits})")
    for col in ("linear", "shape", "4-bit frac", "outliers/grp", "pin", "bits/w", "pred. error"):
        t.add_column(col, justify="right" if col != "linear" else "left")
    for r in plan.linears:
        t.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.n4 / r.groups:.2f}", str(r.outliers), str(r.pinned or ""),
                  f"{r.bits:.3f}", f"{r.predicted_error:.3g}")
    Console().print(t)


def print_layer_table(plan: Plan, results: dict, num_layers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="per decoder layer")
    for col in ("layer", "bits/w", "4-bit frac", "outliers", "rel. output error (mean)"):
        t.add_column(col, justify="right")
    per = len(LINEAR_SUFFIXES)
    for i in range(num_layers):
        rows = plan.linears[i * per:(i + 1) * per]
        n = sum(r.shape[0] * r.shape[1] for r in rows)
        bits = sum(r.bits * r.shape[0] * r.shape[1] for r in rows) / n
        qs = [results[r.name] for r in rows if r.name in results]
        frac = sum(q.packed.n4 * q.packed.row_tiles * q.packed.group_size * q.packed.tile_rows for q in qs) / max(n, 1)
        err = sum(q.rel_error for q in qs) / max(len(qs), 1)
        t.add_row(str(i), f"{bits:.3f}", f"{frac:.2f}", str(sum(q.outliers_stored for q in qs)), f"{err:.4f}")
    Console().print(t)
