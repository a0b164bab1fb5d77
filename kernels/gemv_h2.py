"""Decode GEMV v2 for format v1: codes decoded two at a time in packed fp16x2 (fp16 activations, CUDA only).

Same programs as gemv_mixed (RB rows of a row tile, S slots per chunk, next chunk's loads in flight), but each
thread owns a *pair* of adjacent words (2p, 2p+1) of each of its rows, loaded as one int64. A PRMT joins the low
(then high) 16 bits of the two words, so the two fp16 lanes hold the codes of columns j*W + 2p and j*W + 2p + 1:
one int32 load of x (two adjacent fp16) is the activation pair of that code pair, for all the thread's rows.
Per code pair: one LOP3, (u & mask) | magic, with magic = 2^(10-b) for a code at bit b (no shift for bits
0..9), which is the exact fp16 pair magic + c; one HFMA2, v/16 - (magic + z)/16 = (c - z)/16, exact; one HFMA2
into an fp16x2 partial of at most 8 products per lane (the 1/16 keeps it finite for |x| < ~4e4; undone once per
program). Partials go to fp32 per (row, slot, pair), the group scale is applied in fp32. About 2 instructions
per weight in the code loop (fp32 decode: >= 3). FAST=False: the same sums in fp32, no inline PTX (interpreter).
"""

import torch
import triton
import triton.language as tl

from kernels import half2_decode as half2
from kernels.exit_flag import skipped_tile
from kernels.splitk import finish_split

def _asm(bits: int, pairs: int = 1) -> str:
    """PTX for one (row, slot) and `pairs` adjacent word pairs of it: $0 = sum over their codes of (c - z)/16 * x,
    in fp32. Operands: the pairs (b64 each), the zero, then per code position j the x values: one b32 (two fp16)
    for a single pair, one b64 (the x pairs of both word pairs, in order) for two. The decode: half2_decode."""
    n_x = 32 // bits
    plan, k_of = half2.PLAN[bits], half2.MAGIC[bits]
    ps = "AB"[:pairs]
    regs = [f"{r}{p}" for p in ps for r in ("a", "b", "u", "v", "t", "acc0", "acc1", "x")]
    lines = ["{", ".reg .b32 s16, " + ", ".join(regs + [f"k{m}" for m in k_of]) + ";",
             ".reg .b16 h0, h1, h2, h3;", ".reg .f32 f0, f1, f2, f3;", f"mov.b32 s16, {half2.SIXTEENTH};"]
    lines += [f"mov.b64 {{a{p}, b{p}}}, ${1 + i};" for i, p in enumerate(ps)]
    zero, first_x = f"${1 + pairs}", 2 + pairs
    lines += half2.zero_terms("k", zero, bits)
    for half, sel in enumerate(("0x5410", "0x7632")):
        lines += [f"prmt.b32 u{p}, a{p}, b{p}, {sel};" for p in ps]
        for i, (shift, m) in enumerate(plan):
            xj = f"${first_x + half * len(plan) + i}"
            if pairs == 2:
                lines.append(f"mov.b64 {{xA, xB}}, {xj};")
            for p in ps:
                src = f"u{p}"
                if shift:
                    if (shift, m) == plan[[q[0] for q in plan].index(shift)]:
                        lines.append(f"shr.u32 v{p}, u{p}, {shift};")
                    src = f"v{p}"
                x = f"x{p}" if pairs == 2 else xj
                lines += half2.decode(f"t{p}", src, bits, m, f"k{m}", "s16")
                acc = f"acc{half}{p}"
                lines.append(f"mul.rn.f16x2 {acc}, t{p}, {x};" if i == 0 else f"fma.rn.f16x2 {acc}, t{p}, {x}, {acc};")
    assert 2 * len(plan) == n_x
    for n, p in enumerate(ps):  # each fp16x2 partial holds <= 8 products per lane; to fp32 before they meet
        lines += [f"mov.b32 {{h0, h1}}, acc0{p};", f"mov.b32 {{h2, h3}}, acc1{p};", "cvt.f32.f16 f0, h0;",
                  "cvt.f32.f16 f1, h1;", "cvt.f32.f16 f2, h2;", "cvt.f32.f16 f3, h3;", "add.f32 f0, f0, f1;",
                  "add.f32 f2, f2, f3;"]
        lines += ["add.f32 $0, f0, f2;"] if n == 0 else ["add.f32 f0, f0, f2;", "add.f32 $0, $0, f0;"]
    return "\n".join(lines + ["}"])


