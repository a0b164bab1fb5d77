"""Probe (GPU, run by hand): CUDA-graph IF nodes built through the driver API under a torch capture, for the
one-graph exit step (mpq/specee/flag_decode.py), whose skipped layers still cost their launches (~half a layer,
benchmarks/e2e-notes.md run 20). torch 2.11 has no CUDAGraph.begin_capture_to_if_node, so: the condition setter is
compiled by NVRTC (it calls cudaGraphSetConditional, which the driver resolves at module load), the node is added
with cuGraphAddNode and its body captured with cuStreamBeginCaptureToGraph on a second stream.

What it answers: does each step work on this driver/torch; do PDL-launched Triton kernels run inside a body; can
a Triton kernel set the condition; can bodies allocate (into the graph's pool); what an IF level costs at full
depth; what an exit saves against flag-skipped kernels. Writes JSON to argv[1]; argv[2], optional: the variants
to run, comma-separated (plain_nvrtc, pdl_nvrtc, pdl_triton, pdl_triton_alloc), one process each is safest:
  for v in plain_nvrtc pdl_nvrtc pdl_triton pdl_triton_alloc; do python3 scripts/probe_graph_if.py $OUT/$v.json $v; done
Run on an H100 at f6173cb: benchmarks/results/graph-if-nodes-h100-2026-11-27.json. Everything but the allocating
variant worked; that one routes the bodies to the capture's own pool, which torch 2.11 refuses (the decoder's
bodies have a pool of their own: mpq/runtime/graph_if.py)."""

import ctypes
import glob
import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl

CU = ctypes.CDLL("libcuda.so.1")
SETTER = r"""
extern "C" __device__ void cudaGraphSetConditional(unsigned long long handle, unsigned int value);
extern "C" __global__ void mpq_set_if(unsigned long long handle, const int* stop, int index) {
    cudaGraphSetConditional(handle, stop[index] == 0 ? 1u : 0u);
}
"""
DRV: dict = {}
IF_NODE, NODE_CONDITIONAL, ASSIGN_DEFAULT, SET_DEPS, THREAD_LOCAL = 0, 13, 1, 1, 1


P, U64, SZ, VP = ctypes.POINTER, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
PROTOS = {  # the driver entry points as of CUDA 12.4 (edge-data forms), fetched by cuGetProcAddress
    "cuStreamGetCaptureInfo": (VP, P(ctypes.c_int), P(U64), P(VP), P(P(VP)), P(VP), P(SZ)),
    "cuGraphAddNode": (P(VP), VP, P(VP), VP, SZ, VP),
    "cuStreamUpdateCaptureDependencies": (VP, P(VP), VP, SZ, ctypes.c_uint),
    "cuGraphConditionalHandleCreate": (P(U64), VP, VP, ctypes.c_uint, ctypes.c_uint),
    "cuStreamBeginCaptureToGraph": (VP, VP, VP, VP, SZ, ctypes.c_int),
}


def proc(name: str):
    fn = VP()
    status = ctypes.c_int()
    check(CU.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), 12040, U64(0), ctypes.byref(status)),
          f"cuGetProcAddress({name})")
    if not fn.value:
        raise RuntimeError(f"{name}: not found (status {status.value})")
    return ctypes.CFUNCTYPE(ctypes.c_int, *PROTOS[name])(fn.value)


def check(res, what):
    if res != 0:
        name = ctypes.c_char_p()
        CU.cuGetErrorName(res, ctypes.byref(name))
        raise RuntimeError(f"{what}: {res} {name.value}")


def nvrtc():
    names = [f"libnvrtc.so.{torch.version.cuda.split('.')[0]}", "libnvrtc.so"]
    root = os.path.dirname(os.path.dirname(torch.__file__))
    names += glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True)
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    raise OSError("no libnvrtc")


def _nvrtc_ptx(arch: int, extra: list[bytes]) -> bytes:
    nv = nvrtc()
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), SETTER.encode(), b"set_if.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture=compute_{arch}".encode()] + extra
    res = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetProgramLog(prog, log)
    if res != 0:
        raise RuntimeError(f"nvrtc {extra} {res}: {log.value.decode(errors='replace')}")
    nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetPTX(prog, ptx)
    return ptx.value


