"""`mpq bench kernels`: the format-v1 kernels against fp16 cuBLAS, the built-in int4 kernel and a plain copy.

Timing is CUDA-graph replay (`triton.testing.do_bench_cudagraph`, median) of ROTATE calls on distinct weight
copies (together larger than the 50 MB L2), divided by ROTATE. Bandwidth is on the bytes each impl must read
(format v1: PackedLinear.stored_bytes()); the copy row moves its bytes twice (read + write).
"""

from __future__ import annotations

import json
import pathlib

import torch

from mpq.quant.format import PackedLinear, bits_per_weight

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # N x K (out x in), Llama-2-7B
MS = (1, 4, 16, 2048)
ROTATE = 8
GROUP_SIZE = 128
TARGET_BITS = 2.9  # all-in bits/weight of the benchmarked mix (the paper's 2.91), with one outlier per 2-bit group


def realistic_n4(n: int, k: int, group_size: int = GROUP_SIZE) -> int:
    """4-bit tiles per row tile that bring the layer closest to TARGET_BITS (about a third of the tiles)."""
    return min(range(k // group_size + 1), key=lambda n4: abs(bits_per_weight(n, k, group_size, 16, n4, 1) - TARGET_BITS))


def random_layer(n: int, k: int, outliers: int, device, group_size: int = GROUP_SIZE, seed: int = 0,
                 n4: int | None = None) -> PackedLinear:
    """A layer with random bits in every field (valid tile map, in-range offsets), built directly on the device;
    n4: 4-bit tiles per row tile (default: the real mix's, `realistic_n4`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rt, g = n // 16, k // group_size
    n4 = realistic_n4(n, k, group_size) if n4 is None else n4
    order = torch.rand(rt, g, generator=gen, device=device).argsort(dim=1).to(torch.int16)
    r16 = lambda lo, hi, *shape, dt: torch.randint(lo, hi, shape, generator=gen, device=device, dtype=dt)  # noqa: E731
    return PackedLinear(
        out_features=n, in_features=k, group_size=group_size, tile_rows=16, n4=n4, outliers=outliers,
        q2=r16(-2**31, 2**31 - 1, rt, g - n4, 16, group_size // 16, dt=torch.int32),
        q4=r16(-2**31, 2**31 - 1, rt, n4, 16, group_size // 8, dt=torch.int32),
        s2=r16(1, 256, rt, g - n4, 16, dt=torch.uint8), z2=r16(0, 256, rt, g - n4, 4, dt=torch.uint8),
        s4=r16(1, 256, rt, n4, 16, dt=torch.uint8), z4=r16(0, 256, rt, n4, 8, dt=torch.uint8),
        ss2=(torch.rand(n, generator=gen, device=device) * 1e-3 + 1e-3).half(),
        ss4=(torch.rand(n, generator=gen, device=device) * 1e-4 + 1e-4).half(),
        idx2=order[:, : g - n4].contiguous(), idx4=order[:, g - n4:].contiguous(),
        ov=torch.randn(rt, g - n4, 16, outliers, generator=gen, device=device).half(),
        oi=r16(0, group_size, rt, g - n4, 16, outliers, dt=torch.uint8),
    )


def _graph_us(fn) -> float:
    """Median graph-replay time of one call, in microseconds (fn makes ROTATE calls)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1000.0 / ROTATE


def _mpq_fn(n, k, m, outliers, x):
    from mpq.runtime.quant_linear import QuantLinear

    layers = [QuantLinear(random_layer(n, k, outliers, "cuda", seed=i)) for i in range(ROTATE)]
    return (lambda: [layer(x) for layer in layers]), layers[0].packed().stored_bytes()


def _fp16_fn(n, k, m, x):
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ROTATE)]
    return (lambda: [torch.matmul(x, w.t()) for w in ws]), n * k * 2


def _int4_fn(n, k, m, x):
    """torch's built-in int4 weight-only kernel (group 128, bf16 activations)."""
    xb = x.to(torch.bfloat16)
    packs = []
    for _ in range(ROTATE):
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packs.append(torch._convert_weight_to_int4pack(w, 8))
    sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
    fn = lambda: [torch._weight_int4pack_mm(xb, p, 128, sz) for p in packs]  # noqa: E731
    return fn, packs[0].numel() * packs[0].element_size() + sz.numel() * 2


def _copy_fn(nbytes):
    src = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(ROTATE)]
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return (lambda: [dst.copy_(s) for s in src]), nbytes


