"""Format v1: the packed layout of one mixed 2/4/16-bit linear layer.

`PackedLinear` is the only reader and writer of this layout; the quantizer builds it with `pack`, the
reference path reads it with `dequantize`, the Triton kernels read its tensors directly. The byte-level
description lives in docs/format.md; keep the two in step (tests/quant/test_format.py checks the sizes).

Shape vocabulary: a weight W is N x K (out x in). Groups are `g` consecutive input columns of one row;
G = K / g group columns. A tile is R consecutive rows x one group column; T = N / R row tiles. Every
tile is 2-bit or 4-bit, and every row tile holds the same number `n4` of 4-bit tiles (so all GEMV
programs do equal work); n2 = G - n4. Outliers: exactly `k` fp16 additive corrections per 2-bit group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

from mpq.errors import ArtifactError

FORMAT_VERSION = 1
QUANT_VERSION = 4
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_TILE_ROWS = 16
MAX_OUTLIERS_PER_GROUP = 4
SCALE_CODE_MAX = 255

# name -> (dtype, shape builder from (T, n2, n4, R, g, k, N)); the order is the documented order.
_LAYOUT = {
    "q2": (torch.int32, lambda T, n2, n4, R, g, k, N: (T, n2, R, g // 16)),
    "q4": (torch.int32, lambda T, n2, n4, R, g, k, N: (T, n4, R, g // 8)),
    "s2": (torch.uint8, lambda T, n2, n4, R, g, k, N: (T, n2, R)),
    "z2": (torch.uint8, lambda T, n2, n4, R, g, k, N: (T, n2, R // 4)),
    "s4": (torch.uint8, lambda T, n2, n4, R, g, k, N: (T, n4, R)),
    "z4": (torch.uint8, lambda T, n2, n4, R, g, k, N: (T, n4, R // 2)),
    "ss2": (torch.float16, lambda T, n2, n4, R, g, k, N: (N,)),
    "ss4": (torch.float16, lambda T, n2, n4, R, g, k, N: (N,)),
    "idx2": (torch.int16, lambda T, n2, n4, R, g, k, N: (T, n2)),
    "idx4": (torch.int16, lambda T, n2, n4, R, g, k, N: (T, n4)),
    "ov": (torch.float16, lambda T, n2, n4, R, g, k, N: (T, n2, R, k)),
    "oi": (torch.uint8, lambda T, n2, n4, R, g, k, N: (T, n2, R, k)),
}
TENSOR_NAMES = tuple(_LAYOUT)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim (g codes of one group row) into g*bits/32 int32 words, strided.

    Element e goes to word e % W at bit (e // W) * bits, so shift j of every word covers the
    contiguous slice x[j*W:(j+1)*W] of the activations.
    """
    per_word = 32 // bits
    g = codes.shape[-1]
    words = g // per_word
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], per_word, words)
    shifts = (torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits).view(per_word, 1)
    packed = (c << shifts).sum(dim=-2)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [..., W] -> uint8 [..., W * 32 / bits]."""
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64, device=words.device) * bits).view(per_word, 1)
    codes = (w.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], per_word * words.shape[-1]).to(torch.uint8)


def pack_small(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small unsigned ints along the last dim into bytes, consecutively (value r at bits (r % p) * bits)."""
    per_byte = 8 // bits
    v = values.to(torch.int32).reshape(*values.shape[:-1], values.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=values.device) * bits
    return (v << shifts).sum(dim=-1).to(torch.uint8)


