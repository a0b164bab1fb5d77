"""The fp16x2 code decode that both decode GEMVs' inline PTX use (gemv_h2 on CUDA cores, gemv_tc on tensor cores).

A PRMT joins the low (then high) 16 bits of two adjacent code words, so one register holds the codes of two
adjacent columns. For the code at bit b of a half, (u & mask) | magic with magic = fp16 2^(10 - b) is exactly
magic + code (no shift for bits 0..9; the 2-bit codes at bits 10.. are shifted down once). One HFMA2,
v * 1/16 + k with k = -(magic + z) / 16, then gives (code - z) / 16, exact.
"""

# per code position of a joined half: (right shift of the half, magic index)
PLAN = {2: [(0, m) for m in range(5)] + [(10, m) for m in range(3)],
        4: [(0, 0), (0, 1), (8, 0), (8, 1)]}
# per magic index: (multiplier of the zero, fp16 magic): 2-bit 2^(10 - 2m) = 1024, 256, 64, 16, 4; 4-bit 1024, 64
MAGIC = {2: {m: (4 ** m, 0x6400 - 0x800 * m) for m in range(5)},
         4: {0: (1, 0x6400), 1: (16, 0x5400)}}
SIXTEENTH = "0x2C002C00"  # 1/16 in both fp16 halves


def shift(bits: int) -> int:
    """The one right shift a joined half needs (for the codes above bit 9)."""
    return max(s for s, _ in PLAN[bits])


def zero_terms(dst: str, zero: str, bits: int) -> list[str]:
    """PTX setting dst{m} = -(magic_m + zero) / 16 in both halves, for each magic index m (the exponent lowered by
    4, the sign set, the zero in the mantissa)."""
    return [f"mad.lo.u32 {dst}{m}, {zero}, {mul * 65537}, 0x{((magic - 0x1000) | 0x8000) * 65537:08X};"
            for m, (mul, magic) in MAGIC[bits].items()]


def decode(dst: str, src: str, bits: int, m: int, k: str, s16: str) -> list[str]:
    """PTX writing (code - zero) / 16 of the two codes at magic index m of joined half `src` into dst (fp16x2);
    k: that index's zero term, s16: a register holding SIXTEENTH."""
    one = ((1 << bits) - 1) << (bits * m)
    return [f"lop3.b32 {dst}, {src}, 0x{one | one << 16:08X}, 0x{MAGIC[bits][m][1] * 65537:08X}, 0xEA;",
            f"fma.rn.f16x2 {dst}, {dst}, {s16}, {k};"]
