"""Would a lane-ordered weight layout speed up the M = 1 tensor-core GEMV? (GPU probe, timing only.)

The tensor-core GEMV's lane issues 8 loads for each 2-bit slot beside its x words: two 8-byte code words (rows g
and g + 8, 256 bytes apart in format v1), the zeros word, two scale bytes, the group column, an outlier value and
its offset. In a layout in fragment order (benchmarks/kernels-notes.md, "What is left") the two code words are one
16-byte load, the two scale codes one 16-bit word, an outlier's value and offset one 32-bit word: 5 loads. This
probe runs the GEMV's own slot arithmetic (`kernels.gemv_tc`'s `_frag_dot` and `_outlier_dot`, one-slot register
prefetch, one warp per row tile and share) over random buffers of format v1's sizes, with format v1's loads
(`_load_slot`), with the lane-ordered ones, and with each part of that change; 2-bit slots with one outlier each,
on the 7B shapes at the table's splits. The outputs are not checked (the buffers are random; both variants do the same arithmetic).
Graph-replayed, 8 rotating buffer sets, the variants alternated twice; writes $OUT/lane-layout-probe.json."""

from __future__ import annotations

import json
import os
import statistics

import torch
import triton
import triton.language as tl

import kernels.gemv_tc as tc
from mpq.bench.kernels import ROTATE, random_layer
# two code words of a lane in one 16-byte load, predicated as a masked load
LOAD_PAIR = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b64 $0, 0; mov.b64 $1, 0; "
                         "@p ld.global.v2.u64 {$0, $1}, [$2]; }")


