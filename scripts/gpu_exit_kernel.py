"""On the GPU machine: the fused exit-decision kernel alone, graph-timed at the 7B hidden size for each split (the
number of programs sharing the draft logits). Prints one line per split; writes $OUT/exit-kernel.json."""

import json
import os
from pathlib import Path

import torch
import triton.testing

from kernels.exit_predictor import exit_probability
from mpq.specee.predictor import ExitPredictors


def main() -> None:
    dim, calls = 4096, 11  # the trace bench's 11 predicted layers of a step, chained through p_prev
    pred = ExitPredictors(list(range(calls)), 512).cuda()
    mlp = pred.kernel_tensors()
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(dim, device="cuda", generator=gen).half() for _ in range(calls)]
    norm_w = torch.rand(dim, device="cuda", generator=gen).half() + 0.5
    rows = torch.randn(4, dim, device="cuda", generator=gen).half() * 0.02
    p_state, out = torch.zeros(4, device="cuda"), torch.zeros(calls, device="cuda")
    result = {"device": torch.cuda.get_device_name(), "dim": dim, "calls_per_step": calls, "us_per_call": {}}
    for split in (1, 2, 4, 8, 16, 32):
        def step():
            for i, x in enumerate(xs):
                exit_probability(x, norm_w, 1e-5, rows, p_state, out, i, mlp, i, first=i == 0, split=split)
        step()
        us = triton.testing.do_bench_cudagraph(step, rep=200) * 1000 / calls
        result["us_per_call"][split] = us
        print(f"split {split:2d}: {us:6.2f} us per call (graph-timed, {calls} chained calls)", flush=True)
    (Path(os.environ.get("OUT", "benchmarks/results")) / "exit-kernel.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
