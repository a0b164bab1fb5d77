"""Pick a kernel and its configuration per (M, N, K), then launch it.

Configurations are data: kernels/configs/<gpu>.json (written from the sweep in scripts/gpu_kernels.py) maps
shape classes to measured winners; shapes it does not list fall back to `heuristic_config`. Nothing here
autotunes at call time, so a warmed-up call is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import warnings

import torch
import triton

from kernels.gemm_mixed import gemm_mixed, prefill_mixed
from kernels.gemv_h2 import gemv_h2
from kernels.gemv_mixed import gemv_mixed
from kernels.gemv_tc import GROUP_SIZE as TC_GROUP, MAX_M as TC_MAX_M, TILE_ROWS as TC_ROWS, gemv_tc

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
TENSOR_ORDER = ("q2", "s2", "z2", "ss2", "idx2", "ov", "oi", "q4", "s4", "z4", "ss4", "idx4")
COUNTERS_PER_ROW_TILE = 16  # split-K counters: one per (program, activation row or BM-block) of each row tile
GEMV_MAX_M = 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMM_MAX_M = 64
# cards that run another card's table: the H200 is the H100's die (132 SMs, sm_90) with faster, larger HBM
TABLE_OF = {"h200": "h100"}
# programmatic dependent launch of the decode step's kernels on sm_90+ (MPQ_PDL=0 turns it off, e.g. for an A/B)
PDL = os.environ.get("MPQ_PDL", "1") != "0"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    kind: str  # "tc" (decode GEMV on tensor cores, M <= 16: fp16 x, 16-row tiles, g = 128, sm_80+; else the
    # heuristic's CUDA-core choice runs), "gemv"/"gemv2" (CUDA cores, M tiny; gemv2 decodes in fp16x2, fp16 x on CUDA
    # only, else it runs as gemv), "gemm" (tensor cores, skinny M), "prefill" (dequantize + cuBLAS)
    split: int = 1
    rows: int = 8  # GEMV: rows of a 16-row tile per program
    block_m: int = 16  # GEMM: activation rows per program
    num_warps: int = 1
    num_stages: int = 2
    pairs: int = 1  # GEMV2: word pairs of each row per thread (2: two threads share a program's rows)
    early4: bool = False  # GEMV2, TC: the 4-bit stream's first chunk (slot) loaded before the 2-bit stream runs
    unroll: int = 1  # TC: slots per loop step (1 or 2)
    prefetch: bool = True  # TC: the next step's loads issued before this step's arithmetic
    l2: bool = False  # TC: each program first asks L2 for all its weights
    xfrag: bool = False  # TC: B from a fragment-ordered copy of x (one small kernel first; 16-byte loads)
    gen_early: bool = False  # TC, split-K at M = 1: the fenceless epilogue's generation read at the start, not the end
    unrolled: bool = False  # TC: a program's loop unrolled, all of its loads issued before any arithmetic


def heuristic_config(m: int, n: int, k: int, group_size: int, sm_count: int, tensor_cores: bool = True) -> KernelConfig:
    """Enough programs to fill the chip several times over, each with a few slots per stream."""
    tiles = n // 16
    groups = k // group_size
    if tensor_cores and m <= TC_MAX_M:  # one warp per (row tile, split share): 16-32 warps per SM measured best
        split = 1
        while tiles * split < 16 * sm_count and groups // (split * 2) >= 4:
            split *= 2
        return KernelConfig("tc", split=split)
    if m <= GEMV_MAX_M:
        split = 1
        while tiles * m * split < 8 * sm_count and groups // (split * 2) >= 8:
            split *= 2
        return KernelConfig("gemv2", split=split, rows=8, num_warps=1)  # runs as "gemv" unless x is fp16 on CUDA
    if m <= GEMM_MAX_M:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        split = 1
        while tiles * triton.cdiv(m, block_m) * split < 2 * sm_count and groups // (split * 2) >= 4:
            split *= 2
        return KernelConfig("gemm", split=split, block_m=block_m, num_warps=1, num_stages=3)
    return KernelConfig("prefill")


@functools.lru_cache(maxsize=None)
def _props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def pdl_enabled(device: torch.device) -> bool:
    """Launch the decode step's kernels as programmatic dependents: on sm_90+ CUDA devices, unless MPQ_PDL=0 or PDL
    is set False."""
    return PDL and device.type == "cuda" and not INTERPRET and _props(device).major >= 9


def m_bucket(m: int) -> int:
    return 1 if m <= 1 else min(triton.next_power_of_2(m), 2 * GEMM_MAX_M)


@functools.lru_cache(maxsize=None)
def _device_facts(device: torch.device) -> tuple[int, dict]:
    """(SM count, tuned table) of a device; read once, on first use, never at import."""
    if device.type != "cuda":
        return 132, {}
    props = _props(device)
    slug = props.name.lower().replace("nvidia", "").split()[0] if props.name else "unknown"
    path = CONFIG_DIR / f"{TABLE_OF.get(slug, slug)}.json"
    table = {}
    if path.exists():
        for row in json.loads(path.read_text())["configs"]:
            key = (row["m_bucket"], row["n"], row["k"], row["group_size"], row.get("outliers"))
            table[key] = KernelConfig(**row["config"])
    return props.multi_processor_count, table


def choose_config(m: int, n: int, k: int, group_size: int, device: torch.device, outliers: int = 1,
                  ragged: bool = False) -> KernelConfig:
    """The table's row for this shape and for layers with (or without) outliers, else its row for any layer, else
    the heuristic. The two kinds of layer compile to different kernels whose best configurations differ. ragged: for
    a ragged stack (`gemv_tc`'s `parts`), which only the tensor-core GEMV runs, looped: a row of another kind gives
    way to the heuristic's tensor-core row."""
    sm_count, table = _device_facts(device)
    shape = (m_bucket(m), n, k, group_size)
    cfg = (table.get((*shape, outliers > 0)) or table.get((*shape, None))
           or heuristic_config(m, n, k, group_size, sm_count))
    if ragged:
        cfg = cfg if cfg.kind == "tc" else heuristic_config(m, n, k, group_size, sm_count)
        cfg = dataclasses.replace(cfg, unrolled=False)
    return cfg


def config_row(m: int, n: int, k: int, group_size: int, config: KernelConfig, outliers: int | None = None) -> dict:
    """One entry of a kernels/configs/<gpu>.json table (`outliers`: measured on layers with them or without; None
    for any layer)."""
    row = {"m_bucket": m_bucket(m), "n": n, "k": k, "group_size": group_size, "config": dataclasses.asdict(config)}
    return row if outliers is None else {**row, "outliers": outliers > 0}


def _tagged_layout(tiles: int, words: int) -> tuple[int, int, int]:
    """Where the fenceless epilogue's state lies in a linear's int32 scratch, after the counters: (start of the
    generation words, one per row tile; start of the int64 workspace, 8-byte aligned; its end for `words` int32)."""
    gens = COUNTERS_PER_ROW_TILE * tiles
    ws = gens + tiles + tiles % 2
    return gens, ws, ws + words


def scratch_words(n: int, tile_rows: int, split: int) -> int:
    """int32 words of split-K scratch with room for the fenceless epilogue of an M = 1 call with up to `split`
    shares (`_tagged_scratch`): the counters, a generation per row tile, the workspace."""
    tiles = n // tile_rows
    return _tagged_layout(tiles, 2 * split * n)[2] if split > 1 else COUNTERS_PER_ROW_TILE * tiles


def counter_words(n: int, k: int, group_size: int, tile_rows: int, outliers: int, device: torch.device,
                  ragged: bool = False) -> int:
    """int32 words of split-K scratch a linear (or a ragged stack) should own: the counters, and where its M = 1 row
    runs the tensor-core GEMV with split-K, that kernel's fenceless epilogue state after them."""
    cfg = choose_config(1, n, k, group_size, device, outliers, ragged)
    tc_split = cfg.kind == "tc" and tile_rows == TC_ROWS and group_size == TC_GROUP
    return scratch_words(n, tile_rows, cfg.split if tc_split else 1)


def _tagged_scratch(counters: torch.Tensor, tiles: int, m: int, n: int, split: int):
    """(generation words, int64 workspace) of the fenceless split-K epilogue, carved from the scratch after the
    counters, or None where the caller's scratch has no room (it then runs the fenced epilogue)."""
    gens, ws, end = _tagged_layout(tiles, 2 * split * m * n)
    if counters.numel() < end or counters.data_ptr() % 8:
        return None
    return counters[gens:gens + tiles], counters[ws:end].view(torch.int64)


def _tc_layout(x: torch.Tensor, group_size: int, tile_rows: int) -> bool:
    """The shapes the tensor-core GEMV's fragments assume: M <= 16, 16-row tiles, g = 128."""
    return x.shape[0] <= TC_MAX_M and tile_rows == TC_ROWS and group_size == TC_GROUP


def _tc_fast(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], group_size: int, tile_rows: int | None = None) -> bool:
    """The tensor-core GEMV runs: its layout, fp16 x in whole 4-byte words, 8-byte aligned format tensors (it reads
    zeros as 32/64-bit words), a CUDA device with mma.sync (sm_80+), not the interpreter. tile_rows: given for a
    ragged stack, whose tensors are flat."""
    layout = _tc_layout(x, group_size, tensors[0].shape[2] if tile_rows is None else tile_rows)
    return (layout and x.dtype == torch.float16 and x.device.type == "cuda"
            and not INTERPRET and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
            and not any(t.data_ptr() % 8 for t in tensors) and _props(x.device).major >= 8)


