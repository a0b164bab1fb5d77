"""Probe (GPU, temporary): the M = 1 tensor-core GEMV with a row tile's split shares as the warps of one program,
summed through shared memory, against the committed split-K rows (one warp a share, partials through a global
workspace and an atomic counter).

Why: on the persistent grid (gpu_persist_probe.py) two shares a warp took twice the time of one, with the next
share's first loads in flight: the time of a share is a chain of latencies, not bandwidth. The split-K epilogue
(store, atomic, the last arrival's re-reads) is part of that chain; a reduction inside the program is not.
Writes $OUT/tile-kernels.jsonl; prints a table."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

from gpu_kernels import STACKED_SHAPES, time_config  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.dispatch import TENSOR_ORDER, scratch_words  # noqa: E402
from kernels.gemv_tc import _accumulate, _load_iter, _values  # noqa: E402
from mpq.bench import kernels as bench  # noqa: E402


@triton.jit
def _stream_w(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile, n_slots, w, g, t, pre,
              W: tl.constexpr, BITS: tl.constexpr, OUTLIERS: tl.constexpr, U: tl.constexpr):
    per = tl.cdiv(tl.cdiv(n_slots, W), U) * U
    start = w * per
    end = tl.minimum(start + per, n_slots)
    first = tile * n_slots
    z = tl.zeros([W, 32], tl.float32)
    acc = (z, z, z, z, z, z, z, z)
    acc_o = (z, z, z, z)
    nxt = pre
    for i in range(0, per, U):
        cur = nxt
        nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first, start + i + U, end, g, t, BITS,
                         OUTLIERS, U, True)
        acc, acc_o = _accumulate(acc, acc_o, q_ptr, ov_ptr, oi_ptr, x_ptr, xw_ptr, xw_ptr, cur, g, t, 1, 0, BITS,
                                 OUTLIERS, U, 1, True, True, False)
    return acc, acc_o


@triton.jit
def _first(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile, n_slots, w, g, t, W: tl.constexpr,
           BITS: tl.constexpr, OUTLIERS: tl.constexpr, U: tl.constexpr):
    per = tl.cdiv(tl.cdiv(n_slots, W), U) * U
    start = w * per
    return _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile * n_slots, start,
                      tl.minimum(start + per, n_slots), g, t, BITS, OUTLIERS, U, True)


@triton.jit
def _tile_kernel(x_ptr, xw_ptr, y_ptr, q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                 q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr, N, n2, n4,
                 OUTLIERS: tl.constexpr, W: tl.constexpr, U2: tl.constexpr, U4: tl.constexpr, PDL: tl.constexpr):
    tile = tl.program_id(0)
    w = tl.arange(0, W)[:, None]
    lane = tl.arange(0, 32)[None, :]
    g = lane // 4
    t = lane % 4
    pre2 = _first(q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, tile, n2, w, g, t, W, 2, OUTLIERS, U2)
    pre4 = _first(q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, tile, n4, w, g, t, W, 4, 0, U4)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    p2, o2 = _stream_w(x_ptr, xw_ptr, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, tile, n2, w, g, t, pre2, W, 2,
                       OUTLIERS, U2)
    p4, _ = _stream_w(x_ptr, xw_ptr, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, tile, n4, w, g, t, pre4, W, 4, 0,
                      U4)
    rg = tile * 16 + g
    s2g = tl.load(ss2_ptr + rg).to(tl.float32)
    s2h = tl.load(ss2_ptr + rg + 8).to(tl.float32)
    s4g = tl.load(ss4_ptr + rg).to(tl.float32)
    s4h = tl.load(ss4_ptr + rg + 8).to(tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7 = p2
    b0, b1, b2, b3, b4, b5, b6, b7 = p4
    v0, v1, v2, v3 = _values((a0, a1, a2, a3), (b0, b1, b2, b3), o2, s2g, s2h, s4g, s4h)
    r0 = tl.sum(v0, axis=0)
    r2 = tl.sum(v2, axis=0)
    lane1 = tl.arange(0, 32)
    g1 = lane1 // 4
    t1 = lane1 % 4
    rows = tl.where(t1 == 0, tile * 16 + g1, tile * 16 + g1 + 8)
    tl.store(y_ptr + rows, tl.where(t1 == 0, r0, r2).to(y_ptr.dtype.element_ty), mask=(t1 < 2) & (rows < N))


def gemv_tile(x, y, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *, outliers, warps, u2, u4, pdl=True):
    T = q2.shape[0]
    _tile_kernel[(T,)](x, x.view(torch.int32), y, q2.view(torch.int64), s2, z2, ss2, idx2, ov, oi,
                       q4.view(torch.int64), s4, z4, ss4, idx4, y.shape[1], q2.shape[1], q4.shape[1],
                       OUTLIERS=outliers, W=warps, U2=u2, U4=u4, PDL=pdl, num_warps=warps,
                       **({"launch_pdl": True} if pdl else {}))
    return y


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    t0 = time.time()
    _, table = dispatch._device_facts(torch.device("cuda"))
    log = (out / "tile-kernels.jsonl").open("w")
    for n, k in bench.SHAPES + STACKED_SHAPES:
        for ko in (1, 0):
            key = next((kk for kk in ((1, n, k, 128, ko > 0), (1, n, k, 128, None)) if kk in table), None)
            layers = [bench.random_layer(n, k, ko, "cuda", seed=i) for i in range(bench.ROTATE)]
            args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in layers]
            counters = torch.zeros(scratch_words(n, 16, 16), dtype=torch.int32, device="cuda")
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ layers[0].dequantize(torch.float32).t()
            rows = []
            if key is not None:
                us, err = time_config(x, args, ref, counters, table[key], f"{n}x{k}", ko)
                rows.append(("committed " + str(dataclasses.asdict(table[key])), us, err))
            ys = [torch.empty(1, n, dtype=torch.float16, device="cuda") for _ in args]
            for warps in (2, 4, 8):
                for u2, u4 in ((1, 1), (2, 1), (2, 2)):
                    def run():
                        return [gemv_tile(x, yy, *a, outliers=ko, warps=warps, u2=u2, u4=u4) for a, yy in zip(args, ys)]
                    try:
                        for yy in ys:
                            yy.fill_(float("nan"))
                        y = run()[0].float()
                        err = float((y - ref).norm() / ref.norm())
                        us = bench._graph_us(run) if err < 2e-3 else float("inf")
                    except Exception as e:  # noqa: BLE001
                        print(f"{n}x{k} warps {warps}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        us, err = float("inf"), float("nan")
                    rows.append((f"tile warps {warps} u2 {u2} u4 {u4}", us, err))
            for name, us, err in rows:
                print(f"{n}x{k} k={ko} {name[:60]:60s} {us:7.2f} us err {err:.1e} [{time.time() - t0:.0f}s]", flush=True)
                log.write(json.dumps({"shape": f"{n}x{k}", "outliers": ko, "variant": name, "us": us, "rel_err": err}) + "\n")
            log.flush()
            del layers, args
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
