"""On the GPU machine: kernel tests on CUDA, a configuration sweep on the Llama-2-7B shapes, then the benchmark.

Usage (from the repo root): PYTHONPATH=. python3 scripts/gpu_kernels.py OUT_DIR [--skip-tests] [--skip-sweep]
       PYTHONPATH=. python3 scripts/gpu_kernels.py OUT_DIR --quick   (a few minutes: see `quick`)
       PYTHONPATH=. python3 scripts/gpu_kernels.py OUT_DIR --stacked (only the M = 1 rows of the stacked shapes)
       PYTHONPATH=. python3 scripts/gpu_kernels.py OUT_DIR --tc [--tc-m 4,16] [--flips-only] (the tensor-core GEMV
       against the table, M = 1/4/16; --flips-only: only the table's rows with gen_early flipped)
Writes OUT_DIR/pytest.log, OUT_DIR/sweep.jsonl (every candidate: time, error), OUT_DIR/configs-<gpu>.json (the
winners, also installed as kernels/configs/<gpu>.json for the benchmark) and OUT_DIR/kernels-<gpu>.json.
Candidates run with split-K scratch that has room for the fenceless epilogue (`dispatch.scratch_words`), so M = 1
tensor-core rows are timed as a QuantLinear runs them.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import torch

from kernels import KernelConfig, mixed_matmul
from kernels.dispatch import CONFIG_DIR, TABLE_OF, TENSOR_ORDER, _device_facts, config_row, scratch_words
from kernels.gemm_mixed import dequantize_mixed
from mpq.bench import kernels as bench

MAX_REL_ERR = 2e-3  # fp16 output rounding (5e-4) plus fp32 sums; the same bound as tests/kernels


def candidates(m: int) -> list[KernelConfig]:
    gemv = [KernelConfig("gemv", split=sp, rows=rows, num_warps=w) for sp in (1, 2, 4, 8) for rows in (8, 16) for w in (1, 2)]
    gemm = [KernelConfig("gemm", split=sp, block_m=16, num_warps=w, num_stages=st)
            for sp in (1, 2, 4, 8) for w in (1, 2) for st in (2, 3, 4)]
    if m == 1:
        return gemv + GEMV2_CANDIDATES
    if m <= 4:
        return [c for c in gemv if c.rows == 16 and c.num_warps == 1 and c.split <= 2] + [c for c in gemm if c.split <= 4]
    return gemm


def time_config(x, args, ref, counters, cfg: KernelConfig, label: str, outliers: int = 1) -> tuple[float, float]:
    """(us under graph replay over the weight copies `args`, relative error of the first against `ref`); a config
    that is wrong is not timed (inf), one that does not compile (e.g. out of registers) is reported and skipped."""
    def run():
        return [mixed_matmul(x, a, group_size=128, outliers=outliers, counters=counters, config=cfg) for a in args]

    try:
        y = run()[0].float()
        err = float((y - ref).norm() / ref.norm())
        return (bench._graph_us(run) if err < MAX_REL_ERR else float("inf")), err
    except Exception as e:
        print(f"{label} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("inf"), float("nan")


def sweep(out: pathlib.Path, shapes, ms=(1, 4, 16)) -> list[dict]:
    """Time every candidate under graph replay on ROTATE weight copies; keep the fastest correct one."""
    winners = []
    log = (out / "sweep.jsonl").open("w")
    for n, k in shapes:
        layers = [bench.random_layer(n, k, 1, "cuda", seed=i) for i in range(bench.ROTATE)]
        args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
        counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
        w_ref = dequantize_mixed(torch.empty(n, k, device="cuda"), *args[0], group_size=128, outliers=1)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ w_ref.t()
            best = None
            for cfg in candidates(m):
                us, err = time_config(x, args, ref, counters, cfg, f"{n}x{k} m={m}")
                row = {"n": n, "k": k, "m": m, "config": cfg.__dict__, "us": us, "rel_err": err}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if best is None or us < best[0]:
                    best = (us, cfg)
            print(f"{n}x{k} m={m}: best {best[0]:.2f} us {best[1]}", flush=True)
            winners.append(config_row(m, n, k, 128, best[1]))
    return winners


GEMV2_CANDIDATES = [KernelConfig("gemv2", split=sp, rows=r, num_warps=w, pairs=p, early4=e)
                    for r, p, w, sp, e in ((8, 1, 1, 1, False), (8, 1, 1, 1, True), (8, 1, 2, 1, False),
                                           (16, 1, 2, 1, False), (16, 1, 1, 1, False), (4, 1, 1, 1, False),
                                           (4, 1, 1, 1, True), (8, 1, 1, 2, False), (8, 1, 1, 4, False),
                                           (16, 1, 1, 2, False), (16, 1, 2, 2, False), (16, 2, 1, 4, False),
                                           (16, 2, 2, 1, False), (4, 1, 1, 2, False), (8, 1, 2, 2, False),
                                           (8, 2, 1, 1, False), (8, 2, 1, 2, False), (16, 2, 1, 1, False),
                                           (16, 2, 1, 2, False), (4, 2, 1, 1, False), (8, 2, 1, 4, False),
                                           (4, 2, 1, 2, False))]


# the stacked shared-input sets of the 7B shape (`StackedQuantLinear`): k/v/q, gate/up, and the k/v prefix that the
# exit decoder's KV fill runs
STACKED_SHAPES = ((12288, 4096), (22016, 4096), (8192, 4096))


TC_CANDIDATES = [KernelConfig("tc", split=sp, unroll=u, l2=l2, xfrag=xf) for sp in (4, 8, 16) for u in (1, 2)
                 for l2 in (True, False) for xf in (True, False)]
# M = 1: x's fragment copy or not, the 4-bit stream's first slot early or not; and unrolled (every load first:
# won on the small shapes, kernels-notes version 20)
TC_CANDIDATES_M1 = ([KernelConfig("tc", split=sp, unroll=u, xfrag=xf, early4=e4) for sp in (4, 8, 16)
                     for u in (1, 2) for xf in (True, False) for e4 in (True, False)]
                    + [KernelConfig("tc", split=sp, unroll=u, unrolled=True) for sp in (2, 4, 8) for u in (1, 2)])


def sweep_rows(table: dict, shapes, log, t0: float, m: int = 1, extra=GEMV2_CANDIDATES) -> None:
    """Winners at M = m among the table's current row (if any), that row with the other `gen_early` (M = 1,
    tensor-core split-K rows) and `extra`, for layers with one outlier per 2-bit
    group and for layers without (they compile to different kernels); replaces the shapes' rows of m's bucket."""
    import time

    from kernels.dispatch import m_bucket

    for n, k in shapes:
        old = [r for r in table["configs"] if (r["m_bucket"], r["n"], r["k"]) == (m_bucket(m), n, k)]
        table["configs"] = [r for r in table["configs"] if r not in old]
        for ko in (1, 0):
            layers = [bench.random_layer(n, k, ko, "cuda", seed=i) for i in range(bench.ROTATE)]
            args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
            counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
            ref_w = layers[0].dequantize(torch.float32)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ ref_w.t()
            row = next((r for r in old if r.get("outliers") == (ko > 0)), None) or next((r for r in old if "outliers" not in r), None)
            results = []
            current = [KernelConfig(**row["config"])] if row else []
            flipped = [dataclasses.replace(c, gen_early=not c.gen_early) for c in current
                       if c.kind == "tc" and c.split > 1 and m == 1]
            for cfg in current + flipped + extra:
                us, err = time_config(x, args, ref, counters, cfg, f"{n}x{k}", ko)
                results.append((us, cfg))
                log.write(json.dumps({"n": n, "k": k, "m": m, "outliers": ko, "config": cfg.__dict__, "us": us,
                                      "rel_err": err}) + "\n")
                log.flush()
                print(f"{n}x{k} m={m} k={ko} {cfg.kind} split={cfg.split} rows={cfg.rows} warps={cfg.num_warps} "
                      f"pairs={cfg.pairs} early4={cfg.early4} unroll={cfg.unroll} prefetch={cfg.prefetch} l2={cfg.l2} "
                      f"xfrag={cfg.xfrag} gen_early={cfg.gen_early} unrolled={cfg.unrolled}: "
                      f"{us:.2f} us, err {err:.1e}  [{time.time() - t0:.0f}s]", flush=True)
            best = min(results, key=lambda r: r[0])
            table["configs"].append(config_row(m, n, k, 128, best[1], outliers=ko))
            del layers, args
            torch.cuda.empty_cache()


def tensor_core_sweep(out: pathlib.Path, gpu: str, ms=(1, 4, 16), flips_only: bool = False) -> None:
    """The tensor-core GEMV against the table's rows: M = 1 on the three shapes and the stacked ones, M = 4 and 16
    on the three shapes (those of `ms`); the winners replace the rows (kernels/configs and OUT/configs-<gpu>.json);
    then the benchmark rows of M = 1, 4 and 16 -> OUT/kernels-<gpu>-tc.json."""
    import time

    t0 = time.time()
    table_path = CONFIG_DIR / f"{TABLE_OF.get(gpu, gpu)}.json"
    table = json.loads(table_path.read_text())
    with (out / "tc-sweep.jsonl").open("w") as log:
        for m, shapes in ((1, bench.SHAPES + STACKED_SHAPES), (4, bench.SHAPES), (16, bench.SHAPES)):
            if m not in ms:
                continue
            extra = TC_CANDIDATES_M1 if m == 1 else [c for c in TC_CANDIDATES if not c.l2]
            if flips_only:
                extra = []
            sweep_rows(table, shapes, log, t0, m, extra)
            text = json.dumps(table, indent=1)  # each M's rows survive a run cut short
            (out / f"configs-{gpu}.json").write_text(text)
            table_path.write_text(text)
    _device_facts.cache_clear()
    print(f"[{time.time() - t0:.0f}s] benchmark", flush=True)
    bench.bench_kernels(out / f"kernels-{gpu}-tc.json", ms=(1, 4, 16))
    print(f"[{time.time() - t0:.0f}s] done", flush=True)


def quick(out: pathlib.Path, gpu: str, stacked_only: bool = False) -> None:
    """M = 1 sweep (`sweep_rows`) of the three shapes and the stacked ones into the table; then (unless stacked_only)
    every kernel (default configs, M = 1, 2, 16, 64) checked on CUDA against PackedLinear.dequantize(), and the
    benchmark rows of M = 1 and 16 on the three shapes (same method as the full run) -> OUT/kernels-<gpu>-quick.json."""
    import time

    t0 = time.time()
    table_path = CONFIG_DIR / f"{TABLE_OF.get(gpu, gpu)}.json"  # an H200 re-tunes the H100 table it runs
    table = json.loads(table_path.read_text())
    with (out / "quick-sweep.jsonl").open("w") as log:
        sweep_rows(table, STACKED_SHAPES if stacked_only else bench.SHAPES + STACKED_SHAPES, log, t0)
    text = json.dumps(table, indent=1)
    (out / f"configs-{gpu}.json").write_text(text)
    table_path.write_text(text)
    if stacked_only:
        return
    _device_facts.cache_clear()
    for n, k in bench.SHAPES:  # every kernel, default configurations, against the dequantized reference
        layer = bench.random_layer(n, k, 1, "cuda", seed=100)
        args = tuple(getattr(layer, t) for t in TENSOR_ORDER)
        counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
        w = layer.dequantize(torch.float32)
        for m in (1, 2, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = mixed_matmul(x, args, group_size=128, outliers=1, counters=counters).float()
            ref = x.float() @ w.t()
            err = float((y - ref).norm() / ref.norm())
            print(f"check {n}x{k} m={m}: rel err {err:.2e} {'ok' if err < MAX_REL_ERR else 'FAIL'}", flush=True)
        x = torch.randn(2, k, device="cuda", dtype=torch.float16)
        for cfg in (KernelConfig("gemv2", rows=16, pairs=2, split=2), KernelConfig("gemv2", rows=4, early4=True)):
            y = mixed_matmul(x, args, group_size=128, outliers=1, counters=counters, config=cfg).float()
            err = float((y - x.float() @ w.t()).norm() / (x.float() @ w.t()).norm())
            print(f"check {n}x{k} m=2 {cfg}: rel err {err:.2e} {'ok' if err < MAX_REL_ERR else 'FAIL'}", flush=True)
    print(f"[{time.time() - t0:.0f}s] benchmark", flush=True)
    bench.bench_kernels(out / f"kernels-{gpu}-quick.json", ms=(1, 16))
    print(f"[{time.time() - t0:.0f}s] pytest -k 'gemv_h2 or dispatch' on CUDA", flush=True)
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels",
                              "-k", "gemv_h2 or dispatch"], capture_output=True, text=True,
                             timeout=max(10, 200 - (time.time() - t0)), env={**os.environ, "TRITON_INTERPRET": "0"})
        (out / "pytest-quick.log").write_text(res.stdout + res.stderr)
        print(res.stdout[-600:], flush=True)
    except subprocess.TimeoutExpired:
        print("pytest: out of time", flush=True)
    print(f"[{time.time() - t0:.0f}s] done", flush=True)


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().lower().replace("nvidia", "").split()[0]
    if "--tc" in sys.argv:  # optionally --tc-m 4,16: only those activation row counts
        ms = sys.argv[sys.argv.index("--tc-m") + 1] if "--tc-m" in sys.argv else "1,4,16"
        return tensor_core_sweep(out, gpu, tuple(int(m) for m in ms.split(",")), "--flips-only" in sys.argv)
    if "--quick" in sys.argv or "--stacked" in sys.argv:
        return quick(out, gpu, stacked_only="--stacked" in sys.argv)
    if "--skip-tests" not in sys.argv:
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"],
                             capture_output=True, text=True, env=env)
        (out / "pytest.log").write_text(res.stdout + res.stderr)
        print(res.stdout[-1500:], flush=True)
    if "--skip-sweep" not in sys.argv:
        table = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "configs": sweep(out, bench.SHAPES + STACKED_SHAPES)}
        text = json.dumps(table, indent=1)
        (out / f"configs-{gpu}.json").write_text(text)
        CONFIG_DIR.mkdir(exist_ok=True)
        (CONFIG_DIR / f"{gpu}.json").write_text(text)
        _device_facts.cache_clear()
    bench.bench_kernels(out / f"kernels-{gpu}.json")


if __name__ == "__main__":
    main()
