"""Decode GEMV on tensor cores for format v1: M = 1..16 activation rows, fp16, g = 128, 16-row tiles (CUDA).

One warp per (row tile, K-split share). A slot's 16 x 128 block of (code - zero) / 16 is decoded straight into the
A fragments of eight mma.m16n8k16 (fp32 accumulate), whose B columns are up to 8 activation rows; M = 9..16 feed
the same decoded fragments to a second mma. The products and the sum over the group run on the tensor cores, so
what is left per two weights is the decode of gemv_h2 (one LOP3, one HFMA2), and M up to 8 costs what M = 1 costs.

Fragments (PTX ISA, mma.m16n8k16 .f16): lane l = (g, t) = (l // 4, l % 4) holds A rows g and g + 8 at k = 2t, 2t+1
(registers a0a1, a2a3) and k = 2t+8, 2t+9 (a4a5, a6a7); B column g at the same k; C rows g, g + 8 at columns 2t,
2t + 1. Format v1 puts column e of a group row in word e % W at code position e // W, so word pair t (2-bit,
W = 8) holds columns 8j + 2t, 8j + 2t + 1 for j = 0..15: k-block b takes j = 2b (k = 2t..) and j = 2b + 1
(k = 2t + 8..), i.e. column 16b + k. 4-bit (W = 16): pairs t and t + 4 hold columns 16j + 2t.. and 16j + 2t + 8..,
k-block b takes j = b. In both, k-block b reads the x words (fp16 pairs) 8b + t and 8b + 4 + t of the group.

The decode is gemv_h2's (`half2_decode`): (code - zero) / 16 in fp16x2, exact; the 1/16 is undone with the scales.
Lanes load their rows' zeros, scale codes and outliers themselves.

With `xfrag`, B comes from a fragment-ordered copy of x (`x_fragments`, one small kernel before the GEMV): each
lane's 16 words of a group lie in four 16-byte chunks, and a warp's loads of one chunk are 512 contiguous bytes. The
plain layout needs 16 four-byte loads a slot, and at M > 1 each touches 8 activation rows.

A ragged stack (`parts`) runs linears that share an input and differ only in n4 as one launch over their
concatenated tensors: each program shifts its streams' pointers by its part's offset, so the slot arithmetic stays
the one above (`mpq.runtime.quant_linear.RaggedQuantLinear`).

FAST=False computes the same per-lane values in fp32 from whole group rows, without inline PTX, so that the
interpreter checks everything around the fragments (slot ranges, split-K, scales, outliers, output mapping).
"""

import torch
import triton
import triton.language as tl

from kernels import half2_decode as half2
from kernels.exit_flag import skipped_tile
from kernels.splitk import finish_split, finish_split_tagged

TILE_ROWS = 16  # tile rows the fragments assume
GROUP_SIZE = 128  # group size they assume
MAX_M = 16  # two mma column blocks of 8 activation rows
ROWS = tl.constexpr(TILE_ROWS)
GROUP = tl.constexpr(GROUP_SIZE)

def _frag_asm(bits: int, blocks: int) -> str:
    """PTX for one slot of one lane: outputs $0.. = C of each activation block (4 fp32: rows g, g + 8 x columns
    2t, 2t + 1) = sum over the group of (c - z) / 16 * x. Inputs: the lane's word pairs (2-bit: rows g, g + 8;
    4-bit: row g pairs t, t + 4, then row g + 8's), the zeros of rows g and g + 8, then per activation block the
    16 x words in k-block order."""
    plan = half2.PLAN[bits]
    pairs = ["A", "B"] if bits == 2 else ["A", "C", "B", "D"]  # A, C: row g; B, D: row g + 8
    row_of = {"A": "g", "B": "h", "C": "g", "D": "h"}
    n_out = 4 * blocks
    acc = [[f"c{n}{i}" for i in range(4)] for n in range(blocks)]
    lines = ["{", ".reg .b32 s16, a0, a1, a2, a3;", ".reg .f32 " + ", ".join(sum(acc, [])) + ";",
             f"mov.b32 s16, {half2.SIXTEENTH};"]
    shift = half2.shift(bits)
    for i, p in enumerate(pairs):
        lines += [f".reg .b32 w{p}0, w{p}1, u{p}0, u{p}1, v{p}0, v{p}1;", f"mov.b64 {{w{p}0, w{p}1}}, ${n_out + i};",
                  f"prmt.b32 u{p}0, w{p}0, w{p}1, 0x5410;",  # low halves: code positions 0.. of both words
                  f"prmt.b32 u{p}1, w{p}0, w{p}1, 0x7632;",  # high halves
                  f"shr.u32 v{p}0, u{p}0, {shift};", f"shr.u32 v{p}1, u{p}1, {shift};"]
    zero_g = n_out + len(pairs)
    for r, z in (("g", zero_g), ("h", zero_g + 1)):  # the zero terms of rows g and g + 8
        lines.append(".reg .b32 " + ", ".join(f"k{r}{m}" for m in half2.MAGIC[bits]) + ";")
        lines += half2.zero_terms(f"k{r}", f"${z}", bits)
    lines += [f"mov.f32 {c}, 0f00000000;" for c in sum(acc, [])]
    first_x = zero_g + 2

    def decode(dst: str, p: str, j: int) -> list[str]:
        half, i = divmod(j, len(plan))
        sh, m = plan[i]
        return half2.decode(dst, f"{'v' if sh else 'u'}{p}{half}", bits, m, f"k{row_of[p]}{m}", "s16")

    for b in range(8):
        srcs = ([("A", 2 * b), ("B", 2 * b), ("A", 2 * b + 1), ("B", 2 * b + 1)] if bits == 2
                else [("A", b), ("B", b), ("C", b), ("D", b)])
        for n, (p, j) in enumerate(srcs):
            lines += decode(f"a{n}", p, j)
        for n in range(blocks):
            c = ", ".join(acc[n])
            x = first_x + 16 * n + 2 * b
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{c}}}, {{a0, a1, a2, a3}}, "
                         f"{{${x}, ${x + 1}}}, {{{c}}};")
    lines += [f"mov.f32 ${4 * n + i}, {acc[n][i]};" for n in range(blocks) for i in range(4)]
    return "\n".join(lines + ["}"])