def unpack_small(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


@dataclass
class PackedLinear:
    """One quantized linear layer in format v1 (see the module docstring and docs/format.md)."""

    out_features: int
    in_features: int
    group_size: int
    tile_rows: int
    n4: int
    outliers: int
    q2: torch.Tensor
    q4: torch.Tensor
    s2: torch.Tensor
    z2: torch.Tensor
    s4: torch.Tensor
    z4: torch.Tensor
    ss2: torch.Tensor
    ss4: torch.Tensor
    idx2: torch.Tensor
    idx4: torch.Tensor
    ov: torch.Tensor
    oi: torch.Tensor
    bias: torch.Tensor | None = None

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def row_tiles(self) -> int:
        return self.out_features // self.tile_rows

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def n2(self) -> int:
        return self.groups - self.n4

    @property
    def fraction_4bit(self) -> float:
        return self.n4 / self.groups

    def expected_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return expected_shapes(self.out_features, self.in_features, self.group_size, self.tile_rows, self.n4, self.outliers)

    # ---- accounting -----------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Every byte the weight costs: codes, scales, zeros, super-scales, tile maps, outliers (not bias)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in TENSOR_NAMES)

    def outlier_slot_bytes(self) -> int:
        """Bytes that one more outlier slot per 2-bit group row adds (an fp16 value and a uint8 offset each)."""
        return math.prod(self.ov.shape[:-1]) * (self.ov.element_size() + self.oi.element_size())

    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes() / (self.out_features * self.in_features)

    # ---- (de)serialisation ----------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "group_size": self.group_size,
            "tile_rows": self.tile_rows,
            "n4": self.n4,
            "outliers": self.outliers,
            "bias": self.bias is not None,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).contiguous() for n in TENSOR_NAMES}
        if self.bias is not None:
            out["bias"] = self.bias.contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "PackedLinear":
        """Build from a manifest entry and its tensors, validating every name, dtype and shape."""
        try:
            geo = {k: int(meta[k]) for k in ("out_features", "in_features", "group_size", "tile_rows", "n4", "outliers")}
            has_bias = bool(meta.get("bias", False))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ArtifactError(f"bad linear metadata: {e!r}") from None
        check_geometry(**geo)
        want = expected_shapes(**geo)
        names = set(want) | ({"bias"} if has_bias else set())
        if set(tensors) != names:
            missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
            raise ArtifactError(f"linear tensors mismatch (missing {missing}, unexpected {extra})")
        for name, (dtype, shape) in want.items():
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"tensor {name}: expected {dtype} {list(shape)}, found {t.dtype} {list(t.shape)}")
        bias = tensors.get("bias")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != geo["out_features"] or not bias.is_floating_point()):
            raise ArtifactError(f"bias: expected a float vector of {geo['out_features']}")
        packed = cls(**geo, **{n: tensors[n] for n in TENSOR_NAMES}, bias=bias)
        packed.check_tile_map()
        return packed

    def check_tile_map(self) -> None:
        """Each row tile must list every group column exactly once across idx2 and idx4; offsets in range."""
        both = torch.cat([self.idx2, self.idx4], dim=1).to(torch.int64)
        want = torch.arange(self.groups, device=both.device).expand(self.row_tiles, -1)
        if not torch.equal(both.sort(dim=1).values, want):
            raise ArtifactError("tile map: idx2/idx4 are not a partition of the group columns")
        if self.oi.numel() and int(self.oi.max()) >= self.group_size:
            raise ArtifactError("outlier offset beyond the group size")
        if not torch.isfinite(self.ss2.float()).all() or not torch.isfinite(self.ss4.float()).all():
            raise ArtifactError("non-finite super-scale")
        if not torch.isfinite(self.ov.float()).all():
            raise ArtifactError("non-finite outlier value")

    def to(self, device) -> "PackedLinear":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for n in TENSOR_NAMES + ("bias",):
            if moved[n] is not None:
                moved[n] = moved[n].to(device)
        return PackedLinear(**moved)

    # ---- row stacking (runtime) ----------------------------------------------------------------------
    # Every tensor of the layout leads with the row tiles (or the rows), so linears that read the same input and
    # share (K, g, R, n4, k) stack into one linear whose rows are theirs in turn: one GEMV launch for q/k/v.
    def stack_key(self) -> tuple:
        return (self.in_features, self.group_size, self.tile_rows, self.n4, self.outliers)

    @classmethod
    def stack_rows(cls, parts: list["PackedLinear"]) -> "PackedLinear":
        """One linear computing [part0(x), part1(x), ...] along the output; the parts must share `stack_key`."""
        if len({p.stack_key() for p in parts}) != 1:
            raise ValueError("only linears with the same input width, group size, tile rows, n4 and outliers stack")
        head = parts[0]
        bias = stack_biases([p.bias for p in parts], [p.out_features for p in parts], head.ss2)
        return cls(sum(p.out_features for p in parts), head.in_features, head.group_size, head.tile_rows, head.n4,
                   head.outliers, **{n: torch.cat([getattr(p, n) for p in parts]) for n in TENSOR_NAMES}, bias=bias)

    def ragged_key(self) -> tuple:
        """What linears must share to run as one ragged stack (`ragged_rows`): everything but n4."""
        return (self.in_features, self.group_size, self.tile_rows, self.outliers)

    def with_outliers(self, k: int) -> "PackedLinear":
        """The same weights with k >= `outliers` outliers per 2-bit group row: the added ones are 0 at offset 0, so
        the reference path and every kernel compute the same values (runtime: to stack with linears that have k)."""
        if not self.outliers <= k <= MAX_OUTLIERS_PER_GROUP:
            raise ValueError(f"outliers {self.outliers} -> {k}")
        pad = (0, k - self.outliers)
        return dataclasses.replace(self, outliers=k, ov=torch.nn.functional.pad(self.ov, pad),
                                   oi=torch.nn.functional.pad(self.oi, pad))

    @staticmethod
    def ragged_rows(parts: list["PackedLinear"]) -> tuple[dict[str, torch.Tensor], tuple[tuple[int, int, int], ...]]:
        """Linears with one `ragged_key` but different n4, as one set of tensors for one decode GEMV launch
        (`kernels.gemv_tc`, `parts`): each tensor the parts' flattened and concatenated (ss2/ss4 stay rows), and
        (row tiles, n2, n4) of each part. Not a format-v1 layout (row tiles differ in slot counts): runtime only."""
        if len({p.ragged_key() for p in parts}) != 1:
            raise ValueError("only linears with the same input width, group size, tile rows and outliers stack ragged")
        flat = {n: torch.cat([getattr(p, n).reshape(-1) for p in parts]) for n in TENSOR_NAMES}
        return flat, tuple((p.row_tiles, p.n2, p.n4) for p in parts)

    @staticmethod
    def ragged_views(flat: dict[str, torch.Tensor], geometry: list[dict]) -> list["PackedLinear"]:
        """The parts of a ragged stack back as PackedLinears, over views of its tensors (no copy); geometry: each
        part's `meta()`."""
        parts, start = [], dict.fromkeys(TENSOR_NAMES, 0)
        for meta in geometry:
            geo = {k: meta[k] for k in ("out_features", "in_features", "group_size", "tile_rows", "n4", "outliers")}
            views = {}
            for name, (_, shape) in expected_shapes(**geo).items():
                size = math.prod(shape)
                views[name] = flat[name][start[name]:start[name] + size].view(shape)
                start[name] += size
            parts.append(PackedLinear(**geo, **views))
        return parts

    def leading_rows(self, rows: int) -> "PackedLinear":
        """The linear of the first `rows` output rows (a multiple of tile_rows), as views of this one's tensors."""
        if rows % self.tile_rows or not 0 < rows <= self.out_features:
            raise ValueError(f"leading rows {rows} must be a positive multiple of {self.tile_rows} up to {self.out_features}")
        t = rows // self.tile_rows
        views = {n: getattr(self, n)[: rows if n in ("ss2", "ss4") else t] for n in TENSOR_NAMES}
        return PackedLinear(rows, self.in_features, self.group_size, self.tile_rows, self.n4, self.outliers, **views,
                            bias=None if self.bias is None else self.bias[:rows])

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def pack(
        cls,
        *,
        codes: torch.Tensor,
        tile_bits: torch.Tensor,
        scale_codes: torch.Tensor,
        zeros: torch.Tensor,
        super_scale2: torch.Tensor,
        super_scale4: torch.Tensor,
        outlier_offsets: torch.Tensor,
        outlier_values: torch.Tensor,
        group_size: int,
        tile_rows: int = DEFAULT_TILE_ROWS,
        bias: torch.Tensor | None = None,
    ) -> "PackedLinear":
        """Lay out dense quantization results in format v1.

        codes [N, K] uint8 (0..3 in 2-bit tiles, 0..15 in 4-bit ones); tile_bits [T, G] with values 2/4 and
        the same number of 4s in every row; scale_codes/zeros [N, G]; super_scale2/4 [N]; outlier_offsets
        and outlier_values [N, G, k], only read in 2-bit groups (value = w - dequant at that position; 0 = unused).
        """
        N, K = codes.shape
        g, R = group_size, tile_rows
        G, T = K // g, N // R
        k = outlier_offsets.shape[-1]
        n4_per_tile = (tile_bits == 4).sum(dim=1)
        n4 = int(n4_per_tile[0]) if T else 0
        if not bool((n4_per_tile == n4).all()):
            raise ValueError("every row tile must hold the same number of 4-bit tiles")
        check_geometry(N, K, g, R, n4, k)
        tile_bits = tile_bits.to(codes.device)
        order = torch.argsort(tile_bits.to(torch.int64) * (G + 1) + torch.arange(G, device=codes.device), dim=1)  # 2-bit first, ascending
        idx2, idx4 = order[:, : G - n4], order[:, G - n4 :]

        def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            """[N, G, ...] per-group data -> [T, slots, R, ...] for the given group columns of each row tile."""
            xt = x.reshape(T, R, G, *x.shape[2:]).transpose(1, 2)  # [T, G, R, ...]
            ix = idx.view(T, -1, *([1] * (xt.dim() - 2))).expand(-1, -1, *xt.shape[2:])
            return torch.gather(xt, 1, ix)

        grouped = codes.reshape(N, G, g)
        q2 = pack_codes(gather(grouped, idx2) & 3, 2)
        q4 = pack_codes(gather(grouped, idx4) & 15, 4)
        return cls(
            out_features=N, in_features=K, group_size=g, tile_rows=R, n4=n4, outliers=k,
            q2=q2, q4=q4,
            s2=gather(scale_codes, idx2).to(torch.uint8).contiguous(),
            z2=pack_small(gather(zeros, idx2) & 3, 2),
            s4=gather(scale_codes, idx4).to(torch.uint8).contiguous(),
            z4=pack_small(gather(zeros, idx4) & 15, 4),
            ss2=super_scale2.to(torch.float16).contiguous(),
            ss4=super_scale4.to(torch.float16).contiguous(),
            idx2=idx2.to(torch.int16).contiguous(), idx4=idx4.to(torch.int16).contiguous(),
            ov=gather(outlier_values.to(torch.float16), idx2).contiguous(),
            oi=gather(outlier_offsets.to(torch.uint8), idx2).contiguous(),
            bias=None if bias is None else bias.to(torch.float16).contiguous(),
        )

    # ---- reference path -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference dequantization: the oracle every kernel is tested against."""
        N, K, g, R, T, G = self.out_features, self.in_features, self.group_size, self.tile_rows, self.row_tiles, self.groups
        rows = torch.arange(N, device=self.q2.device).view(T, 1, R)
        w = torch.zeros(T, G, R, g, dtype=torch.float32, device=self.q2.device)
        for bits, q, s, z, ss, idx in (
            (2, self.q2, self.s2, self.z2, self.ss2, self.idx2),
            (4, self.q4, self.s4, self.z4, self.ss4, self.idx4),
        ):
            if idx.shape[1] == 0:
                continue
            codes = unpack_codes(q, bits).float()  # [T, slots, R, g]
            zero = unpack_small(z, bits).float()  # [T, slots, R]
            scale = ss.float()[rows] * s.float()  # [T, slots, R]
            vals = scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))
            ix = idx.to(torch.int64).view(T, -1, 1, 1).expand(-1, -1, R, g)
            w.scatter_(1, ix, vals)
        if self.outliers and self.n2:
            corr = torch.zeros(T, self.n2, R, g, dtype=torch.float32, device=w.device)
            corr.scatter_add_(3, self.oi.to(torch.int64), self.ov.float())
            ix = self.idx2.to(torch.int64).view(T, -1, 1, 1).expand(-1, -1, R, g)
            w.scatter_add_(1, ix, corr)
        return w.permute(0, 2, 1, 3).reshape(N, K).to(dtype)


