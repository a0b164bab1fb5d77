"""Temporary probe: CUDA-graph IF nodes (torch's begin_capture_to_if_node) against flag-skipped kernels, for the
one-graph exit step. 32 'layers' of 8 PDL-launched norm kernels each; exits possible after CAND layers."""
import json, sys
import torch
from kernels.step_ops import add_rms_norm

print(torch.__version__, torch.version.cuda, hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"), flush=True)
dev = torch.device("cuda")
L, K, D = 32, 8, 4096
CAND = [0, 2, 5, 6, 9, 13, 17, 21, 26, 28, 29]
w = torch.rand(D, device=dev, dtype=torch.float16) + 0.5
x0 = torch.randn(D, device=dev, dtype=torch.float16)
skip = torch.zeros(L, dtype=torch.int32, device=dev)
conts = torch.ones(len(CAND), dtype=torch.bool, device=dev)
count = torch.zeros(1, dtype=torch.int32, device=dev)
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}


def layer(x, i, flag):
    for _ in range(K):
        x, _h = add_rms_norm(x.view(1, D), None, w, 1e-5, pdl=True, skip=skip[i:i + 1] if flag else None)
    count.add_(1)
    return x


def flat(n, flag):
    x = x0
    for i in range(n):
        x = layer(x, i, flag)


def nested():
    x = x0
    g = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    depth = 0
    for i in range(L):
        x = layer(x, i, False)
        if i in CAND:
            g.begin_capture_to_if_node(conts[CAND.index(i):CAND.index(i) + 1])
            depth += 1
    for _ in range(depth):
        g.end_capture_to_conditional_node()


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        if fn is not nested:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def timeit(g, n=200):
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


def counted(g):
    count.zero_()
    g.replay()
    torch.cuda.synchronize()
    return int(count.item())


with torch.inference_mode():
    g_all = capture(lambda: flat(L, False))
    g_22 = capture(lambda: flat(22, False))
    g_flag = capture(lambda: flat(L, True))
    res["flat_all_us"] = timeit(g_all)
    res["flat_22_us"] = timeit(g_22)
    res["flag_clear_us"] = timeit(g_flag)
    skip[22:] = 1
    res["flag_exit21_us"] = timeit(g_flag)
    skip.zero_()
    try:
        g_if = capture(nested)
        res["if_all_us"] = timeit(g_if)
        res["if_all_count"] = counted(g_if)
        conts[CAND.index(21)] = False
        res["if_exit21_us"] = timeit(g_if)
        res["if_exit21_count"] = counted(g_if)
        conts.fill_(False)
        res["if_exit0_us"] = timeit(g_if)
        res["if_exit0_count"] = counted(g_if)
    except Exception as e:
        res["if_error"] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
