"""On the GPU machine: kernel tests on CUDA, a configuration sweep on the Llama-2-7B shapes, then the benchmark.

Usage (from the repo root): PYTHONPATH=. python3 scripts/gpu_kernels.py OUT_DIR [--skip-tests] [--skip-sweep]
Writes OUT_DIR/pytest.log, OUT_DIR/sweep.jsonl (every candidate: time, error), OUT_DIR/configs-<gpu>.json (the
winners, also installed as kernels/configs/<gpu>.json for the benchmark) and OUT_DIR/kernels-<gpu>.json.
"""

import json
import os
import pathlib
import subprocess
import sys

import torch

from kernels import KernelConfig, mixed_matmul
from kernels.dispatch import CONFIG_DIR, TENSOR_ORDER, _device_facts, config_row
from kernels.gemm_mixed import dequantize_mixed
from mpq.bench import kernels as bench

MAX_REL_ERR = 2e-3  # fp16 output rounding (5e-4) plus fp32 sums; the same bound as tests/kernels


def candidates(m: int) -> list[KernelConfig]:
    gemv = [KernelConfig("gemv", split=sp, rows=rows, num_warps=w) for sp in (1, 2, 4, 8) for rows in (8, 16) for w in (1, 2)]
    gemm = [KernelConfig("gemm", split=sp, block_m=16, num_warps=w, num_stages=st)
            for sp in (1, 2, 4, 8) for w in (1, 2) for st in (2, 3, 4)]
    if m == 1:
        return gemv
    if m <= 4:
        return [c for c in gemv if c.rows == 16 and c.num_warps == 1 and c.split <= 2] + [c for c in gemm if c.split <= 4]
    return gemm


def sweep(out: pathlib.Path, shapes, ms=(1, 4, 16)) -> list[dict]:
    """Time every candidate under graph replay on ROTATE weight copies; keep the fastest correct one."""
    winners = []
    log = (out / "sweep.jsonl").open("w")
    for n, k in shapes:
        layers = [bench.random_layer(n, k, 1, "cuda", seed=i) for i in range(bench.ROTATE)]
        args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
        counters = torch.zeros(16 * (n // 16), dtype=torch.int32, device="cuda")
        w_ref = dequantize_mixed(torch.empty(n, k, device="cuda"), *args[0], group_size=128, outliers=1)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ w_ref.t()
            best = None
            for cfg in candidates(m):
                run = lambda: [mixed_matmul(x, a, group_size=128, outliers=1, counters=counters, config=cfg)  # noqa: E731
                               for a in args]
                try:
                    y = run()[0].float()
                    err = float((y - ref).norm() / ref.norm())
                    us = bench._graph_us(run) if err < MAX_REL_ERR else float("inf")
                except Exception as e:  # a config that does not compile (e.g. out of registers) is skipped
                    err, us = float("nan"), float("inf")
                    print(f"{n}x{k} m={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                row = {"n": n, "k": k, "m": m, "config": cfg.__dict__, "us": us, "rel_err": err}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if best is None or us < best[0]:
                    best = (us, cfg)
            print(f"{n}x{k} m={m}: best {best[0]:.2f} us {best[1]}", flush=True)
            winners.append(config_row(m, n, k, 128, best[1]))
    return winners


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().lower().replace("nvidia", "").split()[0]
    if "--skip-tests" not in sys.argv:
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"],
                             capture_output=True, text=True, env=env)
        (out / "pytest.log").write_text(res.stdout + res.stderr)
        print(res.stdout[-1500:], flush=True)
    if "--skip-sweep" not in sys.argv:
        table = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "configs": sweep(out, bench.SHAPES)}
        text = json.dumps(table, indent=1)
        (out / f"configs-{gpu}.json").write_text(text)
        CONFIG_DIR.mkdir(exist_ok=True)
        (CONFIG_DIR / f"{gpu}.json").write_text(text)
        _device_facts.cache_clear()
    bench.bench_kernels(out / f"kernels-{gpu}.json")


if __name__ == "__main__":
    main()
