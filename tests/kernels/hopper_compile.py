"""Compile the kernels' GPU-only paths for sm_90 on a machine without a GPU (run by
tests/kernels/test_compile_for_hopper.py in a process without TRITON_INTERPRET).

The CPU tests run every kernel under the Triton interpreter, which never compiles: it accepts globals the GPU
compiler refuses and never sees the fast paths (inline PTX, PDL, L2 prefetch, fragment-ordered x). Here each case
calls a kernel's launch wrapper with CPU tensors while a stand-in driver names an H100 as the target; Triton
compiles down to a cubin (ptxas included) and a post-compile hook stops the launch. Prints one line per case
(`ok NAME` or `FAIL NAME: error`) and exits 1 if any failed, or if a run of all cases left some kernel of kernels/
uncompiled. `python tests/kernels/hopper_compile.py [NAME ...]`."""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".."), os.path.dirname(__file__)]


class Compiled(Exception):
    """Raised by the post-compile hook: the cubin exists, and there is no GPU to launch it on."""


class HopperTarget:
    """The part of a Triton driver that `JITFunction.run` asks before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _packed(n=64, k=512, group=128, n4=1, outliers=1):
    from conftest import random_packed
    from kernels.dispatch import TENSOR_ORDER

    packed = random_packed(n, k, group, n4, outliers)
    return packed, tuple(getattr(packed, name) for name in TENSOR_ORDER)


def _gemv_tc(m, **kw):
    from kernels.gemv_tc import gemv_tc

    packed, tensors = _packed()
    x, y = torch.randn(m, 512).half(), torch.empty(m, 64, dtype=torch.half)
    split = kw.pop("split", 2)
    gens = kw.pop("gens", False)
    ws = torch.zeros(split * m * 64, dtype=torch.int64) if gens else torch.zeros(split, m, 64)
    cnt = torch.zeros(64, dtype=torch.int32)
    gemv_tc(x, y, ws, cnt, *tensors, outliers=packed.outliers, split=split, gens=cnt if gens else None, fast=True,
            **kw)


def _gemv_tc_ragged(m):
    from conftest import random_packed
    from kernels.dispatch import TENSOR_ORDER
    from kernels.gemv_tc import gemv_tc
    from mpq.quant.format import PackedLinear

    flat, geometry = PackedLinear.ragged_rows([random_packed(n, 512, 128, n4, 1) for n, n4 in [(32, 1), (16, 0),
                                                                                               (16, 3)]])
    x, y, ws = torch.randn(m, 512).half(), torch.empty(m, 64, dtype=torch.half), torch.zeros(2 * m * 64,
                                                                                            dtype=torch.int64)
    cnt = torch.zeros(64, dtype=torch.int32)
    gemv_tc(x, y, ws, cnt, *(flat[n] for n in TENSOR_ORDER), outliers=1, split=2, gens=cnt, fast=True, pdl=True,
            l2=True, early4=True, parts=geometry)


def _gemv_tc_xfrag(m):
    import kernels.gemv_tc as tc

    words = tc.fragment_words(m, 512)
    real, tc.x_fragments = tc.x_fragments, lambda x, pdl=False: torch.zeros(words, dtype=torch.int32)
    try:
        _gemv_tc(m, xfrag=True, pdl=True)
    finally:
        tc.x_fragments = real


def _x_fragments():
    from kernels.gemv_tc import x_fragments

    x_fragments(torch.randn(3, 512).half(), pdl=True)


def _gemv_h2(pairs, **kw):
    from kernels.gemv_h2 import gemv_h2

    packed, tensors = _packed(group=64)
    x, y = torch.randn(1, 512).half(), torch.empty(1, 64, dtype=torch.half)
    gemv_h2(x, y, torch.zeros(2, 1, 64), torch.zeros(64, dtype=torch.int32), *tensors, group_size=64,
            outliers=packed.outliers, rows=8, split=2, num_warps=2, pairs=pairs, fast=True, **kw)


def _gemv_mixed():
    from kernels.gemv_mixed import gemv_mixed

    packed, tensors = _packed()
    gemv_mixed(torch.randn(1, 512).half(), torch.empty(1, 64, dtype=torch.half), torch.zeros(2, 1, 64),
               torch.zeros(64, dtype=torch.int32), *tensors, group_size=128, outliers=1, rows=8, split=2,
               num_warps=1, skip=torch.zeros(1, dtype=torch.int32))


def _gemm(dtype):
    from kernels.gemm_mixed import gemm_mixed

    packed, tensors = _packed()
    gemm_mixed(torch.randn(33, 512).to(dtype), torch.empty(33, 64, dtype=dtype), torch.zeros(2, 33, 64),
               torch.zeros(64 * 3, dtype=torch.int32), *tensors, group_size=128, outliers=1, block_m=16, split=2,
               num_warps=2, num_stages=2)


def _dequantize():
    from kernels.gemm_mixed import dequantize_mixed

    packed, tensors = _packed()
    dequantize_mixed(torch.empty(64, 512, dtype=torch.half), *tensors, group_size=128, outliers=1)


def _norm():
    from kernels.step_ops import add_rms_norm

    x = torch.randn(1, 4096).half()
    add_rms_norm(x, x.clone(), torch.rand(4096).half(), 1e-5, pdl=True, skip=torch.zeros(1, dtype=torch.int32))


def _consumers():
    from kernels.step_ops import add_rms_norm, silu_mul

    pending = torch.randn(1, 4096)
    try:
        add_rms_norm(torch.randn(1, 4096).half(), pending, torch.rand(4096).half(), 1e-5, pdl=True, consume=True)
    except Compiled:
        pass
    silu_mul(pending[:, :2048], pending[:, 2048:], pdl=True, consume=True, dtype=torch.half)


def _gemv_tc_atomic():
    from kernels.gemv_tc import gemv_tc

    packed, tensors = _packed()
    acc = torch.zeros(1, 64)
    gemv_tc(torch.randn(1, 512).half(), acc, acc, acc, *tensors, outliers=packed.outliers, split=4, unroll=2,
            unrolled=True, fast=True, pdl=True, atomic=True)


def _silu():
    from kernels.step_ops import silu_mul

    g = torch.randn(1, 11008).half()
    silu_mul(g, g.clone(), pdl=True, skip=torch.zeros(1, dtype=torch.int32))


def _attention(drop):
    from kernels.decode_attention import decode_attention

    B, H, KV, D, L = 1, 32, 8, 128, 384
    q, k, v = torch.randn(B, 1, H, D).half(), torch.randn(B, 1, KV, D).half(), torch.randn(B, 1, KV, D).half()
    cos = sin = torch.randn(1, D).half()
    decode_attention(q, k, v, cos, sin, torch.zeros(2, B, KV, L, D, dtype=torch.half), torch.tensor([200]),
                     torch.zeros(B * KV, dtype=torch.int32), torch.zeros(L, dtype=torch.half) if drop else None,
                     pdl=True, skip=torch.zeros(1, dtype=torch.int32))


def _predictor(control):
    from kernels.exit_flag import CTL_ACTIVE
    from kernels.exit_predictor import exit_probability

    D, P, H = 4096, 4, 512
    mlp = (torch.randn(P, 12, H), torch.randn(P, H), torch.randn(P, H), torch.randn(P), torch.randn(P, 12),
           torch.rand(P, 12) + 0.5)
    x = torch.randn(D).half()
    ctl = (torch.zeros(int(CTL_ACTIVE) + 32, dtype=torch.int32), torch.full((P,), 0.5), 3) if control else None
    exit_probability(x, torch.rand(D).half(), 1e-5, torch.randn(4, D).half(), torch.zeros(4), torch.zeros(32), 3,
                     mlp, 1, first=False, delta=x.clone(), pdl=True, next_norm=torch.rand(D).half(), control=ctl)


def _exit_head(final):
    from kernels.exit_flag import CTL_ACTIVE
    from kernels.exit_head import exit_head, head_state

    D, V = 4096, 32000
    x = torch.randn(D).half()
    exit_head(x, x.clone(), torch.rand(D).half(), 1e-5, torch.randn(V, D).half(), torch.empty(D, dtype=torch.half),
              torch.arange(4), torch.zeros(int(CTL_ACTIVE) + 32, dtype=torch.int32), head_state(torch.device("cpu")),
              7, final=final, pdl=True, programs=528)


def _draft_top4():
    from kernels.draft_top4 import _draft_top4_kernel

    V, D = 4096, 4096  # the wrapper takes the PyTorch ops for CPU tensors: the kernel is launched directly
    _draft_top4_kernel[(1,)](torch.randn(V).half(), torch.arange(V), torch.randn(32000, D).half(),
                             torch.zeros(4, dtype=torch.long), torch.empty(4, D, dtype=torch.half), V, D, D,
                             BLOCK_V=V, BLOCK_D=1024, num_warps=8)


def _graph_branch():
    from kernels.exit_flag import CTL_ACTIVE
    from kernels.graph_cond import set_branch

    set_branch(5, 1 << 40, torch.zeros(int(CTL_ACTIVE) + 32, dtype=torch.int32))


CASES = {
    "gemv_tc m1 pdl l2 early4 flag": lambda: _gemv_tc(1, pdl=True, l2=True, early4=True,
                                                      skip=torch.zeros(1, dtype=torch.int32), keep_tiles=2),
    "gemv_tc m1 fenceless split": lambda: _gemv_tc(1, split=4, gens=True, gen_early=True, pdl=True),
    "gemv_tc m3 unroll2": lambda: _gemv_tc(3, unroll=2, prefetch=False),
    "gemv_tc m1 unrolled fenceless": lambda: _gemv_tc(1, split=4, gens=True, gen_early=True, pdl=True, unrolled=True,
                                                      unroll=2, skip=torch.zeros(1, dtype=torch.int32)),
    "gemv_tc m16 fragments": lambda: _gemv_tc_xfrag(16),
    "gemv_tc m1 ragged stack": lambda: _gemv_tc_ragged(1),
    "gemv_tc m1 atomic unrolled": _gemv_tc_atomic,
    "x_fragments": _x_fragments,
    "gemv_h2 pairs1 early4 flag": lambda: _gemv_h2(1, early4=True, pdl=True, skip=torch.zeros(1, dtype=torch.int32)),
    "gemv_h2 pairs2": lambda: _gemv_h2(2),
    "gemv_mixed flag": _gemv_mixed,
    "gemm fp16": lambda: _gemm(torch.float16),
    "gemm bf16": lambda: _gemm(torch.bfloat16),
    "dequantize": _dequantize,
    "add_rms_norm": _norm,
    "silu_mul": _silu,
    "add_rms_norm and silu_mul consuming pending sums": _consumers,
    "decode_attention fill": lambda: _attention(False),
    "decode_attention drop": lambda: _attention(True),
    "exit_probability": lambda: _predictor(False),
    "exit_probability control": lambda: _predictor(True),
    "exit_head": lambda: _exit_head(False),
    "exit_head final": lambda: _exit_head(True),
    "draft_top4": _draft_top4,
    "graph branch setter": _graph_branch,
}


def all_kernels() -> set[str]:
    """`module.name` of every launchable kernel in kernels/ (by the house convention, a `_..._kernel` function)."""
    import importlib
    import pkgutil

    import kernels

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        found |= {f"{module.__name__}.{name}" for name, obj in vars(module).items()
                  if name.endswith("_kernel") and hasattr(obj, "arg_names") and obj.fn.__module__ == module.__name__}
    return found


def main(names: list[str]) -> int:
    compiled = set()

    def stop(*args, fn, **kwargs):
        compiled.add(f"{fn.module}.{fn.name}")
        raise Compiled()

    driver.set_active(HopperTarget())
    knobs.runtime.jit_post_compile_hook = stop
    failed = 0
    for name in names or CASES:
        try:
            CASES[name]()
            print(f"FAIL {name}: launched no kernel", flush=True)
            failed += 1
        except Compiled:
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"FAIL {name}: {type(e).__name__}: {first[:300]}", flush=True)
            failed += 1
    missing = sorted(all_kernels() - compiled) if not names else []
    if missing:  # a new kernel needs a case here, or it is only ever checked by the interpreter
        print(f"FAIL coverage: no case compiles {', '.join(missing)}", flush=True)
        failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