def _cons(bits: int, blocks: int) -> str:
    return ",".join(["=f"] * 4 * blocks + ["l"] * (2 if bits == 2 else 4) + ["r"] * (2 + 16 * blocks))


FRAG2 = tl.constexpr(_frag_asm(2, 1))
FRAG4 = tl.constexpr(_frag_asm(4, 1))
FRAG2_2 = tl.constexpr(_frag_asm(2, 2))
FRAG4_2 = tl.constexpr(_frag_asm(4, 2))
CONS2 = tl.constexpr(_cons(2, 1))
CONS4 = tl.constexpr(_cons(4, 1))
CONS2_2 = tl.constexpr(_cons(2, 2))
CONS4_2 = tl.constexpr(_cons(4, 2))


@triton.jit
def _x16(xw_ptr, base):
    """The 16 x words of one activation row and slot, in k-block order (words 8b + t, 8b + 4 + t; base holds t)."""
    p = xw_ptr + base
    return (tl.load(p), tl.load(p + 4), tl.load(p + 8), tl.load(p + 12), tl.load(p + 16), tl.load(p + 20),
            tl.load(p + 24), tl.load(p + 28), tl.load(p + 32), tl.load(p + 36), tl.load(p + 40), tl.load(p + 44),
            tl.load(p + 48), tl.load(p + 52), tl.load(p + 56), tl.load(p + 60))


LOAD4 = tl.constexpr("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];")


@triton.jit
def _x16_frag(xf_ptr, base, STEP: tl.constexpr):
    """The same 16 words from the fragment-ordered copy: four 16-byte loads at base, base + STEP, .. (words)."""
    out = ()
    for i in tl.static_range(4):
        out = out + tl.inline_asm_elementwise(LOAD4, "=r,=r,=r,=r,l", [xf_ptr + base + i * STEP],
                                              dtype=(tl.int32,) * 4, is_pure=False, pack=1)
    return out


def _blocks(m: int) -> int:
    """mma column blocks of 8 activation rows."""
    return 1 if m <= 8 else 2


