"""Probe (GPU, temporary): x in fragment order written by the step's own norm and SwiGLU kernels (no x_fragments
launch), read by the q/k/v, gate/up and down GEMVs, in the decode step of the random-layer 7B engine against the
committed table; alternated twice. The producers' copies reach the GEMV through a one-entry hand-off keyed by the
plain output's address (probe only: set by the producer, taken by the next GEMV that reads that address).
Writes $OUT/xfrag-step.json."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_engine_table import _facts, _room_for_any_split, step_ms  # noqa: E402
from gpu_e2e_profile import random_engine  # noqa: E402
from kernels import dispatch, step_ops  # noqa: E402

HANDOFF: dict = {}  # {"ptr": address of the plain output, "frag": its fragment-ordered copy}
WRITE = [False]
_norm, _silu, _gemv = step_ops.add_rms_norm, step_ops.silu_mul, dispatch.gemv_tc


def norm(*args, **kw):
    if not WRITE[0]:
        return _norm(*args, **kw)
    x, h, hf = _norm(*args, fragments=True, **kw)
    HANDOFF.update(ptr=h.data_ptr(), frag=hf)
    return x, h


def silu(*args, **kw):
    if not WRITE[0]:
        return _silu(*args, **kw)
    y, yf = _silu(*args, fragments=True, **kw)
    HANDOFF.update(ptr=y.data_ptr(), frag=yf)
    return y


CHECKS: list | None = None  # while a list: each GEMV that reads a handed-in copy is also run plainly, compared


def gemv(x, y, *args, **kw):
    frag = HANDOFF.pop("frag", None) if HANDOFF.get("ptr") == x.data_ptr() else None
    HANDOFF.pop("ptr", None) if frag is not None else None
    out = _gemv(x, y, *args, **{**kw, "x_frag": frag})
    if CHECKS is not None and frag is not None and kw.get("xfrag"):
        plain = _gemv(x, torch.empty_like(y), *args, **{**kw, "xfrag": False})
        both = out.isfinite() & plain.isfinite()
        assert torch.equal(out.isfinite(), plain.isfinite())
        CHECKS.append(float((out[both].float() - plain[both].float()).norm() / plain[both].float().norm()))
    return out


def variants(table: dict) -> dict:
    qkv, gu, down = (1, 12288, 4096, 128, True), (1, 22016, 4096, 128, True), (1, 4096, 11008, 128, True)
    rep = dataclasses.replace
    tc = dispatch.KernelConfig("tc", split=4)
    v = {
        "committed": (False, {}),
        "committed, producers write fragments": (True, {}),
        "qkv: tc split 4 xfrag unrolled": (True, {qkv: rep(tc, xfrag=True, unrolled=True)}),
        "qkv: tc split 4 unroll 2 xfrag unrolled": (True, {qkv: rep(tc, unroll=2, xfrag=True, unrolled=True)}),
        "gate/up: committed + xfrag": (True, {gu: rep(table[gu], xfrag=True)}),
        "down: committed + xfrag": (True, {down: rep(table[down], xfrag=True)}),
        "down: committed + xfrag unrolled": (True, {down: rep(table[down], xfrag=True, unrolled=True)}),
    }
    v["all three"] = (True, {**v["qkv: tc split 4 xfrag unrolled"][1], **v["gate/up: committed + xfrag"][1],
                             **v["down: committed + xfrag"][1]})
    return v


def first_layer(model) -> None:
    """Decoder layer 0 for one token at position 0, eager: every GEMV the variants change runs there."""
    model.setup_caches(64)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    x = torch.nn.functional.embedding(torch.tensor([[7]], device="cuda"), model.embed)
    model.blocks(x, None, 0, 1, pos, model.rope_cos[pos], model.rope_sin[pos], model.causal[pos].view(1, 1, 1, -1),
                 model.ops)


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    step_ops.add_rms_norm, step_ops.silu_mul, dispatch.gemv_tc = norm, silu, gemv
    sm_count, table = dispatch._device_facts(torch.device("cuda"))
    table = dict(table)
    model = random_engine(True)
    model.compile_small_ops()
    _room_for_any_split(model)
    cases = variants(table)
    times = {name: [] for name in cases}
    global CHECKS
    errors = {}
    for name, (write, patch) in cases.items():  # each GEMV fed a producer's copy against the same GEMV fed plain x
        WRITE[0] = write
        HANDOFF.clear()
        CHECKS = []
        dispatch._device_facts = _facts(sm_count, {**table, **patch})
        first_layer(model)
        errors[name] = CHECKS
        print(f"{name:45s} GEMVs on handed-in copies: {len(CHECKS)}, rel. errors {CHECKS}", flush=True)
        assert all(e < 1e-2 for e in CHECKS) and len(CHECKS) == len(patch), name
    CHECKS = None
    for _ in range(2):
        for name, (write, patch) in cases.items():
            WRITE[0] = write
            HANDOFF.clear()
            dispatch._device_facts = _facts(sm_count, {**table, **patch})
            times[name].append(step_ms(model))
            print(f"{name:45s} {times[name][-1]:.4f} ms/token", flush=True)
    res = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("MPQ_COMMIT"),
           "handed_in_vs_plain_rel_error": errors, "ms_per_token": times, "mean": {k: statistics.mean(v) for k, v in times.items()},
           "variants": {k: {"producers_write_fragments": w, "rows": {str(kk): dataclasses.asdict(c)
                                                                      for kk, c in p.items()}}
                        for k, (w, p) in cases.items()}}
    (out / "xfrag-step.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["mean"], indent=1))


if __name__ == "__main__":
    main()
