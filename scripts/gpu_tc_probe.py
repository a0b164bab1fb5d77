"""PROBE (not wired in): the M = 1 decode GEMV with its dot on tensor cores.

One warp per (row tile, split share). Lane l = (g, t) = (l // 4, l % 4) holds rows g and g + 8 of the 16-row tile
and, per group, word pair t (2-bit) or pairs t and t + 4 (4-bit); PRMT joins the two words' halves so that each
fp16x2 register holds the codes of two adjacent columns. Per 16-column block: decode 4 A registers
(LOP3 mask|magic, HFMA2 -> (c - z) / 16, exact), load 2 x words as B (every lane loads x at its own k, so all 8
columns of B equal x and every lane's C holds the row result), one mma.m16n8k16 (fp32 accumulate). C starts at
zero per group and is scaled by the group's scale code in fp32. Outliers and split-K are left out of this first cut.

Column mapping (format v1, pack_codes: column e of a group row sits in word e % W at code position e // W):
2-bit g=128 (W = 8): word pair t holds columns 8j + 2t, +1 for j = 0..15; block b takes j = 2b (mma k 2t, 2t+1)
and j = 2b + 1 (k 2t + 8, 2t + 9), i.e. column 16b + k. 4-bit (W = 16): pairs t and t + 4 hold columns 16j + 2t
and 16j + 2t + 8; block b takes j = b. In both, block b's x words are pair indices 8b + t and 8b + 4 + t.

Run on a GPU: PYTHONPATH=. python scripts/gpu_tc_probe.py OUT.json  (checks against PackedLinear.dequantize, then
graph-times it against mixed_matmul on all-2-bit layers without outliers, 16/32/64-row tiles, split-K 1..8).
"""

import torch
import triton
import triton.language as tl

_PLAN2 = [(0, m) for m in range(5)] + [(10, m) for m in range(3)]  # per half-word code position: (shift, magic index)
_K2 = {m: (4 ** m, 0x6400 - 0x800 * m) for m in range(5)}  # zero multiplier, fp16 magic 2^(10-2m)
_PLAN4 = [(0, 0), (0, 1), (8, 0), (8, 1)]
_K4 = {0: (1, 0x6400), 1: (16, 0x5400)}


def _mask(bits: int, m: int) -> int:
    one = ((1 << bits) - 1) << (bits * m)
    return one | one << 16