ASM2 = tl.constexpr(_asm(2))
ASM4 = tl.constexpr(_asm(4))
ASM2_QUAD = tl.constexpr(_asm(2, 2))
ASM4_QUAD = tl.constexpr(_asm(4, 2))
CONS2 = tl.constexpr("=f,l,r" + ",r" * 16)
CONS4 = tl.constexpr("=f,l,r" + ",r" * 8)
CONS2_QUAD = tl.constexpr("=f,l,l,r" + ",l" * 16)
CONS4_QUAD = tl.constexpr("=f,l,l,r" + ",l" * 8)
# two word pairs (16 bytes) of a row in one load; the codes are read once, so evict them first (kernels-notes v9)
LOAD_QUAD = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b64 $0, 0; mov.b64 $1, 0; "
                         "@p ld.global.L1::evict_first.v2.u64 {$0, $1}, [$2]; }")


@triton.jit
def _x8(p, base, STEP: tl.constexpr):
    """x pairs at base + k * STEP, k = 0..7, issued back to back."""
    x0, x1, x2, x3 = (tl.load(p + base), tl.load(p + base + STEP), tl.load(p + base + 2 * STEP),
                      tl.load(p + base + 3 * STEP))
    x4, x5, x6, x7 = (tl.load(p + base + 4 * STEP), tl.load(p + base + 5 * STEP), tl.load(p + base + 6 * STEP),
                      tl.load(p + base + 7 * STEP))
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _span_words(ptr, first, valid, BITS: tl.constexpr, SPAN: tl.constexpr):
    """The SPAN (<= 128) bits of the packed BITS-bit fields first, first + 1, ... in one or two loads, as two int64
    (the second only for SPAN > 64). first * BITS must be a multiple of min(SPAN, 64): the RB rows of a program
    start at a multiple of RB, so each thread reads its rows' scale codes, zeros or outliers in one or two wide
    loads instead of one narrow load per row (the narrow loads cost ~2.5 us of 14.3 on 11008x4096)."""
    if SPAN <= 8:
        w0 = tl.load(ptr.to(tl.pointer_type(tl.int8)) + first * BITS // 8, mask=valid, other=0).to(tl.int64)
    elif SPAN <= 16:
        w0 = tl.load(ptr.to(tl.pointer_type(tl.int16)) + first * BITS // 16, mask=valid, other=0).to(tl.int64)
    elif SPAN <= 32:
        w0 = tl.load(ptr.to(tl.pointer_type(tl.int32)) + first * BITS // 32, mask=valid, other=0).to(tl.int64)
    else:
        w0 = tl.load(ptr.to(tl.pointer_type(tl.int64)) + first * BITS // 64, mask=valid, other=0)
    if SPAN > 64:
        w1 = tl.load(ptr.to(tl.pointer_type(tl.int64)) + first * BITS // 64 + 1, mask=valid, other=0)
    else:
        w1 = w0
    return w0, w1


@triton.jit
def _span_field(w0, w1, rel, BITS: tl.constexpr, SPAN: tl.constexpr):
    """Field `rel` (relative to the span's first) of a span read by _span_words, as int32."""
    bit = (rel * BITS).to(tl.int64)
    if SPAN > 64:
        w = tl.where(bit < 64, w0, w1)
        bit = bit % 64
    else:
        w = w0
    return ((w >> bit) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _load_chunk(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, slot, end, r0, offs_r, offs_p,
                BITS: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, P: tl.constexpr, PT: tl.constexpr,
                OUTLIERS: tl.constexpr, FAST: tl.constexpr):
    """Word pairs PT*p .. PT*p + PT - 1 of RB rows [RB, S, P/PT]; group column [1, S, P/PT]; the words holding the RB
    rows' scale codes, zeros and (where they fit in 128 bits) outlier values and offsets, unpacked where used so
    that the loads stay in flight. Each thread loads its own copies, so nothing changes layout."""
    valid = (slot < end)[None, :, None]
    ts = (t * n_slots + slot)[None, :, None]
    zp = offs_p[None, None, :] * 0
    q_offs = (ts * R + offs_r[:, None, None]) * P + PT * offs_p[None, None, :]
    if PT == 2 and FAST:  # one 16-byte load, predicated like a masked tl.load (a stream may have no slots at all)
        # `& (q_offs >= 0)` (always true) only broadcasts the slot mask to the load's shape; tl.broadcast_to
        # compiles to more registers here (rows 16: 251 against 180 on sm_90)
        on = (valid & (q_offs >= 0)).to(tl.int32)
        q0, q1 = tl.inline_asm_elementwise(LOAD_QUAD, "=l,=l,l,r", [q_ptr + q_offs, on],
                                           dtype=(tl.int64, tl.int64), is_pure=True, pack=1)
    else:
        # the codes are read once: evict them first, so L1 keeps x and the metadata (-2 to -4%, kernels-notes v9)
        q0 = tl.load(q_ptr + q_offs, mask=valid, other=0, eviction_policy="evict_first")
        q1 = tl.load(q_ptr + q_offs + 1, mask=valid, other=0, eviction_policy="evict_first") if PT == 2 else q0
    col0 = tl.load(idx_ptr + ts + zp, mask=valid, other=0).to(tl.int32)
    s0, s1 = _span_words(s_ptr, ts * R + r0 + zp, valid, 8, RB * 8)
    z0, _ = _span_words(z_ptr, ts * R + r0 + zp, valid, BITS, RB * BITS)
    OSPAN: tl.constexpr = RB * OUTLIERS * 16  # bits of the RB rows' outlier values in one slot (as in _stream)
    if OUTLIERS > 0 and OSPAN <= 128:
        o_mask = valid & (offs_p == 0)[None, None, :]  # each outlier once, on the p=0 thread
        v0, v1 = _span_words(ov_ptr, (ts * R + r0) * OUTLIERS + zp, o_mask, 16, OSPAN)
        i0, i1 = _span_words(oi_ptr, (ts * R + r0) * OUTLIERS + zp, o_mask, 8, OSPAN // 2)
    else:
        v0, v1, i0, i1 = z0, z0, z0, z0
    return q0, q1, col0, s0, s1, z0, v0, v1, i0, i1


@triton.jit
def _dot(xw_row, base, q0, q1, zero, BITS: tl.constexpr, W: tl.constexpr, PT: tl.constexpr):
    """sum over the PT word pairs' codes of (c - z)/16 * x, fp32 [RB, S, P/PT] (inline PTX, see _asm). xw_row is x
    as words of 2 * PT fp16: one word holds the activations of all the thread's pairs at one code position."""
    STEP: tl.constexpr = W // (2 * PT)
    a0, a1, a2, a3, a4, a5, a6, a7 = _x8(xw_row, base, STEP)
    if PT == 1:
        if BITS == 2:
            b0, b1, b2, b3, b4, b5, b6, b7 = _x8(xw_row, base + 8 * STEP, STEP)
            return tl.inline_asm_elementwise(ASM2, CONS2, [q0, zero, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3,
                                                           b4, b5, b6, b7], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(ASM4, CONS4, [q0, zero, a0, a1, a2, a3, a4, a5, a6, a7],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        if BITS == 2:
            b0, b1, b2, b3, b4, b5, b6, b7 = _x8(xw_row, base + 8 * STEP, STEP)
            return tl.inline_asm_elementwise(ASM2_QUAD, CONS2_QUAD, [q0, q1, zero, a0, a1, a2, a3, a4, a5, a6, a7, b0,
                                                                     b1, b2, b3, b4, b5, b6, b7],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(ASM4_QUAD, CONS4_QUAD, [q0, q1, zero, a0, a1, a2, a3, a4, a5, a6, a7],
                                             dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dot_plain(x_row, col0, offs_p, q, zero, BITS: tl.constexpr, W: tl.constexpr, G_SIZE: tl.constexpr):
    """The same sums in fp32 without inline asm: (c - z)/16 * x over the codes of each word pair."""
    part = (q * 0).to(tl.float32)
    xb = x_row + col0 * G_SIZE + 2 * offs_p[None, None, :]
    for j in tl.static_range(32 // BITS):
        x0 = tl.load(xb + j * W).to(tl.float32)
        x1 = tl.load(xb + j * W + 1).to(tl.float32)
        c0 = ((q >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.int32) - zero
        c1 = ((q >> (32 + BITS * j)) & ((1 << BITS) - 1)).to(tl.int32) - zero
        part += c0.to(tl.float32) * x0 + c1.to(tl.float32) * x1
    return part * 0.0625


@triton.jit
def _first(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n_slots, sp, unit, BITS: tl.constexpr,
           G_SIZE: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr, PT: tl.constexpr,
           SPLIT: tl.constexpr, OUTLIERS: tl.constexpr, FAST: tl.constexpr):
    """This program's slot range [start, end) of one stream and its first chunk's loads."""
    P: tl.constexpr = G_SIZE * BITS // 64
    per_split = tl.cdiv(tl.cdiv(n_slots, S), SPLIT) * S
    start = sp * per_split
    end = tl.minimum(start + per_split, n_slots)
    chunk = _load_chunk(q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, start + tl.arange(0, S), end, r0,
                        offs_r, tl.arange(0, P // PT) * unit, BITS, R, RB, P, PT, OUTLIERS, FAST)
    return start, end, chunk


@triton.jit
def _stream(x_row, xw_row, q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n_slots, unit,
            start, end, first_chunk,
            BITS: tl.constexpr, G_SIZE: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr,
            PT: tl.constexpr, OUTLIERS: tl.constexpr, FAST: tl.constexpr):
    """Slots [start, end) of one stream, first chunk already loaded: (sum of scale-code * dot, outlier dot),
    [RB]. Each thread takes PT word pairs (p, p + P/PT) of each of its rows; x pairs are loaded once per
    thread and serve all its rows. The next chunk's loads are issued before this chunk's arithmetic."""
    W: tl.constexpr = G_SIZE * BITS // 32
    P: tl.constexpr = W // 2
    PP: tl.constexpr = P // PT
    offs_s = tl.arange(0, S)
    offs_p = tl.arange(0, PP) * unit  # unit = 1 at run time: a pair of each row per thread, not 2 of one row
    OSPAN: tl.constexpr = RB * OUTLIERS * 16  # bits of the RB rows' outlier values in one slot
    rel = tl.arange(0, RB)[:, None, None]
    chunks = tl.cdiv(tl.maximum(end - start, 0), S)
    acc = tl.zeros([RB, S, PP], tl.float32)
    acc_o = tl.zeros([RB, S, PP], tl.float32)
    q0n, q1n, col0_n, s0n, s1n, z0n, v0n, v1n, i0n, i1n = first_chunk
    for c in range(chunks):
        q0, q1, col0, s0, s1, z0, v0, v1, i0, i1 = q0n, q1n, col0_n, s0n, s1n, z0n, v0n, v1n, i0n, i1n
        q0n, q1n, col0_n, s0n, s1n, z0n, v0n, v1n, i0n, i1n = _load_chunk(
            q_ptr, s_ptr, z_ptr, idx_ptr, ov_ptr, oi_ptr, t, n_slots, start + (c + 1) * S + offs_s, end, r0, offs_r,
            offs_p, BITS, R, RB, P, PT, OUTLIERS, FAST)
        sc = _span_field(s0, s1, rel, 8, RB * 8).to(tl.float32)
        zero = _span_field(z0, z0, rel, BITS, RB * BITS)
        slot = start + c * S + offs_s
        o_mask = (slot < end)[None, :, None] & (offs_p == 0)[None, None, :]  # each outlier once, on the p=0 thread
        first_o = ((t * n_slots + slot)[None, :, None] * R + r0) * OUTLIERS + offs_p[None, None, :] * 0
        for k in tl.static_range(OUTLIERS):
            if OSPAN <= 128:
                ov = _span_field(v0, v1, rel * OUTLIERS + k, 16, OSPAN).to(tl.int16).to(tl.float16, bitcast=True)
                oi = _span_field(i0, i1, rel * OUTLIERS + k, 8, OSPAN // 2)
            else:
                o_offs = first_o + (rel * unit) * OUTLIERS + k
                ov = tl.load(ov_ptr + o_offs, mask=o_mask, other=0.0)
                oi = tl.load(oi_ptr + o_offs, mask=o_mask, other=0).to(tl.int32)
            acc_o += ov.to(tl.float32) * tl.load(x_row + col0 * G_SIZE + oi, mask=o_mask, other=0.0).to(tl.float32)
        if FAST:
            base = col0 * (G_SIZE // (2 * PT)) + offs_p[None, None, :]  # [1, S, PP] index of x words
            part = _dot(xw_row, base, q0, q1, zero, BITS, W, PT)
        else:
            part = _dot_plain(x_row, col0, PT * offs_p, q0, zero, BITS, W, G_SIZE)
            if PT == 2:
                part += _dot_plain(x_row, col0, 2 * offs_p + 1, q1, zero, BITS, W, G_SIZE)
        acc += sc * part
    return tl.sum(tl.sum(acc, axis=2), axis=1) * 16.0, tl.sum(tl.sum(acc_o, axis=2), axis=1)


@triton.jit(do_not_specialize=["M", "n2", "n4", "unit", "keep_tiles"])
def _gemv_h2_kernel(x_ptr, xw_ptr, y_ptr, ws_ptr, cnt_ptr, skip_ptr, keep_tiles,
                    q2_ptr, s2_ptr, z2_ptr, ss2_ptr, idx2_ptr, ov_ptr, oi_ptr,
                    q4_ptr, s4_ptr, z4_ptr, ss4_ptr, idx4_ptr,
                    M, N, n2, n4, stride_xm, stride_ym, unit,
                    G_SIZE: tl.constexpr, R: tl.constexpr, OUTLIERS: tl.constexpr, RB: tl.constexpr,
                    S2: tl.constexpr, S4: tl.constexpr, PT: tl.constexpr, SPLIT: tl.constexpr,
                    EARLY4: tl.constexpr, FAST: tl.constexpr, PDL: tl.constexpr, SKIP: tl.constexpr):
    pid = tl.program_id(0)  # RB rows of one row tile
    sp = tl.program_id(1)
    m = tl.program_id(2)
    t = pid // (R // RB)
    r0 = (pid % (R // RB)) * RB
    offs_r = r0 + tl.arange(0, RB)
    x_row = x_ptr + m * stride_xm
    xw_row = xw_ptr + m * (stride_xm // (2 * PT))
    b0, e0, chunk2 = _first(q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n2, sp, unit, 2, G_SIZE,
                            R, RB, S2, PT, SPLIT, OUTLIERS, FAST)
    if EARLY4:  # the 4-bit stream's first loads in flight during the 2-bit stream
        b1, e1, chunk4 = _first(q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n4, sp, unit, 4,
                                G_SIZE, R, RB, S4, PT, SPLIT, 0, FAST)
    if PDL:  # the first weight loads are in flight; x is the previous kernel's output. The next kernel may launch
        # now: it waits for this one before it reads y. (The trigger sat after the main loops while inductor's small
        # ops followed; with the step's own kernels after it, here is faster: 2.219 against 2.258 ms per step.)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if SKIP:  # the exit flag, written by a kernel before this one (read after the PDL wait)
        if skipped_tile(skip_ptr, t, keep_tiles):
            return
    p2, o2 = _stream(x_row, xw_row, q2_ptr, s2_ptr, z2_ptr, idx2_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n2, unit,
                     b0, e0, chunk2, 2, G_SIZE, R, RB, S2, PT, OUTLIERS, FAST)
    if not EARLY4:
        b1, e1, chunk4 = _first(q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n4, sp, unit, 4,
                                G_SIZE, R, RB, S4, PT, SPLIT, 0, FAST)
    p4, _ = _stream(x_row, xw_row, q4_ptr, s4_ptr, z4_ptr, idx4_ptr, ov_ptr, oi_ptr, t, r0, offs_r, n4, unit,
                    b1, e1, chunk4, 4, G_SIZE, R, RB, S4, PT, 0, FAST)
    rows = t * R + offs_r
    val = tl.load(ss2_ptr + rows).to(tl.float32) * p2 + tl.load(ss4_ptr + rows).to(tl.float32) * p4 + o2
    mask = rows < N
    finish_split(val, y_ptr, m * stride_ym + rows, ws_ptr, m * N + rows, mask,
                 cnt_ptr + m * tl.num_programs(0) + pid, sp, M * N, SPLIT)


def gemv_h2(x, y, ws, counters, q2, s2, z2, ss2, idx2, ov, oi, q4, s4, z4, ss4, idx4, *,
            group_size: int, outliers: int, rows: int, split: int, num_warps: int, pairs: int = 1,
            early4: bool = False, fast: bool, pdl: bool = False, skip: torch.Tensor | None = None,
            keep_tiles: int = 0):
    """Same contract as gemv_mixed; `pairs` adjacent word pairs of each row per thread (1, or 2: 16 bytes of codes
    in one load and x in 8-byte words; two threads then share the rows); `early4`: the 4-bit stream's first chunk
    is loaded before the 2-bit stream starts; `fast` (inline PTX, fp16 x on CUDA only) or the plain fp32 path;
    `pdl` (sm_90+): launched as a programmatic dependent, so this kernel's launch and first weight loads overlap
    the tail of the kernel before it, and the kernel after it launches as soon as this one's first loads are out."""
    M, N, T, R = x.shape[0], y.shape[1], q2.shape[0], q2.shape[2]
    # S slots * P / pairs pair threads * pairs row threads = 32 * num_warps, P = g * bits / 64 pairs per group row
    slots = lambda bits: max(1, 64 * num_warps // (group_size * bits // 32))  # noqa: E731
    assert group_size * 2 // 64 % pairs == 0 and rows % pairs == 0
    if fast and pairs == 2 and (x.data_ptr() % 8 or x.stride(0) % 4):
        pairs = 1  # x rows not in whole 8-byte words
    xw = x.view(torch.int32 if pairs == 1 else torch.int64) if fast else x
    _gemv_h2_kernel[(T * (R // rows), split, M)](
        x, xw, y, ws, counters, counters if skip is None else skip, keep_tiles, q2.view(torch.int64), s2, z2, ss2,
        idx2, ov, oi, q4.view(torch.int64), s4, z4, ss4, idx4, M, N, q2.shape[1], q4.shape[1], x.stride(0),
        y.stride(0), 1,
        G_SIZE=group_size, R=R, OUTLIERS=outliers, RB=rows, S2=slots(2), S4=slots(4), PT=pairs, SPLIT=split,
        EARLY4=early4, FAST=fast, PDL=pdl, SKIP=skip is not None,
        num_warps=num_warps, **({"launch_pdl": True} if pdl else {}),
    )
    return y