def compile_setter(arch: int):
    """The setter as PTX (whole program; if NVRTC refuses the undefined extern there, relocatable), loaded by the
    driver, which resolves cudaGraphSetConditional."""
    errors = []
    for extra in ([], [b"-rdc=true"]):
        try:
            ptx = _nvrtc_ptx(arch, extra)
            module, func = ctypes.c_void_p(), ctypes.c_void_p()
            check(CU.cuModuleLoadData(ctypes.byref(module), ptx), "cuModuleLoadData")
            check(CU.cuModuleGetFunction(ctypes.byref(func), module, b"mpq_set_if"), "cuModuleGetFunction")
            return func, ptx.decode(errors="replace"), errors
        except Exception as e:  # noqa: BLE001 - the probe reports every way that failed
            errors.append(f"{type(e).__name__}: {e}"[:600])
    raise RuntimeError(" || ".join(errors))


class CondParams(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_uint64), ("type", ctypes.c_int), ("size", ctypes.c_uint),
                ("phGraph_out", ctypes.POINTER(ctypes.c_void_p)), ("ctx", ctypes.c_void_p)]


class NodeParams(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("reserved0", ctypes.c_int * 3), ("u", ctypes.c_longlong * 29),
                ("reserved2", ctypes.c_longlong)]


def capture_info(stream: int):
    status, cid, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, n = ctypes.POINTER(ctypes.c_void_p)(), ctypes.c_size_t()
    edges = ctypes.c_void_p()
    check(DRV["cuStreamGetCaptureInfo"](VP(stream), ctypes.byref(status), ctypes.byref(cid), ctypes.byref(graph),
                                        ctypes.byref(deps), ctypes.byref(edges), ctypes.byref(n)),
          "cuStreamGetCaptureInfo")
    return status.value, graph, deps, n.value


