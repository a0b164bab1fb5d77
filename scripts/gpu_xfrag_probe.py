"""Probe (GPU, temporary; branch xfrag-probe): the M = 1 tensor-core GEMV reading x in fragment order, with and
without `unrolled`, timed without the x_fragments launch (its output made once, outside the timed graph) beside the
committed rows and the same rows with that launch. Why: kernels-notes version 20, the SASS of `unrolled` waits on
eight dependent x loads a slot; in fragment order they are four 16-byte loads. If the GEMV alone gains, the step's
norm kernel can write the fragment order itself (no extra launch). Writes $OUT/xfrag-kernels.jsonl."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_kernels import STACKED_SHAPES, time_config  # noqa: E402
import kernels.gemv_tc as tc  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.dispatch import TENSOR_ORDER, scratch_words  # noqa: E402
from mpq.bench import kernels as bench  # noqa: E402


def variants(c: dispatch.KernelConfig) -> list[tuple[str, dispatch.KernelConfig, bool]]:
    """(name, config, x fragments made outside the timed calls)."""
    base = c if c.kind == "tc" else dispatch.KernelConfig("tc", split=4, unroll=2)
    out = [("committed", c, False), ("xfrag (with its launch)", dataclasses.replace(base, xfrag=True), False)]
    for name, cfg in (("xfrag", dataclasses.replace(base, xfrag=True)),
                      ("xfrag unrolled", dataclasses.replace(base, xfrag=True, unrolled=True)),
                      ("xfrag unrolled, unroll flipped", dataclasses.replace(base, xfrag=True, unrolled=True,
                                                                             unroll=3 - base.unroll))):
        out.append((name + " (fragments made before)", cfg, True))
    return out


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    t0 = time.time()
    _, table = dispatch._device_facts(torch.device("cuda"))
    real_fragments = tc.x_fragments
    log = (out / "xfrag-kernels.jsonl").open("w")
    for n, k in bench.SHAPES + STACKED_SHAPES:
        for ko in (1, 0):
            key = next((kk for kk in ((1, n, k, 128, ko > 0), (1, n, k, 128, None)) if kk in table), None)
            if key is None:
                continue
            layers = [bench.random_layer(n, k, ko, "cuda", seed=i) for i in range(bench.ROTATE)]
            args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
            counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ layers[0].dequantize(torch.float32).t()
            made = real_fragments(x)
            for name, cfg, before in variants(table[key]):
                tc.x_fragments = (lambda _x, pdl=False: made) if before else real_fragments
                us, err = time_config(x, args, ref, counters, cfg, f"{n}x{k}", ko)
                tc.x_fragments = real_fragments
                log.write(json.dumps({"shape": f"{n}x{k}", "outliers": ko, "variant": name, "us": us, "rel_err": err,
                                      "config": dataclasses.asdict(cfg)}) + "\n")
                log.flush()
                print(f"{n}x{k} k={ko} {name:45s} {us:7.2f} us err {err:.1e} [{time.time() - t0:.0f}s]", flush=True)
            del layers, args
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
