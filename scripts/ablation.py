#!/usr/bin/env python
"""The ablation table of the pipeline issue, in one run on one calibration and one set of eval windows:
FP; RTN 2/3/4; uniform GPTQ 2/3/4; mixed 2/4 without outliers; with outliers; without GPTQ.

usage: python scripts/ablation.py CALIB [--target-bits 3.0] [--json OUT] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from mpq.calib.data import eval_windows
    from mpq.evaluate import perplexity
    from mpq.models import load_float_model, load_tokenizer, resolve_model
    from mpq.quant.allocation import allocate
    from mpq.quant.pipeline import dequantized_copy, measure_model, measured_bits, quantize_model_linears
    from mpq.quant.recipe import load_recipe
    from mpq.sweep import _cached_hessians, uniform_bits_of, uniform_model
    from mpq.versions import environment

    ap = argparse.ArgumentParser()
    ap.add_argument("calib")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target-bits", type=float, default=3.0)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    src = resolve_model(args.model)
    model, tokenizer = load_float_model(src), load_tokenizer(src)
    windows = eval_windows("shakespeare:hamlet", tokenizer, args.windows, 512)
    hessians = _cached_hessians(args.calib, model.config.num_hidden_layers)
    rows = []

    def record(name, bits, qmodel, started):
        ppl, _ = perplexity(qmodel, windows)
        rows.append({"method": name, "bits_per_weight": round(bits, 3), "ppl": ppl, "seconds": round(time.time() - started, 1)})
        print(f"{name:40s} {bits:6.3f} b/w  ppl {ppl:12.2f}  ({rows[-1]['seconds']} s)", flush=True)

    t0 = time.time()
    record("FP (GGUF Q4_1, dequantized)", 16.0, model, t0)
    base = load_recipe(None)
    for b in (2, 3, 4):
        for name, use_gptq in (("RTN", False), ("GPTQ", True)):
            t0 = time.time()
            record(f"{name} {b}-bit (uniform, fp16 scale+zero)", uniform_bits_of(model, b, base), uniform_model(model, hessians, b, use_gptq, base), t0)
    variants = [("mpq mixed 2/4, no outliers", replace(base, outliers=0)),
                ("mpq mixed 2/4 + outliers", base),
                ("mpq mixed 2/4 + outliers, no GPTQ", replace(base, gptq=False))]
    for name, recipe in variants:
        t0 = time.time()
        costs = measure_model(model, hessians, recipe)
        plan = allocate(costs, args.target_bits, {})
        results = quantize_model_linears(model, hessians, plan, costs, recipe)
        record(name, measured_bits(results, plan), dequantized_copy(model, results), t0)
    fp = rows[0]["ppl"]
    print("\n| method | bits/weight (all-in) | Hamlet ppl | x FP | wall time (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['ppl'] / fp:.3f} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({**environment(), "calibration": args.calib, "windows": args.windows,
                                         "target_bits": args.target_bits, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