class IfScope:
    """`with IfScope(setter, stop, index):` inside a torch CUDA-graph capture: the code in the block becomes the
    body of an IF node taken when stop[index] == 0 at that point of the replay."""
    bodies: list = []

    def __init__(self, setter, stop: torch.Tensor, index: int, pool=None):
        self.setter, self.stop, self.index, self.pool = setter, stop, index, pool

    def __enter__(self):
        main = torch.cuda.current_stream()
        s = main.cuda_stream
        status, graph, _, _ = capture_info(s)
        assert status == 1, "not capturing"
        ctx = ctypes.c_void_p()
        check(CU.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        handle = ctypes.c_uint64()
        check(DRV["cuGraphConditionalHandleCreate"](ctypes.byref(handle), graph, ctx, 0, ASSIGN_DEFAULT),
              "cuGraphConditionalHandleCreate")
        if self.setter == "triton":
            triton_setter(handle.value, self.stop, self.index)
        else:
            args = [ctypes.c_uint64(handle.value), ctypes.c_void_p(self.stop.data_ptr()), ctypes.c_int(self.index)]
            argv = (ctypes.c_void_p * 3)(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
            check(CU.cuLaunchKernel(self.setter, 1, 1, 1, 1, 1, 1, 0, ctypes.c_void_p(s), argv, None),
                  "cuLaunchKernel")
        _, graph, deps, n = capture_info(s)
        cond = CondParams(handle=handle.value, type=IF_NODE, size=1, ctx=ctx)
        params = NodeParams(type=NODE_CONDITIONAL)
        ctypes.memmove(ctypes.addressof(params.u), ctypes.addressof(cond), ctypes.sizeof(cond))
        node = ctypes.c_void_p()
        check(DRV["cuGraphAddNode"](ctypes.byref(node), graph, deps, None, n, ctypes.addressof(params)),
              "cuGraphAddNode")
        ctypes.memmove(ctypes.addressof(cond), ctypes.addressof(params.u), ctypes.sizeof(cond))
        body = ctypes.c_void_p(cond.phGraph_out[0])
        check(DRV["cuStreamUpdateCaptureDependencies"](VP(s), ctypes.byref(node), None, 1, SET_DEPS),
              "cuStreamUpdateCaptureDependencies")
        self.side = torch.cuda.Stream()
        check(DRV["cuStreamBeginCaptureToGraph"](VP(self.side.cuda_stream), body, None, None, 0, THREAD_LOCAL),
              "cuStreamBeginCaptureToGraph")
        self.ctx = torch.cuda.stream(self.side)
        self.ctx.__enter__()
        # the body's temporaries go to the outer graph's pool (its capture id is not the outer capture's)
        self.pool_ctx = torch.cuda.use_mem_pool(self.pool) if self.pool is not None else None
        if self.pool_ctx is not None:
            self.pool_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.pool_ctx is not None:
            self.pool_ctx.__exit__(*exc)
        self.ctx.__exit__(*exc)
        g = ctypes.c_void_p()
        check(CU.cuStreamEndCapture(ctypes.c_void_p(self.side.cuda_stream), ctypes.byref(g)), "cuStreamEndCapture")
        IfScope.bodies.append(self.side)  # the stream outlives the capture
        return False


@triton.jit
def _bump(x_ptr, y_ptr, skip_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr, SKIP: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if SKIP:
        if tl.load(skip_ptr, volatile=True) != 0:
            return
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=ok) * 0.5 + 1.0, mask=ok)


# The same setter as a Triton kernel: cudaGraphSetConditional declared in a textual LLVM library that Triton links
# (ptxas knows the builtin; checked on the CPU: the cubin builds), so that an exit head could set it itself.
SET_CONDITIONAL_LL = """target triple = "nvptx64-nvidia-cuda"
declare void @cudaGraphSetConditional(i64, i32)
define i32 @mpq_graph_set_conditional(i64 %handle, i32 %value) {
  call void @cudaGraphSetConditional(i64 %handle, i32 %value)
  ret i32 0
}
"""
LL_PATH = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mpq_graph_set_conditional.ll")


@tl.core.extern
def _set_conditional(handle, value, _semantic=None):
    return tl.core.extern_elementwise(
        "graphcond", LL_PATH, [handle, value],
        {(tl.core.dtype("uint64"), tl.core.dtype("uint32")): ("mpq_graph_set_conditional", tl.core.dtype("int32"))},
        is_pure=False, _semantic=_semantic)


@triton.jit(do_not_specialize=["handle", "index"])
def _triton_set_if(handle, stop_ptr, index):
    _set_conditional(handle.to(tl.uint64), (tl.load(stop_ptr + index) == 0).to(tl.uint32))


def triton_setter(handle: int, stop: torch.Tensor, index: int) -> None:
    _triton_set_if[(1,)](handle, stop, index, num_warps=1, extern_libs={"graphcond": LL_PATH})


L, K, N, GRID = 32, 8, 1 << 16, 256
CAND = [0, 2, 5, 6, 9, 13, 17, 21, 26, 28, 29]


def main(out_path, chosen):
    res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
           "has_if_api": hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")}
    dev = torch.device("cuda")
    bufs = [torch.randn(N, device=dev) for _ in range(2)]
    skip = torch.zeros(L, dtype=torch.int32, device=dev)
    stop = torch.zeros(len(CAND), dtype=torch.int32, device=dev)
    count = torch.zeros(L, dtype=torch.int32, device=dev)

    def layer(i, pdl, flag, alloc=False):
        for k in range(K):
            _bump[(GRID,)](bufs[k % 2], bufs[1 - k % 2], skip[i:i + 1], N, BLOCK=N // GRID, PDL=pdl, SKIP=flag,
                           **({"launch_pdl": True} if pdl else {}))
        if alloc:  # a temporary, as the decoder's ops make
            t = count[i:i + 1] * 2
            count[i:i + 1].copy_(t - count[i:i + 1] + 1)
        else:
            count[i:i + 1].add_(1)

    def flat(n, pdl, flag):
        for i in range(n):
            layer(i, pdl, flag)

    def nested(pdl, setter, pool=None):
        scopes = []
        for i in range(L):
            layer(i, pdl, False, alloc=pool is not None)
            if i in CAND:
                scopes.append(IfScope(setter, stop, CAND.index(i), pool))
                scopes[-1].__enter__()
        for s in reversed(scopes):
            s.__exit__(None, None, None)
        if pool is not None:  # and after the bodies, on the capture's own stream (the decoder's draft allocates there)
            count.copy_(count * 1)

    def capture(fn, pool=None):
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local", pool=None if pool is None else pool.id):
            fn()
        return g

    def timeit(g, n=100):
        g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = []
        for _ in range(3):
            a.record()
            for _ in range(n):
                g.replay()
            b.record()
            b.synchronize()
            best.append(a.elapsed_time(b) / n * 1000)
        return min(best)

    def layers_run(g):
        count.zero_()
        g.replay()
        torch.cuda.synchronize()
        return int((count > 0).sum())

    for pdl in (False, True):
        flat(L, pdl, True)  # compile outside any capture
        flat(L, pdl, False)
    torch.cuda.synchronize()
    try:
        global DRV
        DRV = {name: proc(name) for name in PROTOS}
        setter, ptx, res["setter_tries_failed"] = compile_setter(torch.cuda.get_device_capability()[0] * 10)
        res["setter_ptx_calls"] = [ln.strip() for ln in ptx.splitlines() if "cudaGraphSetConditional" in ln][:4]
    except Exception as e:
        res["setter_error"] = f"{type(e).__name__}: {e}"[:1500]
        json.dump(res, open(out_path, "w"), indent=1)
        print(json.dumps(res, indent=1))
        return
    with open(LL_PATH, "w") as f:
        f.write(SET_CONDITIONAL_LL)
    try:  # compiled and loaded outside any capture, never run there (no handle to set outside a graph launch)
        for h in (5, 1 << 40, (1 << 63) + 5):  # an int argument is typed i32, i64 or u64 by its value
            compiled = _triton_set_if.warmup(h, stop, 3, grid=(1,), num_warps=1, extern_libs={"graphcond": LL_PATH})
            compiled._init_handles()
        res["triton_setter"] = "compiled and loaded"
    except Exception as e:  # noqa: BLE001
        res["triton_setter_error"] = f"{type(e).__name__}: {e}"[:1500]
    variants = {"plain_nvrtc": (False, "nvrtc", False), "pdl_nvrtc": (True, "nvrtc", False),
                "pdl_triton": (True, "triton", False), "pdl_triton_alloc": (True, "triton", True)}
    for tag in chosen or variants:
        pdl, which, alloc = variants[tag]
        if which == "triton" and "triton_setter_error" in res:
            continue
        if_setter = "triton" if which == "triton" else setter
        pool = torch.cuda.MemPool() if alloc else None
        g_all, g_22, g_flag = (capture(lambda: flat(L, pdl, False)), capture(lambda: flat(22, pdl, False)),
                               capture(lambda: flat(L, pdl, True)))
        res[f"{tag}_flat_all_us"] = timeit(g_all)
        res[f"{tag}_flat_22_us"] = timeit(g_22)
        skip[22:] = 1
        res[f"{tag}_flag_exit21_us"] = timeit(g_flag)
        skip.zero_()
        try:
            g_if = capture(lambda: nested(pdl, if_setter, pool), pool)
            stop.zero_()
            res[f"{tag}_if_all_us"] = timeit(g_if)
            res[f"{tag}_if_all_layers"] = layers_run(g_if)
            stop[CAND.index(21)] = 1
            res[f"{tag}_if_exit21_us"] = timeit(g_if)
            res[f"{tag}_if_exit21_layers"] = layers_run(g_if)
            stop.fill_(1)
            res[f"{tag}_if_exit0_us"] = timeit(g_if)
            res[f"{tag}_if_exit0_layers"] = layers_run(g_if)
            stop.zero_()
        except Exception as e:
            res[f"{tag}_if_error"] = f"{type(e).__name__}: {e}"[:1500] + " | " + traceback.format_exc()[-800:]
    json.dump(res, open(out_path, "w"), indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else [])