def _tc_asm(bits: int) -> str:
    """PTX for one group of one lane: outputs $0, $1 = the group dots of rows g and g + 8 ((c - z)/16 * x summed).
    Inputs (2-bit): $2 row g pair (b64), $3 row g+8 pair, $4 zg, $5 zg8, $6.. 16 x words.
    Inputs (4-bit): $2 row g pair t, $3 row g pair t+4, $4 row g+8 pair t, $5 row g+8 pair t+4, $6 zg, $7 zg8,
    $8.. 16 x words."""
    plan, kof = (_PLAN2, _K2) if bits == 2 else (_PLAN4, _K4)
    pairs = ["A", "B"] if bits == 2 else ["A", "C", "B", "D"]  # A, C: row g (pair t, t+4); B, D: row g+8
    rows_of = {"A": "g", "B": "h", "C": "g", "D": "h"}
    lines = ["{", ".reg .b32 s16, tt0, tt1, tt2, tt3;", ".reg .f32 c0, c1, c2, c3;", "mov.b32 s16, 0x2C002C00;"]
    for p in pairs:
        lines.append(f".reg .b32 w{p}0, w{p}1, u{p}0, u{p}1, v{p}0, v{p}1;")
    for r in ("g", "h"):
        lines.append(".reg .b32 " + ", ".join(f"k{r}{m}" for m in kof) + ";")
    for i, p in enumerate(pairs):
        lines.append(f"mov.b64 {{w{p}0, w{p}1}}, ${2 + i};")
        lines.append(f"prmt.b32 u{p}0, w{p}0, w{p}1, 0x5410;")  # low halves: code positions 0.. of both words
        lines.append(f"prmt.b32 u{p}1, w{p}0, w{p}1, 0x7632;")  # high halves
        shift = max(s for s, _ in plan)
        lines.append(f"shr.u32 v{p}0, u{p}0, {shift};")
        lines.append(f"shr.u32 v{p}1, u{p}1, {shift};")
    zg, zh = 2 + len(pairs), 3 + len(pairs)
    for r, z in (("g", zg), ("h", zh)):
        for m, (mul, magic) in kof.items():
            lines.append(f"mad.lo.u32 k{r}{m}, ${z}, {mul * 65537}, 0x{((magic - 0x1000) | 0x8000) * 65537:08X};")
    lines += ["mov.f32 c0, 0f00000000;", "mov.f32 c1, 0f00000000;", "mov.f32 c2, 0f00000000;", "mov.f32 c3, 0f00000000;"]
    per_half = len(plan)
    first_x = zh + 1

    def decode(dst: str, p: str, j: int) -> list[str]:
        half, i = divmod(j, per_half)
        shift, m = plan[i]
        src = f"{'v' if shift else 'u'}{p}{half}"
        return [f"lop3.b32 {dst}, {src}, 0x{_mask(bits, m):08X}, 0x{kof[m][1] * 65537:08X}, 0xEA;",
                f"fma.rn.f16x2 {dst}, {dst}, s16, k{rows_of[p]}{m};"]

    for b in range(8):
        if bits == 2:  # a0a1: row g, j = 2b; a2a3: row g+8, j = 2b; a4a5: row g, j = 2b+1; a6a7: row g+8, j = 2b+1
            srcs = [("A", 2 * b), ("B", 2 * b), ("A", 2 * b + 1), ("B", 2 * b + 1)]
        else:  # pair t for k 2t.., pair t+4 for k 2t+8.., code position j = b
            srcs = [("A", b), ("B", b), ("C", b), ("D", b)]
        for n, (p, j) in enumerate(srcs):
            lines += decode(f"tt{n}", p, j)
        lines.append("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {c0, c1, c2, c3}, {tt0, tt1, tt2, tt3}, "
                     f"{{${first_x + 2 * b}, ${first_x + 2 * b + 1}}}, {{c0, c1, c2, c3}};")
    lines += ["mov.f32 $0, c0;", "mov.f32 $1, c2;", "}"]
    return "\n".join(lines)


TC2 = tl.constexpr(_tc_asm(2))
TC4 = tl.constexpr(_tc_asm(4))
CONS2 = tl.constexpr("=f,=f,l,l,r,r" + ",r" * 16)
CONS4 = tl.constexpr("=f,=f,l,l,l,l,r,r" + ",r" * 16)


@triton.jit
def _x16(xw, base, t):
    """Block b's two x words (pairs 8b + t and 8b + 4 + t), b = 0..7, in mma order."""
    p = xw + base + t
    return (tl.load(p), tl.load(p + 4), tl.load(p + 8), tl.load(p + 12), tl.load(p + 16), tl.load(p + 20),
            tl.load(p + 24), tl.load(p + 28), tl.load(p + 32), tl.load(p + 36), tl.load(p + 40), tl.load(p + 44),
            tl.load(p + 48), tl.load(p + 52), tl.load(p + 56), tl.load(p + 60))



