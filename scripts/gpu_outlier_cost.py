"""On the GPU machine: the M = 1 outlier cost (issue 3's <= 10% target) measured repeatedly, since one benchmark run
puts it within a point of the target either way.

Usage (from the repo root): PYTHONPATH=. python3 scripts/gpu_outlier_cost.py OUT.json [REPEATS]
For each shape, the same 8 rotating layers with one outlier per 2-bit group and without, timed alternately
(graph replay, as `mpq bench kernels`), each kind with its own table row; and the layers without outliers also with
the row the outlier layers use (the same kernel configuration, outliers off). The split-K scratch has room for the
fenceless epilogue, as a QuantLinear's does.
"""

import json
import os
import statistics
import sys

import torch

from kernels import mixed_matmul
from kernels.dispatch import TENSOR_ORDER, choose_config, scratch_words
from mpq.bench import kernels as bench


def main() -> None:
    out, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", "unknown"),
              "torch": torch.__version__, "triton": __import__("triton").__version__, "repeats": repeats, "shapes": []}
    for n, k in bench.SHAPES[1:]:
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
        sets = {ko: [tuple(getattr(bench.random_layer(n, k, ko, "cuda", seed=i), t) for t in TENSOR_ORDER)
                     for i in range(bench.ROTATE)] for ko in (1, 0)}
        cfg = {ko: choose_config(1, n, k, 128, x.device, ko) for ko in (1, 0)}

        def timer(ko, c):
            return lambda: [mixed_matmul(x, a, group_size=128, outliers=ko, counters=counters, config=c)
                            for a in sets[ko]]

        runs = {"outliers": timer(1, cfg[1]), "no_outliers": timer(0, cfg[0]), "no_outliers_same_config": timer(0, cfg[1])}
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(round(bench._graph_us(fn), 3))
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": f"{n}x{k}", "config_outliers": cfg[1].__dict__, "config_no_outliers": cfg[0].__dict__,
               "us": times, "median_us": med,
               "cost_vs_best_no_outlier_row": round(med["outliers"] / med["no_outliers"] - 1, 4),
               "cost_vs_same_config": round(med["outliers"] / med["no_outliers_same_config"] - 1, 4),
               "cost_per_repeat": [round(a / b - 1, 4) for a, b in zip(times["outliers"], times["no_outliers"])]}
        print(json.dumps(row), flush=True)
        result["shapes"].append(row)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
