#!/usr/bin/env python
"""Print the sweep JSON (`mpq sweep --json`) as the README's two markdown tables: the budget sweep and the ablation.

usage: python scripts/sweep_table.py benchmarks/results/sweep-smollm2.json
"""

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    fp = r["fp_ppl"]
    print(f"Float: ppl {fp:.2f} on {r['dataset']} ({r['windows']} x {r['seq_len']}).\n")
    print("| method | bits/weight (all-in) | Hamlet ppl | x float | KLD (nats/token) | top-1 agreement | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| float (GGUF Q4_1, dequantized) | 16 | {fp:.2f} | 1.000 | 0 | 1.000 | |")
    order = {"rtn": 0, "gptq": 1, "mpq": 2}
    for p in sorted(r["points"], key=lambda p: (order[p["method"]], p.get("variant", "default") != "default", p["bits_per_weight"])):
        name = {"rtn": "RTN uniform", "gptq": "GPTQ uniform", "mpq": "mpq 2/4 + outliers, GPTQ"}[p["method"]]
        variant = p.get("variant", "default")
        if variant == "no-outliers":
            name = "mpq 2/4 without outliers, GPTQ"
        elif variant == "no-gptq":
            name = "mpq 2/4 + outliers, without GPTQ"
        elif variant == "relative-allocation":
            name = "mpq 2/4 + outliers, GPTQ, allocation without loss gradients (quant v2)"
        print(f"| {name} | {p['bits_per_weight']:.3f} | {p['ppl']:.2f} | {p['ppl_ratio']:.3f} | {p['kld']:.3f} | "
              f"{p['top1_agreement']:.3f} | {p['seconds'] if p.get('seconds') is not None else 'not recorded'} |")


if __name__ == "__main__":
    main(sys.argv[1])