@triton.jit
def _block(xw_ptr, q_ptr, s_ptr, z_ptr, ts, row, t, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14,
           x15, BITS: tl.constexpr, R: tl.constexpr):
    """One 16-row mma block of one slot (this lane: rows row and row + 8): their scale-code-weighted dots."""
    rh = row + 8
    if BITS == 2:
        wa = tl.load(q_ptr + (ts * R + row) * 4 + t)
        wb = tl.load(q_ptr + (ts * R + rh) * 4 + t)
        zg = (tl.load(z_ptr + ts * (R // 4) + row // 4).to(tl.int32) >> ((row % 4) * 2)) & 3
        zh = (tl.load(z_ptr + ts * (R // 4) + rh // 4).to(tl.int32) >> ((row % 4) * 2)) & 3
        cg, ch = tl.inline_asm_elementwise(TC2, CONS2, [wa, wb, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                                                        x11, x12, x13, x14, x15],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        wa = tl.load(q_ptr + (ts * R + row) * 8 + t)
        wc = tl.load(q_ptr + (ts * R + row) * 8 + t + 4)
        wb = tl.load(q_ptr + (ts * R + rh) * 8 + t)
        wd = tl.load(q_ptr + (ts * R + rh) * 8 + t + 4)
        zg = (tl.load(z_ptr + ts * (R // 2) + row // 2).to(tl.int32) >> ((row % 2) * 4)) & 15
        zh = (tl.load(z_ptr + ts * (R // 2) + rh // 2).to(tl.int32) >> ((row % 2) * 4)) & 15
        cg, ch = tl.inline_asm_elementwise(TC4, CONS4, [wa, wc, wb, wd, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8,
                                                        x9, x10, x11, x12, x13, x14, x15],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    sg = tl.load(s_ptr + ts * R + row).to(tl.float32)
    sh = tl.load(s_ptr + ts * R + rh).to(tl.float32)
    return sg * cg, sh * ch


@triton.jit
def _tc_stream(xw_ptr, q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, sp, g, t, BITS: tl.constexpr, R: tl.constexpr,
               SPLIT: tl.constexpr):
    """This program's share of one stream: per 16-row block b, the dots of rows 16b + g and 16b + g + 8."""
    per = tl.cdiv(n_slots, SPLIT)
    start = sp * per
    end = tl.minimum(start + per, n_slots)
    a0 = tl.zeros([32], tl.float32)
    b0 = tl.zeros([32], tl.float32)
    a1 = tl.zeros([32], tl.float32)
    b1 = tl.zeros([32], tl.float32)
    a2 = tl.zeros([32], tl.float32)
    b2 = tl.zeros([32], tl.float32)
    a3 = tl.zeros([32], tl.float32)
    b3 = tl.zeros([32], tl.float32)
    for s in range(start, end):
        ts = tile * n_slots + s
        base = tl.load(idx_ptr + ts + t * 0).to(tl.int32) * 64
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _x16(xw_ptr, base, t)
        u, v = _block(xw_ptr, q_ptr, s_ptr, z_ptr, ts, g, t, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12,
                      x13, x14, x15, BITS, R)
        a0 += u
        b0 += v
        if R >= 32:
            u, v = _block(xw_ptr, q_ptr, s_ptr, z_ptr, ts, g + 16, t, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                          x11, x12, x13, x14, x15, BITS, R)
            a1 += u
            b1 += v
        if R >= 64:
            u, v = _block(xw_ptr, q_ptr, s_ptr, z_ptr, ts, g + 32, t, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                          x11, x12, x13, x14, x15, BITS, R)
            a2 += u
            b2 += v
            u, v = _block(xw_ptr, q_ptr, s_ptr, z_ptr, ts, g + 48, t, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                          x11, x12, x13, x14, x15, BITS, R)
            a3 += u
            b3 += v
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def _emit(y_ptr, ss2_ptr, ss4_ptr, r, t, p2, p4):
    val = (tl.load(ss2_ptr + r).to(tl.float32) * p2 + tl.load(ss4_ptr + r).to(tl.float32) * p4) * 16.0
    tl.atomic_add(y_ptr + r, val, mask=t == 0, sem="relaxed")


@triton.jit
def _tc_kernel(xw_ptr, y_ptr, q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
               n2, n4, R: tl.constexpr, SPLIT: tl.constexpr):
    """One warp per (row tile, split share); R / 16 mma row blocks share each x fragment. y is fp32, zeroed,
    and receives atomic adds (probe only)."""
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    a0, b0, a1, b1, a2, b2, a3, b3 = _tc_stream(xw_ptr, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, tile, n2, sp, g, t, 2, R,
                                                SPLIT)
    c0, d0, c1, d1, c2, d2, c3, d3 = _tc_stream(xw_ptr, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, tile, n4, sp, g, t, 4, R,
                                                SPLIT)
    r = tile * R + g
    _emit(y_ptr, ss2_ptr, ss4_ptr, r, t, a0, c0)
    _emit(y_ptr, ss2_ptr, ss4_ptr, r + 8, t, b0, d0)
    if R >= 32:
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 16, t, a1, c1)
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 24, t, b1, d1)
    if R >= 64:
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 32, t, a2, c2)
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 40, t, b2, d2)
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 48, t, a3, c3)
        _emit(y_ptr, ss2_ptr, ss4_ptr, r + 56, t, b3, d3)


# ---- R = 16 with U slots per iteration and the next iteration's loads in flight (PF) ----
@triton.jit
def _load16(q_ptr, s_ptr, z_ptr, idx_ptr, ts, g, t, valid, BITS: tl.constexpr):
    """One slot of a 16-row tile for this lane (rows g, g + 8): code words, zeros, scale codes, x word offset."""
    if BITS == 2:
        wa = tl.load(q_ptr + (ts * 16 + g) * 4 + t, mask=valid, other=0)
        wb = tl.load(q_ptr + (ts * 16 + g + 8) * 4 + t, mask=valid, other=0)
        wc = wa
        wd = wb
        zw = tl.load(z_ptr.to(tl.pointer_type(tl.int32)) + ts + t * 0, mask=valid, other=0)
        zg = (zw >> (2 * g)) & 3
        zh = (zw >> (2 * g + 16)) & 3
    else:
        wa = tl.load(q_ptr + (ts * 16 + g) * 8 + t, mask=valid, other=0)
        wc = tl.load(q_ptr + (ts * 16 + g) * 8 + t + 4, mask=valid, other=0)
        wb = tl.load(q_ptr + (ts * 16 + g + 8) * 8 + t, mask=valid, other=0)
        wd = tl.load(q_ptr + (ts * 16 + g + 8) * 8 + t + 4, mask=valid, other=0)
        zw = tl.load(z_ptr.to(tl.pointer_type(tl.int64)) + ts + t * 0, mask=valid, other=0)
        zg = ((zw >> (4 * g)) & 15).to(tl.int32)
        zh = ((zw >> (4 * g + 32)) & 15).to(tl.int32)
    sg = tl.load(s_ptr + ts * 16 + g, mask=valid, other=0)
    sh = tl.load(s_ptr + ts * 16 + g + 8, mask=valid, other=0)
    base = tl.load(idx_ptr + ts + t * 0, mask=valid, other=0).to(tl.int32) * 64
    return wa, wb, wc, wd, zg, zh, sg, sh, base


@triton.jit
def _dot16(xw_ptr, t, sl, BITS: tl.constexpr):
    wa, wb, wc, wd, zg, zh, sg, sh, base = sl
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _x16(xw_ptr, base, t)
    if BITS == 2:
        cg, ch = tl.inline_asm_elementwise(TC2, CONS2, [wa, wb, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10,
                                                        x11, x12, x13, x14, x15],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        cg, ch = tl.inline_asm_elementwise(TC4, CONS4, [wa, wc, wb, wd, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8,
                                                        x9, x10, x11, x12, x13, x14, x15],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return sg.to(tl.float32) * cg, sh.to(tl.float32) * ch


@triton.jit
def _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, s, end, g, t, BITS: tl.constexpr, U: tl.constexpr):
    base = tile * n_slots + s
    a = _load16(q_ptr, s_ptr, z_ptr, idx_ptr, base, g, t, s < end, BITS)
    b = a
    c = a
    d = a
    if U >= 2:
        b = _load16(q_ptr, s_ptr, z_ptr, idx_ptr, base + 1, g, t, s + 1 < end, BITS)
    if U >= 4:
        c = _load16(q_ptr, s_ptr, z_ptr, idx_ptr, base + 2, g, t, s + 2 < end, BITS)
        d = _load16(q_ptr, s_ptr, z_ptr, idx_ptr, base + 3, g, t, s + 3 < end, BITS)
    return a, b, c, d


@triton.jit
def _dot_iter(xw_ptr, t, it, BITS: tl.constexpr, U: tl.constexpr):
    a, b, c, d = it
    ug, uh = _dot16(xw_ptr, t, a, BITS)
    if U >= 2:
        vg, vh = _dot16(xw_ptr, t, b, BITS)
        ug += vg
        uh += vh
    if U >= 4:
        vg, vh = _dot16(xw_ptr, t, c, BITS)
        ug += vg
        uh += vh
        vg, vh = _dot16(xw_ptr, t, d, BITS)
        ug += vg
        uh += vh
    return ug, uh


@triton.jit
def _stream16(xw_ptr, q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, sp, g, t, BITS: tl.constexpr,
              SPLIT: tl.constexpr, U: tl.constexpr, PF: tl.constexpr):
    per = tl.cdiv(tl.cdiv(n_slots, SPLIT), U) * U
    start = sp * per
    end = tl.minimum(start + per, n_slots)
    acc_g = tl.zeros([32], tl.float32)
    acc_h = tl.zeros([32], tl.float32)
    if PF:
        nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, start, end, g, t, BITS, U)
        for s in range(start, end, U):
            cur = nxt
            nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, s + U, end, g, t, BITS, U)
            ug, uh = _dot_iter(xw_ptr, t, cur, BITS, U)
            acc_g += ug
            acc_h += uh
    else:
        for s in range(start, end, U):
            cur = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, tile, n_slots, s, end, g, t, BITS, U)
            ug, uh = _dot_iter(xw_ptr, t, cur, BITS, U)
            acc_g += ug
            acc_h += uh
    return acc_g, acc_h


@triton.jit
def _tc16_kernel(xw_ptr, y_ptr, q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                 n2, n4, SPLIT: tl.constexpr, U: tl.constexpr, PF: tl.constexpr):
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    a2g, a2h = _stream16(xw_ptr, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, tile, n2, sp, g, t, 2, SPLIT, U, PF)
    a4g, a4h = _stream16(xw_ptr, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, tile, n4, sp, g, t, 4, SPLIT, 1, False)
    r = tile * 16 + g
    _emit(y_ptr, ss2_ptr, ss4_ptr, r, t, a2g, a4g)
    _emit(y_ptr, ss2_ptr, ss4_ptr, r + 8, t, a2h, a4h)


def tc16_gemv(x, y, layer, split: int, unroll: int, prefetch: bool):
    assert layer.tile_rows == 16 and layer.outliers == 0
    _tc16_kernel[(layer.row_tiles, split)](
        x.view(torch.int32), y, layer.q2.view(torch.int64), layer.s2, layer.z2, layer.ss2, layer.idx2,
        layer.q4.view(torch.int64), layer.s4, layer.z4, layer.ss4, layer.idx4, layer.q2.shape[1], layer.q4.shape[1],
        SPLIT=split, U=unroll, PF=prefetch, num_warps=1)
    return y


def tc_gemv(x, y, layer, split: int):
    """y [N] fp32 (zeroed) += x [1, K] @ W.T for a format-v1 layer with g = 128 and no outliers (probe)."""
    assert x.shape[0] == 1 and x.dtype == torch.float16 and layer.group_size == 128 and layer.outliers == 0
    _tc_kernel[(layer.row_tiles, split)](
        x.view(torch.int32), y, layer.q2.view(torch.int64), layer.s2, layer.z2, layer.ss2, layer.idx2,
        layer.q4.view(torch.int64), layer.s4, layer.z4, layer.ss4, layer.idx4, layer.q2.shape[1], layer.q4.shape[1],
        R=layer.tile_rows, SPLIT=split, num_warps=1)
    return y


def random_layer(n: int, k: int, tile_rows: int, n4: int, seed: int, device="cuda"):
    """A format-v1 layer with random fields, n4 4-bit groups per row tile, no outliers."""
    from mpq.quant.format import PackedLinear

    gen = torch.Generator(device=device).manual_seed(seed)
    g, R = 128, tile_rows
    T, G = n // R, k // g
    order = torch.rand(T, G, generator=gen, device=device).argsort(dim=1).to(torch.int16)
    ri = lambda lo, hi, *shape, dt: torch.randint(lo, hi, shape, generator=gen, device=device, dtype=dt)  # noqa: E731
    return PackedLinear(
        out_features=n, in_features=k, group_size=g, tile_rows=R, n4=n4, outliers=0,
        q2=ri(-2**31, 2**31 - 1, T, G - n4, R, g // 16, dt=torch.int32),
        q4=ri(-2**31, 2**31 - 1, T, n4, R, g // 8, dt=torch.int32),
        s2=ri(1, 256, T, G - n4, R, dt=torch.uint8), z2=ri(0, 256, T, G - n4, R // 4, dt=torch.uint8),
        s4=ri(1, 256, T, n4, R, dt=torch.uint8), z4=ri(0, 256, T, n4, R // 2, dt=torch.uint8),
        ss2=(torch.rand(n, generator=gen, device=device) * 1e-3 + 1e-3).half(),
        ss4=(torch.rand(n, generator=gen, device=device) * 1e-4 + 1e-4).half(),
        idx2=order[:, n4:].contiguous(), idx4=order[:, :n4].contiguous(),
        ov=torch.zeros(T, G - n4, R, 0, device=device).half(), oi=ri(0, 1, T, G - n4, R, 0, dt=torch.uint8),
    )


if __name__ == "__main__":
    import json
    import sys

    import triton.testing

    import kernels.dispatch as dispatch
    from kernels.dispatch import TENSOR_ORDER, mixed_matmul

    def graph_us(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1000 / 8

    rows = []
    for n, k in ((11008, 4096), (4096, 11008), (4096, 4096), (22016, 4096)):
        n4 = (k // 128) // 16  # ~6% 4-bit groups, like the artifacts' mix
        x = (torch.randn(1, k, device="cuda") * 0.5).half()
        l16 = [random_layer(n, k, 16, n4, seed=i) for i in range(8)]
        counters = torch.zeros(16 * n // 16, dtype=torch.int32, device="cuda")
        args = [tuple(getattr(p, t) for t in TENSOR_ORDER) for p in l16]
        ref = x.float() @ l16[0].dequantize().t()
        err = lambda out: float((out.float().reshape(-1) - ref.reshape(-1)).norm() / ref.norm())  # noqa: E731
        rec = {"shape": f"{n}x{k}", "n4": n4, "stored_bytes": l16[0].stored_bytes()}
        rec["committed_err"] = err(mixed_matmul(x, args[0], group_size=128, outliers=0, counters=counters))
        rec["committed_us"] = graph_us(lambda: [mixed_matmul(x, a, group_size=128, outliers=0, counters=counters)
                                                for a in args])
        dispatch.PDL = False
        rec["committed_nopdl_us"] = graph_us(lambda: [mixed_matmul(x, a, group_size=128, outliers=0,
                                                                   counters=counters) for a in args])
        dispatch.PDL = True
        ys = [torch.zeros(n, device="cuda") for _ in l16]
        for split in (2, 4, 8, 16):
            for unroll in (1, 2, 4):
                for pf in (False, True):
                    y0 = torch.zeros(n, device="cuda")
                    tc16_gemv(x, y0, l16[0], split, unroll, pf)
                    e = err(y0)
                    us = graph_us(lambda: [tc16_gemv(x, y, p, split, unroll, pf) for y, p in zip(ys, l16)])
                    rec[f"tc16_s{split}_u{unroll}{'_pf' if pf else ''}"] = {"us": us, "err": e}
        rows.append(rec)
        best = min((v["us"], key) for key, v in rec.items() if key.startswith("tc"))
        print(f"{n}x{k}: committed {rec['committed_us']:.1f} us (no PDL {rec['committed_nopdl_us']:.1f}), "
              f"best tensor-core {best[1]} {best[0]:.1f} us", flush=True)
        print({k2: (round(v["us"], 1), f"{v['err']:.1e}") for k2, v in rec.items() if k2.startswith("tc")}, flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": rows}
    if len(sys.argv) > 1:
        json.dump(out, open(sys.argv[1], "w"), indent=1)
