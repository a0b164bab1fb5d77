"""Every format-v1 kernel against PackedLinear.dequantize() + a float64 matmul.

Runs the real kernels on CUDA, or on the CPU under TRITON_INTERPRET=1 (scripts/test.sh sets it). Shapes are
deliberately not multiples of the block sizes; outputs are poisoned with NaN first, so an unwritten element fails.
Bounds (relative Frobenius error): fp16 output rounding is 2^-11 ~ 5e-4 and the fp32 sums add little, so 2e-3;
bf16 rounding is 2^-8 ~ 4e-3, so 1e-2; prefill also rounds the weight to fp16 once, still inside 2e-3.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import KernelConfig, mixed_matmul  # noqa: E402
from kernels.dispatch import TENSOR_ORDER  # noqa: E402
from kernels.gemm_mixed import dequantize_mixed, gemm_mixed  # noqa: E402
from kernels.gemv_h2 import gemv_h2  # noqa: E402
from kernels.gemv_mixed import gemv_mixed  # noqa: E402
from kernels.gemv_tc import gemv_tc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (N, K, group size, 4-bit tiles per row tile, outliers per 2-bit group)
LAYERS = [
    (48, 192, 64, 0, 1),    # all 2-bit
    (48, 192, 64, 3, 0),    # all 4-bit
    (80, 384, 128, 1, 2),   # mixed, two outliers
    (48, 320, 64, 2, 1),    # mixed, odd slot counts (3 + 2)
]


def setup(make_packed, layer, m, dtype, seed):
    n, k, g, n4, ko = layer
    packed = make_packed(n, k, g, n4, ko, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = (x.double() @ packed.dequantize(torch.float64).t()).to(torch.float64)
    tensors = tuple(getattr(packed, name).to(DEVICE) for name in TENSOR_ORDER)
    return packed, x.to(DEVICE), ref, tensors


def check(y, ref, dtype):
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = (y - ref).norm() / ref.norm()
    assert err < BOUND[dtype], f"relative error {err:.2e}"


def scratch(m, n, split, t):
    ws = torch.full((split, m, n), float("nan"), device=DEVICE)
    return ws, torch.zeros(16 * t * m, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("m, split, rows, warps", [(1, 1, 8, 1), (1, 2, 16, 2), (3, 3, 4, 1)])
def test_gemv(make_packed, layer, m, split, rows, warps):
    dtype = torch.float16 if m == 1 else torch.bfloat16
    packed, x, ref, tensors = setup(make_packed, layer, m, dtype, seed=m + split)
    y = torch.full((m, layer[0]), float("nan"), dtype=dtype, device=DEVICE)
    ws, counters = scratch(m, layer[0], split, packed.row_tiles)
    gemv_mixed(x, y, ws, counters, *tensors, group_size=packed.group_size, outliers=packed.outliers,
               rows=rows, split=split, num_warps=warps)
    check(y, ref, dtype)
    assert not counters.any(), "split-K counters must be left at zero for the next call"


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("m, split, rows, warps, pairs, early4",
                         [(1, 1, 8, 1, 1, True), (1, 2, 16, 2, 2, False), (2, 3, 4, 1, 2, True)])
def test_gemv_h2(make_packed, layer, m, split, rows, warps, pairs, early4):
    """The fp16x2 GEMV: its inline-PTX path on CUDA, its plain fp32 path (same layout, same sums) everywhere."""
    packed, x, ref, tensors = setup(make_packed, layer, m, torch.float16, seed=30 + m + split)
    for fast in (False, True) if not INTERPRET else (False,):
        y = torch.full((m, layer[0]), float("nan"), dtype=torch.float16, device=DEVICE)
        ws, counters = scratch(m, layer[0], split, packed.row_tiles)
        gemv_h2(x, y, ws, counters, *tensors, group_size=packed.group_size, outliers=packed.outliers,
                rows=rows, split=split, num_warps=warps, pairs=pairs, early4=early4, fast=fast)
        check(y, ref, torch.float16)
        assert not counters.any()


# the tensor-core GEMV's layers: g = 128, 16-row tiles
TC_LAYERS = [
    (80, 384, 128, 1, 2),   # mixed, two outliers
    (48, 640, 128, 2, 1),   # mixed, odd slot counts (3 + 2), one outlier
    (32, 256, 128, 0, 0),   # all 2-bit, no outliers
    (32, 384, 128, 3, 0),   # all 4-bit
]


@pytest.mark.parametrize("layer", TC_LAYERS)
@pytest.mark.parametrize("m, split, unroll, prefetch, early4, unrolled",
                         [(1, 1, 1, True, False, False), (1, 2, 2, False, True, False), (3, 3, 2, True, True, False),
                          (8, 1, 1, False, False, False), (11, 2, 1, True, True, False), (16, 1, 2, True, False, False),
                          (1, 2, 1, True, False, True), (1, 3, 2, True, False, True), (11, 2, 2, True, False, True)])
def test_gemv_tc(make_packed, layer, m, split, unroll, prefetch, early4, unrolled):
    """The tensor-core GEMV: its mma path on CUDA (also as a PDL launch with L2 prefetch, and reading x's
    fragment-ordered copy), its plain fp32 path everywhere."""
    packed, x, ref, tensors = setup(make_packed, layer, m, torch.float16, seed=50 + m + split)
    runs = [(False, False, False)]
    if not INTERPRET:
        runs += [(True, False, False), (True, True, False), (True, False, True), (True, True, True)]
    for fast, pdl, xfrag in runs:
        y = torch.full((m, layer[0]), float("nan"), dtype=torch.float16, device=DEVICE)
        ws, counters = scratch(m, layer[0], split, packed.row_tiles)
        gemv_tc(x, y, ws, counters, *tensors, outliers=packed.outliers, split=split, unroll=unroll,
                prefetch=prefetch, l2=pdl, xfrag=xfrag, early4=early4, fast=fast, pdl=pdl, unrolled=unrolled)
        check(y, ref, torch.float16)
        assert not counters.any()


@pytest.mark.parametrize("layer", TC_LAYERS)
@pytest.mark.parametrize("m, split, unroll, unrolled", [(1, 2, 1, False), (1, 3, 2, True), (3, 2, 2, False)])
def test_gemv_tc_adds_its_shares_into_an_fp32_sum(make_packed, layer, m, split, unroll, unrolled):
    """`atomic`: each split share adds its partial sums into y (fp32): y grows by x @ W.T. Bound: fp32 sums of fp16
    products against float64, 1e-4 relative."""
    packed, x, ref, tensors = setup(make_packed, layer, m, torch.float16, seed=90 + m + split)
    runs = [False] + ([True] if not INTERPRET else [])
    for fast in runs:
        start = torch.randn(m, layer[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
        acc = start.clone()
        gemv_tc(x, acc, acc, acc, *tensors, outliers=packed.outliers, split=split, unroll=unroll, fast=fast,
                unrolled=unrolled, pdl=fast, atomic=True)
        added = (acc - start).double().cpu()
        assert (added - ref).norm() / ref.norm() < 1e-4


def test_mixed_matmul_add_runs_where_the_split_k_gemv_would(make_packed):
    """sums_in_place holds where the configuration is the split-K tensor-core GEMV (K = 1024: 8 groups, split 2
    by the heuristic), and mixed_matmul_add then adds the product; elsewhere (K = 384: split 1) it refuses."""
    from kernels.dispatch import choose_config, mixed_matmul_add, sums_in_place

    packed, x, ref, tensors = setup(make_packed, (48, 1024, 128, 2, 1), 1, torch.float16, seed=5)
    assert choose_config(1, 48, 1024, 128, x.device).split > 1
    assert sums_in_place(x, tensors, group_size=128, outliers=1)
    acc = torch.zeros(1, 48, device=DEVICE)
    mixed_matmul_add(x, tensors, acc, group_size=128, outliers=1)
    assert (acc.double().cpu() - ref).norm() / ref.norm() < 1e-4
    _, x1, _, tensors1 = setup(make_packed, (48, 384, 128, 1, 1), 1, torch.float16, seed=6)
    assert not sums_in_place(x1, tensors1, group_size=128, outliers=1)
    with pytest.raises(ValueError, match="sums_in_place"):
        mixed_matmul_add(x1, tensors1, torch.zeros(1, 48, device=DEVICE), group_size=128, outliers=1)


# ragged stacks: (rows, 4-bit tiles per row tile) of each part, all of K = 384 and g = 128; outliers per 2-bit group
RAGGED = [([(48, 1), (32, 0), (64, 2)], 1), ([(32, 3), (48, 1)], 0), ([(16, 0), (16, 3)], 2)]


@pytest.mark.parametrize("ragged", RAGGED)
@pytest.mark.parametrize("m, split, unroll, early4", [(1, 1, 1, False), (1, 2, 2, True), (3, 3, 1, False),
                                                     (11, 2, 2, True)])
def test_gemv_tc_ragged_stack(make_packed, ragged, m, split, unroll, early4):
    """Linears that differ only in n4, as one launch over their concatenated tensors (`PackedLinear.ragged_rows`):
    equal to x times the parts' dequantized weights stacked, on the mma path (CUDA) and the plain fp32 path."""
    from mpq.quant.format import PackedLinear

    shapes, ko = ragged
    parts = [make_packed(n, 384, 128, n4, ko, seed=90 + i) for i, (n, n4) in enumerate(shapes)]
    flat, geometry = PackedLinear.ragged_rows(parts)
    assert geometry == tuple((n // 16, 3 - n4, n4) for n, n4 in shapes)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).half()
    ref = x.double() @ torch.cat([p.dequantize(torch.float64) for p in parts]).t()
    tensors = tuple(flat[name].to(DEVICE) for name in TENSOR_ORDER)
    n = sum(n for n, _ in shapes)
    for fast in (False,) if INTERPRET else (False, True):
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
        ws, counters = scratch(m, n, split, n // 16)
        gemv_tc(x.to(DEVICE), y, ws, counters, *tensors, outliers=ko, split=split, unroll=unroll, early4=early4,
                fast=fast, pdl=fast, l2=fast, parts=geometry)
        check(y, ref, torch.float16)
        assert not counters.any()


@pytest.mark.parametrize("m", [1, 16])
def test_mixed_matmul_runs_a_ragged_stack_in_one_call(make_packed, m):
    """The dispatcher runs a ragged stack on the tensor-core GEMV (M <= 16), with the linear's own scratch sized for
    it (`counter_words(..., ragged=True)`); an M it cannot take is refused, not run wrong."""
    from kernels.dispatch import counter_words
    from mpq.quant.format import PackedLinear

    parts = [make_packed(n, 384, 128, n4, 1, seed=70 + n) for n, n4 in [(48, 1), (32, 0), (64, 2)]]
    flat, geometry = PackedLinear.ragged_rows(parts)
    tensors = tuple(flat[name].to(DEVICE) for name in TENSOR_ORDER)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).half()
    ref = x.double() @ torch.cat([p.dequantize(torch.float64) for p in parts]).t()
    words = counter_words(144, 384, 128, 16, 1, torch.device(DEVICE), ragged=True)
    scratch = torch.zeros(words, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        check(mixed_matmul(x.to(DEVICE), tensors, group_size=128, outliers=1, counters=scratch, parts=geometry), ref,
              torch.float16)
    with pytest.raises(ValueError, match="ragged"):
        mixed_matmul(torch.zeros(17, 384, dtype=torch.float16, device=DEVICE), tensors, group_size=128, outliers=1,
                     counters=scratch, parts=geometry)


def test_ragged_views_are_the_parts(make_packed):
    """The parts of a ragged stack come back, as views of its tensors, equal to what went in."""
    from mpq.quant.format import TENSOR_NAMES, PackedLinear

    parts = [make_packed(n, 384, 128, n4, 1, seed=i) for i, (n, n4) in enumerate([(48, 1), (32, 0), (64, 2)])]
    flat, _ = PackedLinear.ragged_rows(parts)
    back = PackedLinear.ragged_views(flat, [p.meta() for p in parts])
    for a, b in zip(parts, back):
        assert a.meta() == b.meta()
        for name in TENSOR_NAMES:
            assert torch.equal(getattr(a, name), getattr(b, name))
            assert getattr(b, name).untyped_storage().data_ptr() == flat[name].untyped_storage().data_ptr()


@pytest.mark.parametrize("layer", [TC_LAYERS[0], TC_LAYERS[1]])
@pytest.mark.parametrize("m, split, gen_early", [(1, 2, False), (1, 3, True), (3, 2, False), (3, 2, True)])
def test_gemv_tc_fenceless_split_epilogue(make_packed, layer, m, split, gen_early):
    """The split-K epilogue without a fence: partials tagged with the tile's generation in a workspace that keeps
    its contents (the generation read at the end, or early with `gen_early`). Three calls in a row on one scratch
    (the workspace poisoned with foreign tags first) are each right; afterwards the counters are back at zero and
    every tile's generation has advanced by three."""
    n = layer[0]
    packed, _, _, tensors = setup(make_packed, layer, m, torch.float16, seed=70 + m + split)
    t = packed.row_tiles
    gens = torch.zeros(t, dtype=torch.int32, device=DEVICE)
    ws = torch.randint(-2**62, 2**62, (split * m * n,), dtype=torch.int64, device=DEVICE)
    ws = ws & 0x0000_7FFF_FFFF_FFFF | (0x7ABC << 48)  # tags no call of this test will use
    counters = torch.zeros(16 * t * m, dtype=torch.int32, device=DEVICE)
    fast_runs = [False] if INTERPRET else [False, True]
    calls = 0
    for fast in fast_runs:
        for seed in range(3):
            x = torch.randn(m, layer[1], generator=torch.Generator().manual_seed(seed)).half()
            ref = x.double() @ packed.dequantize(torch.float64).t()
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
            gemv_tc(x.to(DEVICE), y, ws, counters, *tensors, outliers=packed.outliers, split=split, gens=gens,
                    gen_early=gen_early, fast=fast, pdl=fast)
            check(y, ref, torch.float16)
            calls += 1
    assert not counters.any()
    assert (gens == calls).all()
    assert ((ws.view(split, m, n) >> 32) == calls).all()  # every partial of the last call carries its tag


def test_linear_scratch_runs_the_fenceless_epilogue(make_packed, monkeypatch):
    """A linear whose M = 1 row is the tensor-core GEMV with split-K owns the epilogue's state after its
    counters (`counter_words`), and the dispatcher then runs the fenceless epilogue there; a caller with only the
    counters gets the fenced one."""
    from kernels import dispatch

    layer = TC_LAYERS[1]
    packed, x, ref, tensors = setup(make_packed, layer, 1, torch.float16, seed=81)
    cfg = KernelConfig("tc", split=2)
    monkeypatch.setattr(dispatch, "choose_config", lambda *a, **k: cfg)
    words = dispatch.counter_words(layer[0], layer[1], 128, 16, packed.outliers, torch.device(DEVICE))
    t = packed.row_tiles
    assert words == 16 * t + t + t % 2 + 2 * 2 * layer[0]
    scratch = torch.zeros(words, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        check(mixed_matmul(x, tensors, group_size=128, outliers=packed.outliers, counters=scratch, config=cfg), ref,
              torch.float16)
    assert not scratch[:16 * t].any() and (scratch[16 * t:17 * t] == 2).all()
    plain = torch.zeros(16 * t, dtype=torch.int32, device=DEVICE)
    check(mixed_matmul(x, tensors, group_size=128, outliers=packed.outliers, counters=plain, config=cfg), ref,
          torch.float16)
    assert not plain.any()


@pytest.mark.parametrize("m, k", [(1, 256), (5, 384), (8, 128), (9, 256), (16, 384)])
def test_x_fragments_put_each_lanes_b_words_in_four_chunks(m, k):
    """x_fragments against the mma B fragment spelled out: lane (g, t) of activation block n, chunk i, word j holds
    fragment word f = 4i + j, i.e. k-block b = f // 2 at k = 16b + 2t (+ 8 for odd f) of activation row 8n + g
    (every lane row 0 at M = 1; zero past M). M > 1: then x transposed, zero-padded to 8 or 16 rows."""
    from kernels.gemv_tc import fragment_words, x_fragments
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.float16)
    words = x.view(torch.int32)  # word c holds columns 2c, 2c + 1
    blocks = 1 if m <= 8 else 2
    expect = []
    for col in range(k // 128):
        for n in range(1 if m == 1 else blocks):
            for i in range(4):
                for lane in range(4 if m == 1 else 32):
                    g, t = divmod(lane, 4)
                    row = 0 if m == 1 else 8 * n + g
                    for j in range(4):
                        f = 4 * i + j
                        kk = 16 * (f // 2) + 2 * t + 8 * (f % 2)
                        expect.append(int(words[row, (col * 128 + kk) // 2]) if row < m else 0)
    if m > 1:  # then the outliers' pair words: activations 2p, 2p + 1 of each column
        halves = torch.zeros(8 * blocks, k, dtype=torch.float16)
        halves[:m] = x
        expect += halves.t().contiguous().view(torch.int32).flatten().tolist()
    got = x_fragments(x.to(DEVICE)).cpu()
    assert got.numel() == fragment_words(m, k) == len(expect)
    assert got.tolist() == expect


def test_tc_config_takes_bf16_x(make_packed):
    """A table row of kind "tc" with bf16 activations: the mma path is fp16-only, so on CUDA the dispatcher runs the
    CUDA-core kernels' choice instead; the interpreter runs the tensor-core GEMV's plain path. Either way: correct."""
    packed, x, ref, tensors = setup(make_packed, TC_LAYERS[1], 3, torch.bfloat16, seed=77)
    counters = torch.zeros(16 * packed.row_tiles, dtype=torch.int32, device=DEVICE)
    y = mixed_matmul(x, tensors, group_size=packed.group_size, outliers=packed.outliers, counters=counters,
                     config=KernelConfig("tc", split=2))
    assert y.dtype == torch.bfloat16
    check(y, ref, torch.bfloat16)


def test_heuristic_prefers_the_tensor_core_gemv_up_to_16_rows():
    """Without a table row: the tensor-core GEMV for M <= 16, split so that each share keeps >= 4 groups; the
    CUDA-core choice when tensor cores are ruled out."""
    from kernels.dispatch import heuristic_config

    for m in (1, 4, 16):
        cfg = heuristic_config(m, 4096, 11008, 128, 132)
        assert cfg.kind == "tc" and (11008 // 128) // cfg.split >= 4 and 256 * cfg.split >= 132
    assert heuristic_config(17, 4096, 4096, 128, 132).kind == "gemm"
    assert heuristic_config(1, 4096, 4096, 128, 132, tensor_cores=False).kind == "gemv2"
    assert heuristic_config(4, 4096, 4096, 128, 132, tensor_cores=False).kind == "gemm"


@pytest.mark.parametrize("m, cfg", [(1, KernelConfig("gemv", rows=4, split=2)), (2, KernelConfig("gemv", rows=4, split=2)),
                                    (2, KernelConfig("gemv2", rows=8, split=3)), (5, KernelConfig("gemm", block_m=16, split=2)),
                                    (3, KernelConfig("tc", split=2))])
def test_64_row_tiles_keep_split_counters_in_bounds(make_packed, m, cfg):
    """tile_rows is a format parameter: with 64-row tiles a GEMV runs 64 / rows programs per tile, so split-K must
    fall back to one share where that many counters per row tile would not fit (a 2-row, 4-row-program GEMV needs
    32, the buffer holds 16). The tensor-core GEMV takes 16-row tiles only: its configuration falls back to the
    CUDA-core kernels. Counters past the end are a sentinel that any stray atomic would change."""
    packed = make_packed(128, 384, 64, 2, 1, seed=m, tile_rows=64)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(9)).half()
    ref = x.double() @ packed.dequantize(torch.float64).t()
    tensors = tuple(getattr(packed, name).to(DEVICE) for name in TENSOR_ORDER)
    need = 16 * packed.row_tiles
    buffer = torch.full((2 * need,), 7, dtype=torch.int32, device=DEVICE)
    buffer[:need] = 0
    y = mixed_matmul(x.to(DEVICE), tensors, group_size=64, outliers=1, counters=buffer[:need], config=cfg)
    check(y, ref, torch.float16)
    assert not buffer[:need].any() and (buffer[need:] == 7).all()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("m, split", [(3, 2), (16, 1), (33, 3)])
def test_gemm(make_packed, layer, m, split):
    # bf16 arithmetic is wrong under the Triton interpreter (3.9: bf16 a - b gives garbage), so bf16 on CUDA only
    dtype = torch.bfloat16 if m == 3 and not INTERPRET else torch.float16
    packed, x, ref, tensors = setup(make_packed, layer, m, dtype, seed=10 + m)
    y = torch.full((m, layer[0]), float("nan"), dtype=dtype, device=DEVICE)
    ws, counters = scratch(m, layer[0], split, packed.row_tiles)
    gemm_mixed(x, y, ws, counters, *tensors, group_size=packed.group_size, outliers=packed.outliers,
               block_m=16, split=split, num_warps=1 if m < 33 else 2, num_stages=2)
    check(y, ref, dtype)
    assert not counters.any()


@pytest.mark.parametrize("layer", LAYERS)
def test_dequantize(make_packed, layer):
    packed = make_packed(*layer, seed=7)
    w = torch.full((layer[0], layer[1]), float("nan"), device=DEVICE)
    tensors = tuple(getattr(packed, name).to(DEVICE) for name in TENSOR_ORDER)
    dequantize_mixed(w, *tensors, group_size=packed.group_size, outliers=packed.outliers)
    torch.testing.assert_close(w.cpu(), packed.dequantize(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m, kind", [(1, "gemv"), (2, "gemv2"), (3, "tc"), (12, "tc"), (16, "gemm"),
                                     (33, "prefill")])
def test_dispatch(make_packed, m, kind):
    """The public entry point, with the default configuration of each kind, twice (counters reset)."""
    layer = LAYERS[2]
    packed, x, ref, tensors = setup(make_packed, layer, m, torch.float16, seed=20 + m)
    counters = torch.zeros(16 * packed.row_tiles, dtype=torch.int32, device=DEVICE)
    for split in (1, 2) if kind != "prefill" else (1,):
        y = mixed_matmul(x, tensors, group_size=packed.group_size, outliers=packed.outliers, counters=counters,
                         config=KernelConfig(kind, split=split))
        check(y, ref, torch.float16)


@pytest.mark.skipif(INTERPRET, reason="the fp16x2 GEMV and its fallback warning exist on CUDA only")
def test_gemv2_unaligned_tensor_falls_back_loudly(make_packed):
    """A format tensor at an odd address (a view into a larger buffer) cannot be read as whole words: the dispatch
    runs GEMV v1 instead, correctly, and says so once."""
    from kernels.dispatch import _say_slow_path

    packed, x, ref, tensors = setup(make_packed, LAYERS[2], 1, torch.float16, seed=50)
    s2 = tensors[1]
    buf = torch.empty(s2.numel() + 1, dtype=s2.dtype, device=DEVICE)
    odd = buf[1:].view(s2.shape)
    odd.copy_(s2)
    tensors = (tensors[0], odd, *tensors[2:])
    _say_slow_path.cache_clear()
    counters = torch.zeros(16 * packed.row_tiles, dtype=torch.int32, device=DEVICE)
    with pytest.warns(UserWarning, match="not 16-byte aligned"):
        y = mixed_matmul(x, tensors, group_size=packed.group_size, outliers=packed.outliers, counters=counters,
                         config=KernelConfig("gemv2"))
    check(y, ref, torch.float16)


def test_table_rows_for_layers_with_and_without_outliers(monkeypatch):
    """A tuned table may hold one row per shape for layers with outliers and one for layers without (they compile
    to different kernels); a row without the field serves both; shapes it lacks get the heuristic."""
    import kernels.dispatch as dispatch

    with_o, without_o, any_k = (KernelConfig("gemv2", rows=r) for r in (8, 4, 16))
    table = {(1, 4096, 4096, 128, True): with_o, (1, 4096, 4096, 128, False): without_o,
             (1, 11008, 4096, 128, None): any_k}
    monkeypatch.setattr(dispatch, "_device_facts", lambda device: (132, table))
    cpu = torch.device("cpu")
    assert dispatch.choose_config(1, 4096, 4096, 128, cpu, outliers=2) == with_o
    assert dispatch.choose_config(1, 4096, 4096, 128, cpu, outliers=0) == without_o
    assert dispatch.choose_config(1, 11008, 4096, 128, cpu, outliers=0) == any_k
    assert dispatch.choose_config(1, 11008, 4096, 128, cpu, outliers=1) == any_k
    assert dispatch.choose_config(1, 4096, 11008, 128, cpu) == dispatch.heuristic_config(1, 4096, 11008, 128, 132)
