"""The attention hand-over (`kernels.handoff`): the stacked k/v/q GEMV counts each head's rows as it writes them, the decode attention waits for its head's count instead of the GEMV's end and counts each merged head, the
o GEMV waits at that gate. The linked chain must give exactly what the same kernels give unlinked, and leave every
counter at zero (a captured graph replays them).

Runs on CUDA (tensor-core GEMV, programmatic launches: the spins really wait there) or on the CPU under
TRITON_INTERPRET=1 (kernels in turn: the counts are complete when each consumer starts, so what is checked there is
the counting and the resets). Outputs are poisoned with NaN first.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.dispatch import TENSOR_ORDER  # noqa: E402
from kernels.gemv_h2 import gemv_h2  # noqa: E402
from kernels.gemv_tc import gemv_tc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
FAST = not INTERPRET


def _gemv(packed, x, split, gens, kernel="tc", **handoff):
    """One M = 1 call of the tensor-core GEMV (gens: its fenceless epilogue) or of the fp16x2 one (2 programs a row
    tile)."""
    tensors = tuple(getattr(packed, n).to(DEVICE) for n in TENSOR_ORDER)
    n, t = packed.out_features, packed.row_tiles
    y = torch.full((1, n), float("nan"), dtype=torch.float16, device=DEVICE)
    counters = torch.zeros(16 * t, dtype=torch.int32, device=DEVICE)
    ws = (torch.zeros(split * n, dtype=torch.int64, device=DEVICE) if gens is not None
          else torch.full((split, 1, n), float("nan"), device=DEVICE))
    if kernel == "tc":
        gemv_tc(x, y, ws, counters, *tensors, outliers=packed.outliers, split=split, fast=FAST, pdl=FAST, gens=gens,
                **handoff)
    else:
        gemv_h2(x, y, ws, counters, *tensors, group_size=packed.group_size, outliers=packed.outliers, rows=8,
                split=split, num_warps=1, fast=FAST, pdl=FAST, **handoff)
    assert not counters.any()
    return y


# (heads, KV heads, head dim, the k/v/q GEMV: kernel, K-split, fenceless epilogue)
CASES = [(4, 2, 32, "tc", 1, False), (8, 2, 16, "tc", 2, True), (2, 2, 64, "tc", 3, False), (4, 2, 32, "h2", 1, False),
         (8, 2, 16, "h2", 2, False)]


@pytest.mark.parametrize("heads, kv, d, kernel, split, tagged", CASES)
def test_linked_attention_matches_the_unlinked_chain(make_packed, heads, kv, d, kernel, split, tagged):
    dim, length, pos = 256, 96, 70
    g = heads // kv
    kvq = make_packed((2 * kv + heads) * d, dim, 128, 1, 1, seed=heads + split)
    o = make_packed(dim, heads * d, 128, 0, 1, seed=7 + d)
    gen = torch.Generator().manual_seed(split)
    x = torch.randn(1, dim, generator=gen).half().to(DEVICE)
    angles = torch.rand(d // 2, generator=gen) * 6.28
    cos = torch.cat((angles, angles)).cos()[None].half().to(DEVICE)
    sin = torch.cat((angles, angles)).sin()[None].half().to(DEVICE)
    cache0 = torch.randn(2, 1, kv, length, d, generator=gen).half().to(DEVICE)
    input_pos = torch.tensor([pos], device=DEVICE)
    rows = torch.arange(0, kvq.out_features, 16)
    tile_heads = torch.where(rows < 2 * kv * d, (rows % (kv * d)) // d, (rows - 2 * kv * d) // d // g)
    tile_heads = tile_heads.to(DEVICE, torch.int32)
    need = (2 + g) * d  # rows of q, k and v a head waits for
    gens = torch.zeros(kvq.row_tiles, dtype=torch.int32, device=DEVICE) if tagged else None

    def chain(link, ready, done):
        cache = cache0.clone()
        att_counters = torch.zeros(kv, dtype=torch.int32, device=DEVICE)
        y = _gemv(kvq, x, split, gens, kernel, **({"signal": (ready, tile_heads)} if link else {}))
        if link:  # every head's rows counted once, by the programs that wrote them
            assert ready.tolist() == [need] * kv
        k, v, q = y.view(1, 1, -1).split([kv * d, kv * d, heads * d], dim=-1)
        out = torch.full((1, 1, heads * d), float("nan"), dtype=torch.float16, device=DEVICE)
        a = decode_attention(q.reshape(1, 1, heads, d), k.reshape(1, 1, kv, d), v.reshape(1, 1, kv, d), cos, sin,
                             cache, input_pos, att_counters, out=out, pdl=FAST,
                             **({"ready": (ready, need), "done": done} if link else {}))
        if link:
            assert not ready.any() and done.tolist() == [kv, 0]
        z = _gemv(o, a.view(1, -1), 1, None, **({"gate": (done, kv)} if link else {}))
        assert not att_counters.any()
        return y, a, z, cache

    ready = torch.zeros(kv, dtype=torch.int32, device=DEVICE)
    done = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    plain = chain(False, ready, done)
    for _ in range(2):  # the counters are left at zero: the same counters serve the next step
        linked = chain(True, ready, done)
        assert not ready.any() and not done.any()
        for want, got in zip(plain, linked):
            assert torch.isfinite(got).all()
            assert torch.equal(want, got)


def test_attention_refuses_a_handoff_with_the_exit_flag():
    q = torch.zeros(1, 1, 2, 16, dtype=torch.float16, device=DEVICE)
    k = torch.zeros(1, 1, 2, 16, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(2, 1, 2, 8, 16, dtype=torch.float16, device=DEVICE)
    ones = torch.ones(1, 16, dtype=torch.float16, device=DEVICE)
    c = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="batch 1 and no exit flag"):
        decode_attention(q, k, k, ones, ones, cache, torch.tensor([1], device=DEVICE), c, skip=c[:1],
                         ready=(c, 3))