def ragged_runs(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], group_size: int, tile_rows: int) -> bool:
    """Whether a ragged stack runs as one launch for this x (the tensor-core GEMV, or its plain path under the
    interpreter); else its caller runs the parts one by one."""
    if INTERPRET:
        return _tc_layout(x, group_size, tile_rows)
    return _tc_fast(x.contiguous(), tensors, group_size, tile_rows)


@functools.lru_cache(maxsize=None)
def _say_slow_path(reason: str) -> None:
    """Warn once per reason that the decode GEMV runs the slower v1 kernel (users should know when the fast
    path is off)."""
    warnings.warn(f"mpq: decode GEMV on its slower path: {reason}", stacklevel=3)


def mixed_matmul(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], *, group_size: int, outliers: int,
                 counters: torch.Tensor, config: KernelConfig | None = None, skip: torch.Tensor | None = None,
                 keep_tiles: int = 0, parts: tuple[tuple[int, int, int], ...] | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T for W in format v1; `tensors` in TENSOR_ORDER; counters int32, zero, >= 16 * N / 16
    (`counter_words` for a linear's own scratch: its M = 1 tensor-core GEMV then runs the split-K epilogue without a
    fence, and keeps state between calls there).

    x must be contiguous fp16/bf16 (fp32 also works off the tensor-core path); y has x's dtype.
    skip (int32 [1], on x's device), keep_tiles: the exit flag of the one-graph exit decoder (`kernels.exit_flag`);
    the decode GEMVs only (M <= 16): row tiles at or past keep_tiles are left unwritten while it is set.
    parts: a ragged stack (`gemv_tc`), where `ragged_runs` holds: one tensor-core GEMV launch.
    """
    m, n = x.shape[0], tensors[3].shape[0]
    cfg = config or choose_config(m, n, x.shape[1], group_size, x.device, outliers, ragged=parts is not None)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if parts is not None:
        return _ragged_matmul(x, y, tensors, cfg, group_size, outliers, counters, skip, keep_tiles, parts)
    if skip is not None and cfg.kind not in ("tc", "gemv2", "gemv"):
        raise ValueError(f"the exit flag is read by the decode GEMVs only, not by the {cfg.kind} kernel (M = {m})")
    if cfg.kind == "prefill":
        return prefill_mixed(x, y, *tensors, group_size=group_size, outliers=outliers)
    tc_fast = cfg.kind == "tc" and _tc_fast(x, tensors, group_size)
    if cfg.kind == "tc" and not tc_fast and not (INTERPRET and _tc_layout(x, group_size, tensors[0].shape[2])):
        # no tensor-core GEMV for this input: the CUDA-core kernels' heuristic choice
        cfg = heuristic_config(m, n, x.shape[1], group_size, _device_facts(x.device)[0], tensor_cores=False)
    if cfg.kind == "gemv2" and (x.dtype != torch.float16 or INTERPRET or any(t.data_ptr() % 16 for t in tensors)):
        # the fp16x2 path needs fp16 x, a GPU (inline PTX) and 16-byte aligned tensors (it reads a program's
        # scale codes, zeros and outliers as whole 64-bit words)
        if not INTERPRET:
            _say_slow_path(f"x is {x.dtype}, not torch.float16" if x.dtype != torch.float16 else
                           "a format tensor is not 16-byte aligned (a view at an odd offset?)")
        cfg = dataclasses.replace(cfg, kind="gemv")
    # split-K counters a row tile needs: a GEMV runs tile_rows / rows programs per tile and activation row
    blocks = (1 if cfg.kind == "tc" else m * (tensors[0].shape[2] // cfg.rows) if cfg.kind.startswith("gemv")
              else triton.cdiv(m, cfg.block_m))
    if cfg.split > 1 and blocks > COUNTERS_PER_ROW_TILE:
        cfg = dataclasses.replace(cfg, split=1)
    gens, ws = _split_scratch(y, counters, tensors[0].shape[0], cfg)
    if cfg.kind == "tc":
        return _run_tc(x, y, ws, gens, counters, tensors, cfg, outliers, tc_fast, skip, keep_tiles)
    if cfg.kind == "gemv2":
        return gemv_h2(x, y, ws, counters, *tensors, group_size=group_size, outliers=outliers,
                       rows=cfg.rows, split=cfg.split, num_warps=cfg.num_warps,
                       pairs=cfg.pairs if group_size >= 64 else 1, early4=cfg.early4, fast=True,
                       pdl=pdl_enabled(x.device), skip=skip, keep_tiles=keep_tiles)
    if cfg.kind == "gemv":
        return gemv_mixed(x, y, ws, counters, *tensors, group_size=group_size, outliers=outliers,
                          rows=cfg.rows, split=cfg.split, num_warps=cfg.num_warps, skip=skip, keep_tiles=keep_tiles)
    return gemm_mixed(x, y, ws, counters, *tensors, group_size=group_size, outliers=outliers,
                      block_m=cfg.block_m, split=cfg.split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def grouped_parts(flat: list[int] | None) -> tuple[tuple[int, int, int], ...] | None:
    """A ragged stack's parts as the kernels take them, from the flat list a torch custom op can carry."""
    return None if flat is None else tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))


