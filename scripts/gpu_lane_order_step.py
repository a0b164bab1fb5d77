"""Does the tensor-core GEMV's lane order (`kernels.gemv_tc.lane_order`, `gemv_tc(lane=True)`) pay in the decode
step? (GPU, timing and equality; the layout is not a format yet.)

The lane order keeps format v1's bytes and moves them within each slot: a lane's code words in one (2-bit) or two
(4-bit) 16-byte loads instead of two or four 8-byte ones, and its two scale codes in one 16-bit load. The slot-loop
probe (scripts/gpu_lane_layout_probe.py) measured 1.005-1.068x for this part alone. Here, on the committed
table's configurations:
1. each 7B shape that the table runs on the tensor-core GEMV at M = 1: format v1 against lane order, graph-replayed
   over 8 rotating random layers, alternated twice, outputs compared bit for bit;
2. the random-layer 7B engine (`gpu_e2e_profile.random_engine`): every linear the step runs on the tensor-core GEMV
   permuted in place to lane order and read with lane=True, against format v1, graph-replayed decode (median of
   3 x 256 tokens after 128) alternated twice; the greedy tokens of both compared.
Writes $OUT/lane-order-step.json."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_e2e_profile import random_engine  # noqa: E402
from gpu_engine_table import step_ms  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels.dispatch import TENSOR_ORDER, choose_config, counter_words, mixed_matmul  # noqa: E402
from kernels.gemv_tc import lane_order  # noqa: E402
from mpq.bench.kernels import ROTATE, _graph_us, random_layer  # noqa: E402
from mpq.runtime.generate import Generator  # noqa: E402
from mpq.runtime.quant_linear import QuantLinear  # noqa: E402

BITS = {"q2": 2, "q4": 4, "s2": 8, "s4": 8}
LANE_PTRS: set[int] = set()  # q2 data pointers of the linears currently in lane order
TC_PTRS: set[int] = set()  # q2 data pointers the step ran on the tensor-core GEMV
_run_tc = dispatch._run_tc


def _run_tc_lane(x, y, ws, gens, counters, tensors, cfg, outliers, fast, skip, keep_tiles, parts=None):
    """dispatch._run_tc, with lane=True for the tensors in lane order (and a record of what ran here)."""
    ptr = tensors[0].data_ptr()
    TC_PTRS.add(ptr)
    if ptr not in LANE_PTRS:
        return _run_tc(x, y, ws, gens, counters, tensors, cfg, outliers, fast, skip, keep_tiles, parts)
    from kernels.gemv_tc import gemv_tc

    return gemv_tc(x, y, ws, counters, *tensors, outliers=outliers, split=cfg.split, unroll=cfg.unroll,
                   prefetch=cfg.prefetch, l2=cfg.l2, xfrag=cfg.xfrag, early4=cfg.early4, gens=gens,
                   gen_early=cfg.gen_early, fast=fast, unrolled=cfg.unrolled,
                   pdl=fast and dispatch.pdl_enabled(x.device), skip=skip, keep_tiles=keep_tiles, parts=parts,
                   lane=True)


def _lane(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(lane_order(t, BITS[n]) if n in BITS else t for n, t in zip(TENSOR_ORDER, tensors))


def kernel_rows() -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for n, k in ((4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008)):
        cfg = choose_config(1, n, k, 128, dev, 1)
        if cfg.kind != "tc":
            print(f"{n}x{k}: the table runs {cfg.kind}, skipped", flush=True)
            continue
        sets = [tuple(getattr(random_layer(n, k, 1, "cuda", seed=s), name) for name in TENSOR_ORDER)
                for s in range(ROTATE)]
        lanes = [_lane(t) for t in sets]
        LANE_PTRS.update(t[0].data_ptr() for t in lanes)
        x = (torch.randn(1, k, device="cuda") * 0.5).half()
        words = counter_words(n, k, 128, 16, 1, dev)
        scratch = [torch.zeros(words, dtype=torch.int32, device="cuda") for _ in range(ROTATE)]
        outs = {}
        for name, ts in (("format v1", sets), ("lane order", lanes)):
            outs[name] = [mixed_matmul(x, t, group_size=128, outliers=1, counters=c, config=cfg)
                          for t, c in zip(ts, scratch)]
        equal = all(torch.equal(a, b) for a, b in zip(outs["format v1"], outs["lane order"]))
        times = {"format v1": [], "lane order": []}
        for _ in range(2):
            for name, ts in (("format v1", sets), ("lane order", lanes)):
                def run(ts=ts):
                    for t, c in zip(ts, scratch):
                        mixed_matmul(x, t, group_size=128, outliers=1, counters=c, config=cfg)
                times[name].append(_graph_us(run))
        row = {"shape": f"{n}x{k}", "config": str(cfg), "us": times, "bit_equal": equal,
               "speedup": statistics.median(times["format v1"]) / statistics.median(times["lane order"])}
        print(f"{n}x{k} {cfg}: v1 {times['format v1']} lane {times['lane order']} us, "
              f"{row['speedup']:.3f}x, equal {equal}", flush=True)
        rows.append(row)
    return rows


def _permute_model(model, inverse: bool) -> int:
    """Every tensor-core linear's codes and scale codes to lane order (or back), in place; returns how many."""
    count = 0
    mods = {}  # one module per buffer (a view of another linear's rows shares its pointer): the largest
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.q2.data_ptr() in TC_PTRS:
            ptr = mod.q2.data_ptr()
            if ptr not in mods or mod.q2.numel() > mods[ptr].q2.numel():
                mods[ptr] = mod
    for mod in mods.values():
        for name, bits in BITS.items():
            buf = getattr(mod, name)
            buf.copy_(lane_order(buf, bits, inverse=inverse))
        if inverse:
            LANE_PTRS.discard(mod.q2.data_ptr())
        else:
            LANE_PTRS.add(mod.q2.data_ptr())
        count += 1
    return count


def engine_rows() -> dict:
    model = random_engine(True)
    model.compile_small_ops()
    prompt = list(range(1, 129))
    TC_PTRS.clear()
    v1_tokens = Generator(model, 384).generate(prompt, 32).tokens
    n_tc = _permute_model(model, inverse=False)
    lane_tokens = Generator(model, 384).generate(prompt, 32).tokens
    _permute_model(model, inverse=True)
    print(f"{n_tc} linears on the tensor-core GEMV; tokens equal: {v1_tokens == lane_tokens}", flush=True)
    times = {"format v1": [], "lane order": []}
    for _ in range(2):
        for name in times:
            if name == "lane order":
                _permute_model(model, inverse=False)
            times[name].append(step_ms(model))
            if name == "lane order":
                _permute_model(model, inverse=True)
            print(f"step {name}: {times[name][-1]:.4f} ms/token", flush=True)
    return {"tc_linears": n_tc, "tokens_equal": v1_tokens == lane_tokens, "ms_per_token": times}


def main() -> None:
    dispatch._run_tc = _run_tc_lane
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT", "unknown"),
              "torch": torch.__version__, "kernels": kernel_rows()}
    LANE_PTRS.clear()
    result["step"] = engine_rows()
    (out / "lane-order-step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