def stack_biases(biases: list, rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """The biases of linears stacked along the output (zeros for a part without one, dtype and device of `like`);
    None when no part has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else like.new_zeros(n) for b, n in zip(biases, rows)])


def check_geometry(out_features: int, in_features: int, group_size: int, tile_rows: int, n4: int, outliers: int) -> None:
    """Raise ArtifactError unless the numbers describe a layout format v1 can hold."""
    if out_features <= 0 or in_features <= 0:
        raise ArtifactError(f"bad shape {out_features}x{in_features}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ArtifactError(f"group size {group_size} not in {SUPPORTED_GROUP_SIZES}")
    if in_features % group_size:
        raise ArtifactError(f"group size {group_size} does not divide the input dimension {in_features}")
    if tile_rows <= 0 or tile_rows % 4 or out_features % tile_rows:
        raise ArtifactError(f"tile rows {tile_rows} must be a multiple of 4 dividing the output dimension {out_features}")
    if not 0 <= n4 <= in_features // group_size:
        raise ArtifactError(f"4-bit tiles per row tile {n4} out of range")
    if not 0 <= outliers <= MAX_OUTLIERS_PER_GROUP:
        raise ArtifactError(f"outliers per group {outliers} out of range 0..{MAX_OUTLIERS_PER_GROUP}")
    if in_features // group_size > 2**15 - 1:
        raise ArtifactError("too many group columns for int16 tile maps")


def expected_shapes(out_features, in_features, group_size, tile_rows, n4, outliers) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    T, G = out_features // tile_rows, in_features // group_size
    return {n: (dt, shape(T, G - n4, n4, tile_rows, group_size, outliers, out_features)) for n, (dt, shape) in _LAYOUT.items()}


def bits_per_weight(out_features: int, in_features: int, group_size: int, tile_rows: int, n4: int, outliers: int) -> float:
    """All-in bits/weight of a layout, from the same table the reader uses (docs/format.md gives the formula)."""
    total = 0
    for dtype, shape in expected_shapes(out_features, in_features, group_size, tile_rows, n4, outliers).values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return 8.0 * total / (out_features * in_features)