def _split_tc_config(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], group_size: int, outliers: int,
                     parts: tuple[tuple[int, int, int], ...] | None) -> KernelConfig | None:
    """The chosen configuration where it is the tensor-core GEMV with split-K and that kernel runs for x, else None."""
    m, k = x.shape
    cfg = choose_config(m, tensors[3].shape[0], k, group_size, x.device, outliers, ragged=parts is not None)
    if cfg.kind != "tc" or cfg.split == 1:
        return None
    if parts is not None:
        runs = ragged_runs(x, tensors, group_size, tensors[3].shape[0] // sum(p[0] for p in parts))
    else:
        runs = _tc_fast(x, tensors, group_size) or (INTERPRET and _tc_layout(x, group_size, tensors[0].shape[2]))
    return cfg if runs else None


def sums_in_place(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], *, group_size: int, outliers: int,
                  parts: tuple[tuple[int, int, int], ...] | None = None) -> bool:
    """Whether `mixed_matmul_add` runs for this x (contiguous [M, K]): where the chosen configuration is the
    tensor-core GEMV with split-K, whose shares can then add into an fp32 sum instead of handing their partials to
    the last one (which costs the 7B decode step ~0.08 ms a token: benchmarks/e2e-notes.md, runs 32 and 33)."""
    return _split_tc_config(x, tensors, group_size, outliers, parts) is not None