def _row(shape, m, impl, fn_bytes, notes):
    try:
        fn, nbytes = fn_bytes()
        us = _graph_us(fn)
    except Exception as e:  # a baseline this torch build lacks is reported, not fatal
        notes.append(f"{impl} {shape} m={m}: skipped ({type(e).__name__}: {str(e)[:120]})")
        return None
    finally:
        torch.cuda.empty_cache()
    moved = 2 * nbytes if impl == "copy" else nbytes
    return {"shape": shape, "m": m, "impl": impl, "us": round(us, 3), "stored_bytes": nbytes,
            "tb_per_s": round(moved / us / 1e6, 3)}


def bench_kernels(json_out: pathlib.Path | None = None, shapes=SHAPES, ms=MS) -> dict:
    """Time every impl on every (shape, M); print a rich table; return (and optionally write) the JSON."""
    if not torch.cuda.is_available():
        raise RuntimeError("mpq bench kernels needs a CUDA device")
    rows, notes = [], []
    for n, k in shapes:
        shape = f"{n}x{k}"
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            impls = {
                "mpq": lambda: _mpq_fn(n, k, m, 1, x),
                "mpq_no_outliers": lambda: _mpq_fn(n, k, m, 0, x),
                "fp16": lambda: _fp16_fn(n, k, m, x),
                "int4_builtin": lambda: _int4_fn(n, k, m, x),
            }
            for impl, make in impls.items():
                row = _row(shape, m, impl, make, notes)
                rows += [row] if row else []
            nbytes = next(r["stored_bytes"] for r in rows if r["shape"] == shape and r["impl"] == "mpq")
            row = _row(shape, m, "copy", lambda: _copy_fn(nbytes), notes)
            rows += [row] if row else []
            if json_out is not None:  # partial results survive a run cut short
                json_out.write_text(json.dumps(_result(rows, notes, shapes), indent=1))
    result = _result(rows, notes, shapes)
    print_table(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    return result


def _result(rows: list[dict], notes: list[str], shapes) -> dict:
    from mpq.versions import environment

    return {
        **environment(),
        "timing": f"do_bench_cudagraph median, {ROTATE} rotating weight copies",
        "layout": {f"{n}x{k}": {"n4": realistic_n4(n, k), "groups": k // GROUP_SIZE,
                                "bits_per_weight": round(bits_per_weight(n, k, GROUP_SIZE, 16, realistic_n4(n, k), 1), 3)}
                   for n, k in shapes},
        "rows": rows, "notes": notes,
    }


def ratios(rows: list[dict], shape: str, m: int) -> dict:
    """The target ratios of one (shape, M): speed-ups of mpq, its share of copy bandwidth, the outlier cost."""
    us = {r["impl"]: r for r in rows if r["shape"] == shape and r["m"] == m}
    out = {}
    if "mpq" in us:
        mpq = us["mpq"]
        for base in ("fp16", "int4_builtin"):
            if base in us:
                out[f"x_vs_{base}"] = round(us[base]["us"] / mpq["us"], 2)
        if "copy" in us:
            out["pct_copy_bw"] = round(100 * mpq["tb_per_s"] / us["copy"]["tb_per_s"], 1)
        if "mpq_no_outliers" in us:
            out["outlier_cost_pct"] = round(100 * (mpq["us"] / us["mpq_no_outliers"]["us"] - 1), 1)
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"format-v1 kernels, {result['device']} (graph-timed, us)")
    impls = ("mpq", "mpq_no_outliers", "fp16", "int4_builtin", "copy")
    for col in ("shape", "M", *impls, "mpq TB/s", "% copy BW", "x fp16", "x int4", "outliers"):
        table.add_column(col, justify="right")
    keys = dict.fromkeys((r["shape"], r["m"]) for r in result["rows"])
    for shape, m in keys:
        us = {r["impl"]: r for r in result["rows"] if r["shape"] == shape and r["m"] == m}
        rt = ratios(result["rows"], shape, m)
        cell = lambda key, fmt="{}": fmt.format(rt[key]) if key in rt else "-"  # noqa: E731
        table.add_row(shape, str(m), *(f"{us[i]['us']:.1f}" if i in us else "-" for i in impls),
                      f"{us['mpq']['tb_per_s']:.2f}" if "mpq" in us else "-", cell("pct_copy_bw", "{}%"),
                      cell("x_vs_fp16"), cell("x_vs_int4_builtin"), cell("outlier_cost_pct", "{:+}%"))
    console = Console(width=160)
    console.print(table)
    for note in result["notes"]:
        console.print(f"[yellow]{note}")
