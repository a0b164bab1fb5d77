"""Random format-v1 layers for the kernel tests: never all-zero, every field exercised."""

import pytest
import torch

from mpq.quant.format import PackedLinear


def random_packed(n: int, k: int, group_size: int, n4: int, outliers: int, seed: int = 0,
                  tile_rows: int = 16) -> PackedLinear:
    """A PackedLinear with random codes, scales, zeros, a random 2/4-bit tile map and random outliers."""
    gen = torch.Generator().manual_seed(seed)
    rt, g_cols = n // tile_rows, k // group_size
    tile_bits = torch.full((rt, g_cols), 2)
    for t in range(rt):
        tile_bits[t, torch.randperm(g_cols, generator=gen)[:n4]] = 4
    four = tile_bits.repeat_interleave(tile_rows, dim=0).repeat_interleave(group_size, dim=1) == 4
    codes = torch.where(four, torch.randint(0, 16, (n, k), generator=gen), torch.randint(0, 4, (n, k), generator=gen))
    zeros_all = torch.randint(0, 16, (n, g_cols), generator=gen)
    four_g = tile_bits.repeat_interleave(tile_rows, dim=0) == 4
    zeros = torch.where(four_g, zeros_all, zeros_all % 4)
    return PackedLinear.pack(
        codes=codes.to(torch.uint8),
        tile_bits=tile_bits,
        scale_codes=torch.randint(1, 256, (n, g_cols), generator=gen),
        zeros=zeros,
        super_scale2=(torch.rand(n, generator=gen) + 0.5) * 2e-3,
        super_scale4=(torch.rand(n, generator=gen) + 0.5) * 5e-4,
        outlier_offsets=torch.randint(0, group_size, (n, g_cols, outliers), generator=gen),
        outlier_values=torch.randn(n, g_cols, outliers, generator=gen),
        group_size=group_size,
        tile_rows=tile_rows,
    )


@pytest.fixture
def make_packed():
    return random_packed