@triton.jit
def _load(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, ts, g, t, valid, CODES: tl.constexpr, SCALES: tl.constexpr,
          OUTWORD: tl.constexpr):
    """_load_slot's values (2-bit, one outlier, M = 1). CODES: the lane's two code words from the lane-ordered
    layout ([slot, g, t, row g / g + 8] int64) in one load; SCALES: the two scale codes as one 16-bit word
    ([slot, g, row g / g + 8]); OUTWORD: the outlier as one 32-bit word (value bits | offset << 16, in ov_ptr)."""
    v1 = tc._load_slot(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, ts, g, t, valid, 2, 1, True)
    wa, wb, wc, wd, zg, zh, sg, sh, col, ovg, ovh, oig, oih, ts, valid = v1
    if CODES:
        wa, wb = tl.inline_asm_elementwise(LOAD_PAIR, "=l,=l,l,r",
                                           [q_ptr + ((ts * 8 + g) * 4 + t) * 2, valid.to(tl.int32)],
                                           dtype=(tl.int64, tl.int64), is_pure=True, pack=1)
    if SCALES:
        s16 = tl.load(s_ptr.to(tl.pointer_type(tl.int16)) + ts * 8 + g, mask=valid, other=0).to(tl.int32)
        sg = (s16 & 0xFF).to(tl.uint8)
        sh = ((s16 >> 8) & 0xFF).to(tl.uint8)
    if OUTWORD:
        oc = tl.load(ov_ptr.to(tl.pointer_type(tl.int32)) + ts * 16 + g + 8 * t, mask=valid & (t < 2), other=0)
        ovg = (oc & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        oig = ((oc >> 16) & 0xFF).to(tl.uint8)
    return wa, wb, wa, wb, zg, zh, sg, sh, col, ovg, ovg, oig, oig, ts, valid


@triton.jit
def _probe_kernel(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, x_ptr, xw_ptr, y_ptr, n_slots,
                  SPLIT: tl.constexpr, CODES: tl.constexpr, SCALES: tl.constexpr, OUTWORD: tl.constexpr):
    """The loads of the loads `_load` replaces are dead and compile away; OUTWORD: ov_ptr holds the merged outlier
    words (int32, twice fp16's bytes, so its v1 reads stay in bounds)."""
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    start, end = tc._share(n_slots, sp, SPLIT, 1)
    first = tile * n_slots
    nxt = _load(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first + start, g, t, start + t * 0 < end, CODES,
                SCALES, OUTWORD)
    z = tl.zeros([32], tl.float32)
    acc = (z, z, z, z, z, z, z, z)
    acc_o = (z, z, z, z)
    for s in range(start, end):
        cur = nxt
        nxt = _load(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first + s + 1, g, t, s + 1 + t * 0 < end,
                    CODES, SCALES, OUTWORD)
        acc = tc._add8(acc, tc._frag_dot(q_ptr, x_ptr, xw_ptr, cur, g, t, 1, 0, 0, 2, 1, True, True, False))
        acc_o = tc._add4(acc_o, tc._outlier_dot(ov_ptr, oi_ptr, x_ptr, x_ptr, cur, g, t, 1, 0, 0, 1, True, 0))
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    o0, o1, o2, o3 = acc_o
    tl.store(y_ptr + (tile * SPLIT + sp) * 32 + lane, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + o0 + o1 + o2 + o3)


VARIANTS = {"format v1 loads": (False, False, False), "code words paired": (True, False, False),
            "scale codes paired": (False, True, False), "outlier in one word": (False, False, True),
            "codes and scales paired (no extra bytes)": (True, True, False), "all three": (True, True, True)}


def _buffers(rows: int, k: int, lane: bool, seed: int) -> tuple:
    """The format tensors of a random all-2-bit, one-outlier layer (`mpq.bench.kernels.random_layer`); lane: the
    outliers as one int32 word each (value bits | offset << 16)."""
    p = random_layer(rows, k, 1, "cuda", seed=seed, n4=0)
    ov = p.ov
    if lane:
        ov = (ov.view(torch.int16).to(torch.int32) & 0xFFFF) | (p.oi.to(torch.int32) << 16)
    return p.q2.view(torch.int64), p.s2, p.z2, p.idx2, ov, p.oi


def probe(rows: int, k: int, split: int) -> dict[str, float]:
    x = (torch.randn(k, device="cuda") * 0.5).half()
    xw = x.view(torch.int32)
    times = {name: [] for name in VARIANTS}
    sets = {name: [_buffers(rows, k, out, seed) for seed in range(ROTATE)] for name, (_, _, out) in VARIANTS.items()}
    y = torch.empty(rows // 16 * split * 32, device="cuda")
    for _ in range(2):
        for name, (codes, scales, outword) in VARIANTS.items():

            def run():
                for q, s, z, idx, ov, oi in sets[name]:
                    _probe_kernel[(rows // 16, split)](q, s, z, idx, ov, oi, x, xw, y, k // 128, SPLIT=split,
                                                       CODES=codes, SCALES=scales, OUTWORD=outword, num_warps=1)
            run()
            torch.cuda.synchronize()
            times[name].append(triton.testing.do_bench_cudagraph(run, rep=40, return_mode="median") * 1000 / ROTATE)
            print(f"{rows}x{k} split {split} {name:40s} {times[name][-1]:.2f} us", flush=True)
    return times


def main() -> None:
    rows = [{"shape": f"{n}x{k}", "split": split, "us": probe(n, k, split)}
            for n, k, split in ((11008, 4096, 8), (4096, 11008, 16), (12288, 4096, 4))]
    for row in rows:
        v1 = statistics.median(row["us"]["format v1 loads"])
        print(row["shape"] + ": " + ", ".join(f"{n} {statistics.median(ts):.2f} us ({v1 / statistics.median(ts):.3f}x)"
                                             for n, ts in row["us"].items()))
    out = os.environ.get("OUT", "benchmarks/results")
    with open(os.path.join(out, "lane-layout-probe.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", ""),
                   "torch": torch.__version__, "triton": triton.__version__,
                   "what": "the tensor-core GEMV's 2-bit slot loop (one outlier a row, M = 1) over random buffers, "
                   "format v1's 8 loads a slot against a lane-ordered layout's 5 and each part of that change; "
                   "graph-replayed us a call, 8 rotating buffer sets, two alternations; timing only",
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