def _fragment_region(m: int, k: int) -> int:
    """int32 words of the fragments alone (what the GEMV's xp_ptr skips)."""
    return (k // GROUP_SIZE) * (64 if m == 1 else _blocks(m) * 512)


def fragment_words(m: int, k: int) -> int:
    """int32 words of x_fragments' output for m activation rows and k columns: the fragments, then (m > 1) the
    pair words."""
    return _fragment_region(m, k) + (0 if m == 1 else k * 4 * _blocks(m))


@triton.jit
def _x_fragments_kernel(xw_ptr, xf_ptr, M, stride_xw, n_frag, total, SINGLE: tl.constexpr, BLOCKS: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    """xf word o < n_frag = x word (row, col * 64 + w): M = 1 as [group, chunk i, lane t, 4], else as [group,
    activation block, chunk i, lane 4g + t, 4]; chunk i, word j is the lane's fragment word f = 4i + j, i.e. x word
    8 (f // 2) + 4 (f % 2) + t of activation row 8 block + g (zero past M). M > 1: then the pair words, [column,
    4 BLOCKS]: word p of a column holds activations 2p, 2p + 1 there (the outliers' gathers)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(0) * BLOCK < n_frag:  # M > 1: n_frag is a multiple of BLOCK
        j = o % 4
        if SINGLE:
            t = (o // 4) % 4
            i = (o // 16) % 4
            col = o // 64
            row = o * 0
        else:
            lane = (o // 4) % 32
            t = lane % 4
            i = (o // 128) % 4
            row = ((o // 512) % BLOCKS) * 8 + lane // 4
            col = o // (512 * BLOCKS)
        f = 4 * i + j
        w = 8 * (f // 2) + 4 * (f % 2) + t
        v = tl.load(xw_ptr + row * stride_xw + col * (GROUP // 2) + w, mask=(o < n_frag) & (row < M), other=0)
        tl.store(xf_ptr + o, v, mask=o < n_frag)
    else:
        p = o - n_frag
        a = (p % (4 * BLOCKS)) * 2
        c = p // (4 * BLOCKS)
        ok = o < total
        xh = xw_ptr.to(tl.pointer_type(tl.int16))
        lo = tl.load(xh + a * (2 * stride_xw) + c, mask=ok & (a < M), other=0).to(tl.int32) & 0xFFFF
        hi = tl.load(xh + (a + 1) * (2 * stride_xw) + c, mask=ok & (a + 1 < M), other=0).to(tl.int32)
        tl.store(xf_ptr + o, lo | (hi << 16), mask=ok)


def x_fragments(x: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """x [M, K] fp16 (M <= 16, K a multiple of 128, rows of whole words) in the tensor-core GEMV's fragment order,
    as int32 words (M > 1: then the pair words of its outliers)."""
    m, k = x.shape
    total, n_frag = fragment_words(m, k), _fragment_region(m, k)
    xf = torch.empty(total, dtype=torch.int32, device=x.device)
    block = 512
    _x_fragments_kernel[(triton.cdiv(total, block),)](
        x.view(torch.int32), xf, m, x.stride(0) // 2, n_frag, total, SINGLE=m == 1, BLOCKS=_blocks(m),
        BLOCK=block, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return xf


@triton.jit
def _load_slot(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, ts, g, t, valid, BITS: tl.constexpr,
               OUTLIERS: tl.constexpr, SINGLE: tl.constexpr):
    """A slot's weights for this lane (rows g, g + 8): code word pairs, zeros, scale codes, group column, and the
    first outlier of each row (SINGLE: of the one row the lane writes). Weights only: safe before the PDL wait."""
    if BITS == 2:
        wa = tl.load(q_ptr + (ts * ROWS + g) * 4 + t, mask=valid, other=0)
        wb = tl.load(q_ptr + (ts * ROWS + g + 8) * 4 + t, mask=valid, other=0)
        wc = wa
        wd = wb
        zw = tl.load(z_ptr.to(tl.pointer_type(tl.int32)) + ts + t * 0, mask=valid, other=0)  # 2 bits per row
        zg = (zw >> (2 * g)) & 3
        zh = (zw >> (2 * g + 16)) & 3
    else:
        wa = tl.load(q_ptr + (ts * ROWS + g) * 8 + t, mask=valid, other=0)
        wc = tl.load(q_ptr + (ts * ROWS + g) * 8 + t + 4, mask=valid, other=0)
        wb = tl.load(q_ptr + (ts * ROWS + g + 8) * 8 + t, mask=valid, other=0)
        wd = tl.load(q_ptr + (ts * ROWS + g + 8) * 8 + t + 4, mask=valid, other=0)
        zw = tl.load(z_ptr.to(tl.pointer_type(tl.int64)) + ts + t * 0, mask=valid, other=0)  # 4 bits per row
        zg = ((zw >> (4 * g)) & 15).to(tl.int32)
        zh = ((zw >> (4 * g + 32)) & 15).to(tl.int32)
    sg = tl.load(s_ptr + ts * ROWS + g, mask=valid, other=0)
    sh = tl.load(s_ptr + ts * ROWS + g + 8, mask=valid, other=0)
    col = tl.load(idx_ptr + ts + t * 0, mask=valid, other=0).to(tl.int32)
    if OUTLIERS > 0 and SINGLE:  # M = 1: lane t = 0 takes row g's first outlier, t = 1 row g + 8's (it writes it)
        og = (ts * ROWS + g + 8 * t) * OUTLIERS
        ovg = tl.load(ov_ptr + og, mask=valid & (t < 2), other=0.0)
        oig = tl.load(oi_ptr + og, mask=valid & (t < 2), other=0)
        ovh = ovg
        oih = oig
    elif OUTLIERS > 0:
        og = (ts * ROWS + g) * OUTLIERS
        oh = og + 8 * OUTLIERS
        ovg = tl.load(ov_ptr + og, mask=valid, other=0.0)
        ovh = tl.load(ov_ptr + oh, mask=valid, other=0.0)
        oig = tl.load(oi_ptr + og, mask=valid, other=0)
        oih = tl.load(oi_ptr + oh, mask=valid, other=0)
    else:
        ovg = sg
        ovh = sg
        oig = sg
        oih = sg
    return wa, wb, wc, wd, zg, zh, sg, sh, col, ovg, ovh, oig, oih, ts, valid


@triton.jit
def _plain_dot(q_ptr, ts, row, zero, x_ptr, xrow, col, a_ok, BITS: tl.constexpr):
    """sum over the group of (c - z) / 16 * x[xrow] for one row per lane, fp32, from the whole group row."""
    W: tl.constexpr = GROUP * BITS // 32
    e = tl.arange(0, GROUP)[None, :]
    words = tl.load(q_ptr.to(tl.pointer_type(tl.int32)) + (ts * ROWS + row)[:, None] * W + e % W)
    code = (words >> (BITS * (e // W))) & ((1 << BITS) - 1)
    x = tl.load(x_ptr + xrow[:, None] + col[:, None] * GROUP + e, mask=a_ok[:, None], other=0.0).to(tl.float32)
    return tl.sum((code - zero[:, None]).to(tl.float32) * x, axis=1) * 0.0625


@triton.jit
def _frag_dot(q_ptr, x_ptr, xw_ptr, sl, g, t, M, stride_xm, N0: tl.constexpr, BITS: tl.constexpr,
              BLOCKS: tl.constexpr, SINGLE: tl.constexpr, FAST: tl.constexpr, XF: tl.constexpr):
    """C of activation block N0 // 8 (and N0 // 8 + 1 when BLOCKS == 2) for one slot: 4 values each (rows g, g + 8
    x activations N0 + 2t, N0 + 2t + 1), scaled by the rows' scale codes. XF: xw_ptr is x_fragments' output."""
    wa, wb, wc, wd, zg, zh, sg, sh, col, ovg, ovh, oig, oih, ts, valid = sl
    fg = sg.to(tl.float32)
    fh = sh.to(tl.float32)
    if FAST:
        if XF and SINGLE:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _x16_frag(
                xw_ptr, col * 64 + t * 4, 16)
        elif XF:
            fb = col * (BLOCKS * 512) + (g * 4 + t) * 4
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _x16_frag(xw_ptr, fb, 128)
        else:
            xb = col * (GROUP // 2) + t
            r0 = tl.minimum(N0 + g, M - 1) * (stride_xm // 2)  # B column g: activation row N0 + g (clamped)
            if SINGLE:
                r0 = 0
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _x16(xw_ptr, r0 + xb)
        if BLOCKS == 1:
            if BITS == 2:
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    FRAG2, CONS2, [wa, wb, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14,
                                   x15], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            else:
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    FRAG4, CONS4, [wa, wc, wb, wd, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12,
                                   x13, x14, x15], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            d0, d1, d2, d3 = c0, c1, c2, c3
        else:
            if XF:
                y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = _x16_frag(
                    xw_ptr, fb + 512, 128)
            else:
                r1 = tl.minimum(N0 + 8 + g, M - 1) * (stride_xm // 2)
                y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = _x16(xw_ptr, r1 + xb)
            if BITS == 2:
                c0, c1, c2, c3, d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    FRAG2_2, CONS2_2, [wa, wb, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13,
                                       x14, x15, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14,
                                       y15], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            else:
                c0, c1, c2, c3, d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    FRAG4_2, CONS4_2, [wa, wc, wb, wd, zg, zh, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11,
                                       x12, x13, x14, x15, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12,
                                       y13, y14, y15], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        a = N0 + 2 * t
        if SINGLE:  # as on the tensor cores: every column of C is activation 0
            a = t * 0
        c0 = _plain_dot(q_ptr, ts, g, zg, x_ptr, a * stride_xm, col, valid & (a < M), BITS)
        c1 = _plain_dot(q_ptr, ts, g, zg, x_ptr, (a + 1) * stride_xm, col, valid & (a + 1 < M), BITS)
        c2 = _plain_dot(q_ptr, ts, g + 8, zh, x_ptr, a * stride_xm, col, valid & (a < M), BITS)
        c3 = _plain_dot(q_ptr, ts, g + 8, zh, x_ptr, (a + 1) * stride_xm, col, valid & (a + 1 < M), BITS)
        if BLOCKS == 2:
            a = a + 8
            d0 = _plain_dot(q_ptr, ts, g, zg, x_ptr, a * stride_xm, col, valid & (a < M), BITS)
            d1 = _plain_dot(q_ptr, ts, g, zg, x_ptr, (a + 1) * stride_xm, col, valid & (a + 1 < M), BITS)
            d2 = _plain_dot(q_ptr, ts, g + 8, zh, x_ptr, a * stride_xm, col, valid & (a < M), BITS)
            d3 = _plain_dot(q_ptr, ts, g + 8, zh, x_ptr, (a + 1) * stride_xm, col, valid & (a + 1 < M), BITS)
        else:
            d0, d1, d2, d3 = c0, c1, c2, c3
    return fg * c0, fg * c1, fh * c2, fh * c3, fg * d0, fg * d1, fh * d2, fh * d3


@triton.jit
def _pair(xp_ptr, word, mask):
    """Activations 2w, 2w + 1 of one column from x_fragments' pair words, as fp32."""
    w = tl.load(xp_ptr + word, mask=mask, other=0)
    lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((w >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _outlier_dot(ov_ptr, oi_ptr, x_ptr, xp_ptr, sl, g, t, M, stride_xm, N0: tl.constexpr, OUTLIERS: tl.constexpr,
                 SINGLE: tl.constexpr, XP: tl.constexpr):
    """The fp16 outliers of rows g, g + 8 times activations N0 + 2t, N0 + 2t + 1, fp32 (no scales). SINGLE (M = 1):
    lane t = 0 writes row g and t = 1 row g + 8 (every lane's C holds both), so each computes its row's only.
    XP > 0 (M > 1 with x_fragments): both activations of a column in one word of xp_ptr, XP words a column."""
    wa, wb, wc, wd, zg, zh, sg, sh, col, ovg, ovh, oig, oih, ts, valid = sl
    pw = col * (GROUP * XP) + N0 // 2 + t  # XP > 0: the pair word of (group column 0, activations N0 + 2t, + 1);
    # the offsets are uint8: widened before scaling
    if SINGLE:  # this lane's one first outlier (_load_slot), for the row it writes
        xg = x_ptr + col * GROUP
        ok0 = valid & (t < 2)
        e0 = ovg.to(tl.float32) * tl.load(xg + oig, mask=ok0, other=0.0).to(tl.float32)
        e1 = e0 * 0.0
        e2 = e0
        e3 = e1
    elif XP > 0:  # rows past M are zero words
        ok0 = valid
        ok1 = valid
        xg = x_ptr
        lo, hi = _pair(xp_ptr, pw + oig.to(tl.int32) * XP, valid)
        e0 = ovg.to(tl.float32) * lo
        e1 = ovg.to(tl.float32) * hi
        lo, hi = _pair(xp_ptr, pw + oih.to(tl.int32) * XP, valid)
        e2 = ovh.to(tl.float32) * lo
        e3 = ovh.to(tl.float32) * hi
    else:
        a = N0 + 2 * t
        ok0 = valid & (a < M)
        ok1 = valid & (a + 1 < M)
        xg = x_ptr + a * stride_xm + col * GROUP
        e0 = ovg.to(tl.float32) * tl.load(xg + oig, mask=ok0, other=0.0).to(tl.float32)
        e2 = ovh.to(tl.float32) * tl.load(xg + oih, mask=ok0, other=0.0).to(tl.float32)
        e1 = ovg.to(tl.float32) * tl.load(xg + stride_xm + oig, mask=ok1, other=0.0).to(tl.float32)
        e3 = ovh.to(tl.float32) * tl.load(xg + stride_xm + oih, mask=ok1, other=0.0).to(tl.float32)
    for k in tl.static_range(1, OUTLIERS):  # further outliers of a row: loaded here (recipes make at most one)
        if SINGLE:
            f = (ts * ROWS + g + 8 * t) * OUTLIERS + k
            v = tl.load(ov_ptr + f, mask=ok0, other=0.0).to(tl.float32)
            e0 += v * tl.load(xg + tl.load(oi_ptr + f, mask=ok0, other=0), mask=ok0, other=0.0).to(tl.float32)
            e2 = e0
        else:
            fg = (ts * ROWS + g) * OUTLIERS + k
            fh = fg + 8 * OUTLIERS
            vg = tl.load(ov_ptr + fg, mask=valid, other=0.0).to(tl.float32)
            vh = tl.load(ov_ptr + fh, mask=valid, other=0.0).to(tl.float32)
            ig = tl.load(oi_ptr + fg, mask=valid, other=0)
            ih = tl.load(oi_ptr + fh, mask=valid, other=0)
            if XP > 0:
                lo, hi = _pair(xp_ptr, pw + ig.to(tl.int32) * XP, valid)
                e0 += vg * lo
                e1 += vg * hi
                lo, hi = _pair(xp_ptr, pw + ih.to(tl.int32) * XP, valid)
                e2 += vh * lo
                e3 += vh * hi
            else:
                e0 += vg * tl.load(xg + ig, mask=ok0, other=0.0).to(tl.float32)
                e2 += vh * tl.load(xg + ih, mask=ok0, other=0.0).to(tl.float32)
                e1 += vg * tl.load(xg + stride_xm + ig, mask=ok1, other=0.0).to(tl.float32)
                e3 += vh * tl.load(xg + stride_xm + ih, mask=ok1, other=0.0).to(tl.float32)
    return e0, e1, e2, e3


@triton.jit
def _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first, s, end, g, t, BITS: tl.constexpr,
               OUTLIERS: tl.constexpr, U: tl.constexpr, SINGLE: tl.constexpr):
    """Slots s .. s + U - 1 (U = 1 or 2) of a program's share."""
    sv = s + t * 0  # as a [32] vector: the masks must be (the interpreter does not broadcast a scalar mask)
    a = _load_slot(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first + s, g, t, sv < end, BITS, OUTLIERS, SINGLE)
    b = a
    if U == 2:
        b = _load_slot(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first + s + 1, g, t, sv + 1 < end, BITS,
                       OUTLIERS, SINGLE)
    return a, b


@triton.jit
def _add8(acc, part):
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    p0, p1, p2, p3, p4, p5, p6, p7 = part
    return a0 + p0, a1 + p1, a2 + p2, a3 + p3, a4 + p4, a5 + p5, a6 + p6, a7 + p7


@triton.jit
def _add4(acc, part):
    a0, a1, a2, a3 = acc
    p0, p1, p2, p3 = part
    return a0 + p0, a1 + p1, a2 + p2, a3 + p3


@triton.jit
def _accumulate(acc, acc_o, acc_o2, q_ptr, ov_ptr, oi_ptr, x_ptr, xw_ptr, xp_ptr, it, g, t, M, stride_xm,
                BITS: tl.constexpr, OUTLIERS: tl.constexpr, U: tl.constexpr, BLOCKS: tl.constexpr, FAST: tl.constexpr,
                SINGLE: tl.constexpr, XF: tl.constexpr):
    """One loop step's U slots added into the stream's sums (acc: C of both activation blocks; acc_o, acc_o2: the
    outliers of blocks 0 and 1)."""
    XP: tl.constexpr = 4 * BLOCKS if XF and not SINGLE else 0  # x_fragments' pair words a column (outliers)
    a, b = it
    acc = _add8(acc, _frag_dot(q_ptr, x_ptr, xw_ptr, a, g, t, M, stride_xm, 0, BITS, BLOCKS, SINGLE, FAST, XF))
    if OUTLIERS > 0:
        acc_o = _add4(acc_o, _outlier_dot(ov_ptr, oi_ptr, x_ptr, xp_ptr, a, g, t, M, stride_xm, 0, OUTLIERS, SINGLE,
                                                  XP))
    if U == 2:
        acc = _add8(acc, _frag_dot(q_ptr, x_ptr, xw_ptr, b, g, t, M, stride_xm, 0, BITS, BLOCKS, SINGLE, FAST, XF))
        if OUTLIERS > 0:
            acc_o = _add4(acc_o, _outlier_dot(ov_ptr, oi_ptr, x_ptr, xp_ptr, b, g, t, M, stride_xm, 0, OUTLIERS,
                                                      SINGLE, XP))
    if OUTLIERS > 0 and BLOCKS == 2:
        acc_o2 = _add4(acc_o2, _outlier_dot(ov_ptr, oi_ptr, x_ptr, xp_ptr, a, g, t, M, stride_xm, 8, OUTLIERS, False,
                                            XP))
        if U == 2:
            acc_o2 = _add4(acc_o2, _outlier_dot(ov_ptr, oi_ptr, x_ptr, xp_ptr, b, g, t, M, stride_xm, 8, OUTLIERS,
                                                False, XP))
    return acc, acc_o, acc_o2


@triton.jit
def _share(n_slots, sp, SPLIT: tl.constexpr, U: tl.constexpr):
    """Slot range [start, end) of split share sp: whole loop steps of U slots."""
    per = tl.cdiv(tl.cdiv(n_slots, SPLIT), U) * U
    start = sp * per
    return start, tl.minimum(start + per, n_slots)


# one 128-byte line per lane into L2, nothing into registers (the result is a dummy; not pure, so it stays)
PREFETCH_LINE = tl.constexpr("{ .reg .pred p; setp.lt.s32 p, $2, $3; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }")


@triton.jit
def _prefetch_l2(ptr, first, count, lane, BYTES: tl.constexpr):
    """Ask L2 for elements [first, first + count) of ptr's tensor (BYTES each): the lanes take 128-byte lines."""
    base = ptr.to(tl.pointer_type(tl.int8)) + first * BYTES
    nbytes = count * BYTES
    for off in range(0, nbytes, 32 * 128):
        o = off + lane * 128
        tl.inline_asm_elementwise(PREFETCH_LINE, "=r,l,r,r", [base + o, o, nbytes + lane * 0], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_share(q_ptr, s_ptr, ov_ptr, oi_ptr, tile, n_slots, sp, lane, BITS: tl.constexpr,
                    OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, U: tl.constexpr):
    """A program's codes, scale codes and outliers of one stream are contiguous: all of them into L2 at once, so
    that its loads wait for L2, not DRAM."""
    start, end = _share(n_slots, sp, SPLIT, U)
    first = tile * n_slots + start
    count = tl.maximum(end - start, 0)
    _prefetch_l2(q_ptr, first * ROWS, count * ROWS, lane, GROUP * BITS // 8)
    _prefetch_l2(s_ptr, first * ROWS, count * ROWS, lane, 1)
    if OUTLIERS > 0:
        _prefetch_l2(ov_ptr, first * ROWS * OUTLIERS, count * ROWS * OUTLIERS, lane, 2)
        _prefetch_l2(oi_ptr, first * ROWS * OUTLIERS, count * ROWS * OUTLIERS, lane, 1)


@triton.jit
def _all_loads(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile, n_slots, sp, g, t, BITS: tl.constexpr,
               OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, U: tl.constexpr, SINGLE: tl.constexpr,
               STEPS: tl.constexpr):
    """Every loop step's loads of a program's share of one stream (STEPS steps of U slots; those past the share
    masked), as one tuple."""
    start, end = _share(n_slots, sp, SPLIT, U)
    loads = ()
    for i in tl.static_range(STEPS):
        loads = loads + (_load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile * n_slots, start + i * U, end,
                                    g, t, BITS, OUTLIERS, U, SINGLE),)
    return loads


@triton.jit
def _stream(x_ptr, xw_ptr, xp_ptr, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, gen_ptr, tile, n_slots, sp, g,
            t, M, stride_xm, pre, skip_ptr, keep_tiles, BITS: tl.constexpr, OUTLIERS: tl.constexpr,
            SPLIT: tl.constexpr, U: tl.constexpr, PF: tl.constexpr, BLOCKS: tl.constexpr, SINGLE: tl.constexpr,
            FAST: tl.constexpr, PDL: tl.constexpr, XF: tl.constexpr, STEPS: tl.constexpr = -1):
    """This program's share of one stream: 8 scaled sums (C of up to two activation blocks) and the outlier sums
    of block 0 (4) and block 1 (4), fp32 [32] each. With PF the next U slots' loads are issued before this U's
    arithmetic; with PDL the first loads are issued before the wait for the previous kernel; `pre`, unless None:
    the first step's loads, issued by the caller. gen_ptr, unless None: the fenceless epilogue's generation word,
    read right after the wait (its latency then hides behind the stream) and returned; else 0 is returned.
    skip_ptr, unless None: the exit flag (`kernels.exit_flag`), read after the wait; a skipped tile runs no
    iteration, and the last value returned says so. STEPS >= 0: the share's steps unrolled, every step's loads
    issued first (`pre`, unless None: all of them, from `_all_loads`)."""
    start, end = _share(n_slots, sp, SPLIT, U)
    first = tile * n_slots
    z = tl.zeros([32], tl.float32)
    acc = (z, z, z, z, z, z, z, z)
    acc_o = (z, z, z, z)
    acc_o2 = (z, z, z, z)
    if STEPS >= 0:
        nxt = pre if pre is not None else _all_loads(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, tile, n_slots, sp,
                                                     g, t, BITS, OUTLIERS, SPLIT, U, SINGLE, STEPS)
    elif pre is None:
        nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first, start, end, g, t, BITS, OUTLIERS, U,
                         SINGLE)
    else:
        nxt = pre
    if PDL:  # weights are in flight; x is the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    gen = 0
    if gen_ptr is not None:
        gen = tl.load(gen_ptr, cache_modifier=".cg")
    skipped = False
    if skip_ptr is not None:
        skipped = skipped_tile(skip_ptr, tile, keep_tiles)
        end = tl.where(skipped, start, end)
    if STEPS >= 0:  # a skipped tile's sums are computed and dropped
        for i in tl.static_range(STEPS):
            acc, acc_o, acc_o2 = _accumulate(acc, acc_o, acc_o2, q_ptr, ov_ptr, oi_ptr, x_ptr, xw_ptr, xp_ptr, nxt[i],
                                             g, t, M, stride_xm, BITS, OUTLIERS, U, BLOCKS, FAST, SINGLE, XF)
    else:
        for s in range(start, end, U):
            cur = nxt
            if PF:
                nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first, s + U, end, g, t, BITS,
                                 OUTLIERS, U, SINGLE)
            acc, acc_o, acc_o2 = _accumulate(acc, acc_o, acc_o2, q_ptr, ov_ptr, oi_ptr, x_ptr, xw_ptr, xp_ptr, cur, g,
                                             t, M, stride_xm, BITS, OUTLIERS, U, BLOCKS, FAST, SINGLE, XF)
            if not PF:
                nxt = _load_iter(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, first, s + U, end, g, t, BITS,
                                 OUTLIERS, U, SINGLE)
    return acc, acc_o, acc_o2, gen, skipped


@triton.jit
def _values(p2, p4, po, s2g, s2h, s4g, s4h):
    """The four outputs of one activation block (rows g, g + 8 x activations 2t, 2t + 1): both streams' sums under
    their second-level scales, times the 16 the decode divided by, plus the outliers."""
    a0, a1, a2, a3 = p2
    b0, b1, b2, b3 = p4
    o0, o1, o2, o3 = po
    return ((s2g * a0 + s4g * b0) * 16.0 + o0, (s2g * a1 + s4g * b1) * 16.0 + o1,
            (s2h * a2 + s4h * b2) * 16.0 + o2, (s2h * a3 + s4h * b3) * 16.0 + o3)


@triton.jit
def _quad(v0, v1, v2, v3):
    """[32, 2 (row g, g + 8), 2 (activation 2t, 2t + 1)]."""
    return tl.join(tl.join(v0, v1), tl.join(v2, v3))


@triton.jit(do_not_specialize=["M", "n2", "n4", "keep_tiles", "t1", "t2", "n2b", "n4b", "n2c", "n4c"])
def _gemv_tc_kernel(x_ptr, xw_ptr, y_ptr, ws_ptr, cnt_ptr, gen_ptr, skip_ptr, keep_tiles,
                    q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                    q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                    M, N, n2, n4, stride_xm, stride_ym, t1, t2, n2b, n4b, n2c, n4c,
                    OUTLIERS: tl.constexpr, SPLIT: tl.constexpr, U: tl.constexpr, PF: tl.constexpr,
                    L2: tl.constexpr, BLOCKS: tl.constexpr, SINGLE: tl.constexpr, FAST: tl.constexpr,
                    PDL: tl.constexpr, XF: tl.constexpr, EARLY4: tl.constexpr, TAGGED: tl.constexpr,
                    GEN_EARLY: tl.constexpr, SKIP: tl.constexpr, STEPS2: tl.constexpr, STEPS4: tl.constexpr,
                    RAGGED: tl.constexpr, ATOMIC: tl.constexpr):
    tile = tl.program_id(0)
    sp = tl.program_id(1)
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    if RAGGED:  # up to three parts with their own slot counts (tiles [0, t1), [t1, t2), [t2, T)): each stream's
        # pointers shift by d slots, so that slot tile * n + s of the part's count n lands in its own tensors
        in_b = tile >= t1
        in_c = tile >= t2
        d2 = tl.where(in_c, t1 * n2 + (t2 - t1) * n2b - t2 * n2c, tl.where(in_b, t1 * (n2 - n2b), 0))
        d4 = tl.where(in_c, t1 * n4 + (t2 - t1) * n4b - t2 * n4c, tl.where(in_b, t1 * (n4 - n4b), 0))
        n2 = tl.where(in_c, n2c, tl.where(in_b, n2b, n2))
        n4 = tl.where(in_c, n4c, tl.where(in_b, n4b, n4))
        q2_ptr += d2 * (ROWS * GROUP // 32)  # int64 words of a 2-bit slot
        s2_ptr += d2 * ROWS
        z2_ptr += d2 * (ROWS // 4)
        idx2_ptr += d2
        ov_ptr += d2 * (ROWS * OUTLIERS)
        oi_ptr += d2 * (ROWS * OUTLIERS)
        q4_ptr += d4 * (ROWS * GROUP // 16)  # int64 words of a 4-bit slot
        s4_ptr += d4 * ROWS
        z4_ptr += d4 * (ROWS // 2)
        idx4_ptr += d4
    if L2 and FAST:  # weights only: before the PDL wait too
        _prefetch_share(q2_ptr, s2_ptr, ov_ptr, oi_ptr, tile, n2, sp, lane, 2, OUTLIERS, SPLIT, U)
        _prefetch_share(q4_ptr, s4_ptr, ov_ptr, oi_ptr, tile, n4, sp, lane, 4, 0, SPLIT, 1)
    xp_ptr = xw_ptr + (n2 + n4) * (BLOCKS * 512)  # XF, M > 1: x_fragments' pair words follow the fragments
    pre4 = None
    if STEPS4 >= 0:  # unrolled: every 4-bit load in flight before the 2-bit stream's
        pre4 = _all_loads(q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, tile, n4, sp, g, t, 4, 0, SPLIT, 1, SINGLE,
                          STEPS4)
    elif EARLY4:  # the 4-bit stream's first slot in flight while the 2-bit stream runs (and before the PDL wait)
        start4, end4 = _share(n4, sp, SPLIT, 1)
        pre4 = _load_iter(q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, tile * n4, start4, end4, g, t, 4, 0, 1,
                          SINGLE)
    p2, o2, o2b, gen, skipped = _stream(x_ptr, xw_ptr, xp_ptr, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                                        gen_ptr + tile if TAGGED and GEN_EARLY else None, tile, n2, sp, g, t, M,
                                        stride_xm, None, skip_ptr if SKIP else None, keep_tiles, 2, OUTLIERS, SPLIT,
                                        U, PF, BLOCKS, SINGLE, FAST, PDL, XF, STEPS2)
    if SKIP:  # the exit flag is set (read in the 2-bit stream, after the PDL wait): no work, y left as it is
        if skipped:
            return
    p4, _, _, _, _ = _stream(x_ptr, xw_ptr, xp_ptr, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, None, tile, n4,
                             sp, g, t, M, stride_xm, pre4, None, 0, 4, 0, SPLIT, 1, PF, BLOCKS, SINGLE, FAST, False,
                             XF, STEPS4)
    rg = tile * ROWS + g
    s2g = tl.load(ss2_ptr + rg).to(tl.float32)
    s2h = tl.load(ss2_ptr + rg + 8).to(tl.float32)
    s4g = tl.load(ss4_ptr + rg).to(tl.float32)
    s4h = tl.load(ss4_ptr + rg + 8).to(tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7 = p2
    b0, b1, b2, b3, b4, b5, b6, b7 = p4
    v0, v1, v2, v3 = _values((a0, a1, a2, a3), (b0, b1, b2, b3), o2, s2g, s2h, s4g, s4h)
    val = _quad(v0, v1, v2, v3)
    rows = _quad(rg, rg, rg + 8, rg + 8)
    if SINGLE and TAGGED:  # lane t = 0 writes row g, t = 1 row g + 8: one value a lane (registers in the epilogue)
        val = tl.where(t == 0, v0, v2)
        rows = tl.where(t == 0, rg, rg + 8)
        acts = t * 0
        mask = (t < 2) & (rows < N)
    elif SINGLE:  # lane t = 0 writes row g, t = 1 row g + 8 (each added that row's outliers)
        acts = _quad(t * 0, t * 0 + 1, t * 0, t * 0 + 1)
        mask = _quad(t == 0, t < 0, t == 1, t < 0) & (rows < N)
    else:
        acts = _quad(2 * t, 2 * t + 1, 2 * t, 2 * t + 1)
        if BLOCKS == 2:
            v0, v1, v2, v3 = _values((a4, a5, a6, a7), (b4, b5, b6, b7), o2b, s2g, s2h, s4g, s4h)
            val = tl.join(val, _quad(v0, v1, v2, v3))
            rows = tl.join(rows, rows)
            acts = tl.join(acts, acts + 8)
        mask = (acts < M) & (rows < N)
    if ATOMIC:  # every share adds its partial sums into y (fp32): no hand-over between the shares
        tl.atomic_add(y_ptr + acts * stride_ym + rows, val, mask=mask, sem="relaxed")
    elif TAGGED:
        finish_split_tagged(val, y_ptr, acts * stride_ym + rows, ws_ptr, acts * N + rows, mask, cnt_ptr + tile,
                            gen_ptr + tile, gen if GEN_EARLY else None, sp, M * N, SPLIT)
    else:
        finish_split(val, y_ptr, acts * stride_ym + rows, ws_ptr, acts * N + rows, mask, cnt_ptr + tile, sp, M * N,
                     SPLIT)


def gemv_tc(x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *, outliers: int,
            split: int, unroll: int = 1, prefetch: bool = True, l2: bool = False, xfrag: bool = False,
            early4: bool = False, gens: torch.Tensor | None = None, gen_early: bool = False, fast: bool,
            pdl: bool = False, skip: torch.Tensor | None = None, keep_tiles: int = 0, unrolled: bool = False,
            parts: tuple[tuple[int, int, int], ...] | None = None, atomic: bool = False):
    """y [M, N] = x [M, K] @ W.T, M <= 16, for format-v1 tensors with 16-row tiles and g = 128; ws fp32
    [split, M, N]; counters int32 [>= N / 16], zero. `fast`: the tensor-core path (fp16 x, CUDA sm_80+, x rows
    of whole 4-byte words); else the plain fp32 path. `unroll`: 1 or 2 slots per loop step; `prefetch`: the next
    step's loads before this step's arithmetic; `l2`: each program first asks L2 for all its weights (prefetch,
    no registers); `xfrag`: B from x_fragments(x) (one more launch, 16-byte loads); `early4`: the 4-bit stream's
    first loads issued before the 2-bit stream runs; `gens` (split > 1): int32 [>= N / 16] generation words, and ws
    is then an int64 workspace [>= split * M * N] that keeps its contents between calls (both zeroed once): the
    split-K epilogue without a fence (`kernels.splitk`); `gen_early`: that epilogue's generation word read right
    after the PDL wait rather than at the end (kernels-notes, version 19: +6.5% on split 4, -2..4% on split 16);
    `pdl`: launched as a programmatic dependent (sm_90+); `skip`, `keep_tiles`: the exit flag
    (`kernels.exit_flag`): skipped row tiles leave y unwritten; `unrolled`: each program's loop unrolled, every
    load of both streams issued before any arithmetic (one compiled kernel per slot count of a share); `parts`:
    a ragged stack (`ragged_layout`), ((row tiles, n2, n4) of each of up to three parts), whose tensors are the
    parts' flattened and concatenated (not `unrolled`); `atomic`: y is fp32 and the product is added to it, each
    split share adding its partial sums by atomics (no hand-over between the shares, so the kernel ends when its
    last share does; the order of the additions varies; ws and counters unused)."""
    M, N = x.shape[0], y.shape[1]
    assert 1 <= M <= MAX_M and unroll in (1, 2)
    if parts is None:
        assert q2.shape[2] == TILE_ROWS and q2.shape[3] == GROUP_SIZE * 2 // 32
        T, n2, n4 = q2.shape[0], q2.shape[1], q4.shape[1]
        part_args = (T, T, n2, n4, n2, n4)
    else:
        assert 2 <= len(parts) <= 3 and not unrolled
        full = tuple(parts) + (parts[-1],) * (3 - len(parts))
        T, n2, n4 = sum(p[0] for p in parts), parts[0][1], parts[0][2]
        assert q2.numel() == sum(p[0] * p[1] for p in parts) * TILE_ROWS * GROUP_SIZE // 16
        part_args = (full[0][0], full[0][0] + full[1][0] if len(parts) == 3 else T, full[1][1], full[1][2],
                     full[2][1], full[2][2])
    xfrag = xfrag and fast
    tagged = gens is not None and split > 1 and not atomic
    assert not tagged or (ws.dtype == torch.int64 and ws.numel() >= split * M * N and gens.numel() >= T)
    xw = x_fragments(x, pdl=pdl) if xfrag else x.view(torch.int32) if fast else x
    _gemv_tc_kernel[(T, split)](
        x, xw, y, ws, counters, gens if tagged else counters, counters if skip is None else skip, keep_tiles,
        q2.view(torch.int64), s2, z2, ss2, idx2, ov, oi,
        q4.view(torch.int64), s4, z4, ss4, idx4, M, N, n2, n4, x.stride(0), y.stride(0), *part_args,
        OUTLIERS=outliers, SPLIT=split, U=unroll, PF=prefetch, L2=l2, BLOCKS=_blocks(M), SINGLE=M == 1,
        FAST=fast, PDL=pdl, XF=xfrag, EARLY4=early4, TAGGED=tagged, GEN_EARLY=gen_early, SKIP=skip is not None,
        STEPS2=triton.cdiv(triton.cdiv(n2, split), unroll) if unrolled else -1,
        STEPS4=triton.cdiv(n4, split) if unrolled else -1, RAGGED=parts is not None, ATOMIC=atomic, num_warps=1,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y
