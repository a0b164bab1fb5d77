"""Format v1: packing round-trips, the reference dequantization formula, validation, the bits formula."""

import pytest
import torch

from mpq.errors import ArtifactError
from mpq.quant.format import (PackedLinear, bits_per_weight, pack_codes, pack_small, unpack_codes, unpack_small)


def random_packed(N=48, K=384, g=128, R=16, n4=1, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, G = N // R, K // g
    tile_bits = torch.full((T, G), 2, dtype=torch.uint8)
    for t in range(T):
        tile_bits[t, torch.randperm(G, generator=gen)[:n4]] = 4
    gb = tile_bits.repeat_interleave(R, 0)  # [N, G]
    full = gb.repeat_interleave(g, 1)
    codes = torch.where(full == 4, torch.randint(0, 16, (N, K), generator=gen), torch.randint(0, 4, (N, K), generator=gen)).to(torch.uint8)
    scode = torch.randint(1, 256, (N, G), generator=gen).to(torch.uint8)
    zeros = torch.where(gb == 4, torch.randint(0, 16, (N, G), generator=gen), torch.randint(0, 4, (N, G), generator=gen)).to(torch.uint8)
    ss2 = (torch.rand(N, generator=gen) / 100 + 1e-3).half()
    ss4 = (torch.rand(N, generator=gen) / 300 + 1e-3).half()
    offs = torch.stack([torch.randperm(g, generator=gen)[:k] for _ in range(N * G)]).view(N, G, k).to(torch.uint8)
    vals = torch.randn(N, G, k, generator=gen).half()
    packed = PackedLinear.pack(codes=codes, tile_bits=tile_bits, scale_codes=scode, zeros=zeros, super_scale2=ss2,
                               super_scale4=ss4, outlier_offsets=offs, outlier_values=vals, group_size=g, tile_rows=R)
    return packed, dict(codes=codes, gb=gb, scode=scode, zeros=zeros, ss2=ss2, ss4=ss4, offs=offs, vals=vals, g=g)


@pytest.mark.parametrize("bits,g", [(2, 64), (2, 128), (4, 64), (4, 128)])
def test_code_packing_round_trips(bits, g):
    codes = torch.randint(0, 2**bits, (3, 5, g), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


def test_code_packing_is_strided():
    """Element e sits in word e % W at bit (e // W) * b (docs/format.md)."""
    codes = torch.zeros(128, dtype=torch.uint8)
    codes[9] = 3  # W = 8 words for 2-bit g128: word 1, shift 2
    words = pack_codes(codes, 2)
    assert int(words[1]) == 3 << 2 and int(words.abs().sum()) == 3 << 2


@pytest.mark.parametrize("bits", [2, 4])
def test_small_packing_round_trips(bits):
    v = torch.randint(0, 2**bits, (4, 16), dtype=torch.uint8)
    assert torch.equal(unpack_small(pack_small(v, bits), bits), v)


@pytest.mark.parametrize("n4,k", [(0, 0), (1, 1), (2, 2), (3, 1)])
def test_dequantize_matches_formula(n4, k):
    p, d = random_packed(n4=n4, k=k)
    g = d["g"]
    scale = torch.where(d["gb"] == 4, d["ss4"].float()[:, None], d["ss2"].float()[:, None]) * d["scode"].float()
    ref = scale.repeat_interleave(g, 1) * (d["codes"].float() - d["zeros"].float().repeat_interleave(g, 1))
    for n, j in torch.nonzero(d["gb"] == 2).tolist():
        for o in range(k):
            ref[n, j * g + int(d["offs"][n, j, o])] += float(d["vals"][n, j, o])
    assert torch.allclose(p.dequantize(), ref, atol=1e-5, rtol=1e-5)


def test_tensors_round_trip_and_validate():
    p, _ = random_packed()
    q = PackedLinear.from_tensors(p.meta(), p.tensors())
    assert torch.equal(q.dequantize(), p.dequantize())


def test_reader_rejects_bad_tensors():
    p, _ = random_packed()
    t = p.tensors()
    with pytest.raises(ArtifactError, match="q2"):
        PackedLinear.from_tensors(p.meta(), {**t, "q2": t["q2"].to(torch.int16)})
    with pytest.raises(ArtifactError, match="missing"):
        PackedLinear.from_tensors(p.meta(), {k: v for k, v in t.items() if k != "ov"})
    swapped = t["idx2"].clone()
    swapped[0, 0] = swapped[0, 1]
    with pytest.raises(ArtifactError, match="partition"):
        PackedLinear.from_tensors(p.meta(), {**t, "idx2": swapped})
    with pytest.raises(ArtifactError, match="divide"):
        PackedLinear.from_tensors({**p.meta(), "in_features": 380}, t)


@pytest.mark.parametrize("N,K,g,n4,k", [(4096, 4096, 128, 8, 1), (11008, 4096, 128, 0, 0), (576, 576, 64, 3, 1), (48, 384, 128, 3, 2)])
def test_bits_formula_matches_docs_and_stored_bytes(N, K, g, n4, k):
    R, G = 16, K // g
    f = n4 / G
    documented = 2 * (1 - f) + 4 * f + (10 * (1 - f) + 12 * f) / g + 24 * k * (1 - f) / g + 16 / (R * g) + 32 / K
    assert bits_per_weight(N, K, g, R, n4, k) == pytest.approx(documented, rel=1e-12)
    if N * K <= 48 * 384:
        p, _ = random_packed(N, K, g, R, n4, k)
        assert p.bits_per_weight() == pytest.approx(documented, rel=1e-12)


def test_documented_example():
    assert bits_per_weight(4096, 4096, 128, 16, 8, 1) == pytest.approx(2.738, abs=5e-4)


def test_stacked_rows_dequantize_to_the_parts_in_turn_and_lead_as_views():
    parts = [random_packed(N=n, n4=1, k=2, seed=s)[0] for s, n in enumerate((32, 16, 48))]
    parts[1].bias = torch.randn(16).half()
    stacked = PackedLinear.stack_rows(parts)
    assert stacked.out_features == 96 and stacked.stored_bytes() == sum(p.stored_bytes() for p in parts)
    assert torch.equal(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(stacked.bias, torch.cat([torch.zeros(32).half(), parts[1].bias, torch.zeros(48).half()]))
    lead = stacked.leading_rows(48)
    assert torch.equal(lead.dequantize(), torch.cat([p.dequantize() for p in parts[:2]]))
    assert lead.q2.data_ptr() == stacked.q2.data_ptr()  # views, no copy
    PackedLinear.from_tensors(lead.meta(), lead.tensors())  # a valid linear by the reader's checks
    with pytest.raises(ValueError):
        stacked.leading_rows(40)  # not a whole number of row tiles


def test_more_outliers_of_value_zero_change_nothing():
    """with_outliers (for ragged stacks): a valid linear with k outlier slots per 2-bit group row that dequantizes to
    exactly the same weight; fewer than it has is refused."""
    packed = random_packed(k=1, seed=3)[0]
    more = packed.with_outliers(3)
    assert more.outliers == 3 and more.ov.shape[-1] == 3 and not more.ov[..., 1:].any()
    PackedLinear.from_tensors(more.meta(), more.tensors())
    assert torch.equal(more.dequantize(), packed.dequantize())
    assert more.stored_bytes() - packed.stored_bytes() == 2 * packed.outlier_slot_bytes() > 0
    with pytest.raises(ValueError):
        more.with_outliers(2)


def test_linears_with_different_layouts_do_not_stack():
    with pytest.raises(ValueError):
        PackedLinear.stack_rows([random_packed(N=32, n4=1)[0], random_packed(N=32, n4=2)[0]])
    with pytest.raises(ValueError):
        PackedLinear.stack_rows([random_packed(N=32, k=1)[0], random_packed(N=32, k=2)[0]])