def mixed_matmul_add(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], acc: torch.Tensor, *, group_size: int,
                     outliers: int, skip: torch.Tensor | None = None, keep_tiles: int = 0,
                     parts: tuple[tuple[int, int, int], ...] | None = None) -> None:
    """acc [M, N] (fp32, contiguous) += x [M, K] @ W.T, where `sums_in_place` holds: the tensor-core GEMV's split
    shares add their partial sums into acc by atomics, so the order of the additions varies from call to call.
    skip, keep_tiles, parts: as for `mixed_matmul`."""
    cfg = _split_tc_config(x, tensors, group_size, outliers, parts)
    if cfg is None:
        raise ValueError("mixed_matmul_add: this call does not run the split-K tensor-core GEMV (sums_in_place)")
    if acc.dtype != torch.float32 or not acc.is_contiguous() or acc.shape != (x.shape[0], tensors[3].shape[0]):
        raise ValueError(f"mixed_matmul_add: acc must be contiguous fp32 {x.shape[0]} x {tensors[3].shape[0]}")
    _run_tc(x, acc, acc, None, acc, tensors, cfg, outliers, not INTERPRET, skip, keep_tiles, parts, atomic=True)


def _ragged_matmul(x, y, tensors, cfg, group_size, outliers, counters, skip, keep_tiles, parts):
    """mixed_matmul of a ragged stack: the tensor-core GEMV over all parts at once."""
    tiles = sum(p[0] for p in parts)
    if cfg.kind != "tc" or cfg.unrolled or not ragged_runs(x, tensors, group_size, y.shape[1] // tiles):
        raise ValueError(f"a ragged stack runs only on the looped tensor-core GEMV (M = {x.shape[0]}, {cfg})")
    gens, ws = _split_scratch(y, counters, tiles, cfg)
    return _run_tc(x, y, ws, gens, counters, tensors, cfg, outliers, not INTERPRET, skip, keep_tiles, parts)


def _split_scratch(y: torch.Tensor, counters: torch.Tensor, tiles: int, cfg: KernelConfig):
    """(generations or None, workspace) of a call's split-K epilogue: in the caller's scratch where an M = 1
    tensor-core call has room there (fenceless), else a fresh fp32 workspace (y itself without split-K)."""
    if counters.numel() < COUNTERS_PER_ROW_TILE * tiles:
        raise ValueError(f"counters too small: need {COUNTERS_PER_ROW_TILE} int32 per row tile")
    m, n = y.shape
    tagged = (_tagged_scratch(counters, tiles, m, n, cfg.split)
              if cfg.kind == "tc" and cfg.split > 1 and m == 1 else None)  # M > 1: its 4-8 values a lane cost registers
    if tagged is not None:
        return tagged
    return None, torch.empty(cfg.split, m, n, dtype=torch.float32, device=y.device) if cfg.split > 1 else y


def _run_tc(x, y, ws, gens, counters, tensors, cfg, outliers, fast, skip, keep_tiles, parts=None, atomic=False):
    """The tensor-core GEMV launch with a configuration's knobs (fast False: its plain path, the interpreter's;
    atomic: y fp32, the product added to it)."""
    return gemv_tc(x, y, ws, counters, *tensors, outliers=outliers, split=cfg.split, unroll=cfg.unroll,
                   prefetch=cfg.prefetch, l2=cfg.l2, xfrag=cfg.xfrag, early4=cfg.early4, gens=gens,
                   gen_early=cfg.gen_early, fast=fast, unrolled=cfg.unrolled, pdl=fast and pdl_enabled(x.device),
                   skip=skip, keep_tiles=keep_tiles, parts=parts, atomic=atomic)
