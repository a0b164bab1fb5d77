"""Probe (temporary): does this torch expose CUDA-graph IF nodes, and what does a skipped layer cost in one?

Usage: PYTHONPATH=. python3 scripts/gpu_cond_probe.py OUT_DIR
"""

import json
import sys
import traceback

import torch

out_dir = sys.argv[1]
res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}
G = torch.cuda.CUDAGraph
res["graph_methods"] = [a for a in dir(G) if not a.startswith("_")]
res["has_if_node"] = hasattr(G, "begin_capture_to_if_node")


def save():
    with open(f"{out_dir}/cond-probe.json", "w") as f:
        json.dump(res, f, indent=1)


save()
if not res["has_if_node"]:
    print(json.dumps(res, indent=1))
    sys.exit(0)

from torch._higher_order_ops.cudagraph_conditional_nodes import _if_body  # noqa: E402

from kernels.step_ops import add_rms_norm  # noqa: E402

dev = torch.device("cuda")
D, L = 4096, 32
torch.manual_seed(0)
ws = [torch.randn(3 * D, D, device=dev, dtype=torch.float16) * 0.01 for _ in range(L)]  # ~100 MB each: > L2
norm_w = torch.ones(D, device=dev, dtype=torch.float16)
x0 = torch.randn(1, D, device=dev, dtype=torch.float16)
x = x0.clone()
go = torch.ones(L, dtype=torch.bool, device=dev)  # go[i]: run layer i


def layer(i, pdl):
    global x
    xn, h = add_rms_norm(x, None, norm_w, 1e-5, pdl=pdl)
    y = torch.nn.functional.linear(h, ws[i])[:, :D]
    x.copy_(xn + y)


def build(mode, pdl):
    def body():
        for i in range(L):
            if mode == "plain":
                layer(i, pdl)
            else:
                with _if_body(go[i]):
                    layer(i, pdl)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(L):
            layer(i, pdl)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return g


def timed(g, reps=50):
    g.replay()
    torch.cuda.synchronize()
    b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    b.record()
    for _ in range(reps):
        g.replay()
    e.record()
    e.synchronize()
    return b.elapsed_time(e) / reps


for pdl in (False, True):
    try:
        plain = build("plain", pdl)
        cond = build("if", pdl)
        row = {"pdl": pdl, "plain_ms": timed(plain)}
        go.fill_(True)
        row["if_all_true_ms"] = timed(cond)
        for k in (24, 16, 0):
            go.fill_(True)
            go[k:] = False
            row[f"if_first_{k}_ms"] = timed(cond)
        # correctness: the conditional graph with every layer on equals the plain one, and with a prefix equals
        # that many plain layers
        go.fill_(True)
        x.copy_(x0)
        plain.replay()
        ref = x.clone()
        x.copy_(x0)
        cond.replay()
        row["equal_all"] = bool(torch.equal(ref, x))
        go.fill_(False)
        go[:5] = True
        x.copy_(x0)
        cond.replay()
        y = x.clone()
        x.copy_(x0)
        for i in range(5):
            layer(i, False)
        row["equal_prefix5"] = bool(torch.equal(y, x))
        res.setdefault("rows", []).append(row)
    except Exception:
        res.setdefault("errors", []).append({"pdl": pdl, "error": traceback.format_exc()[-3000:]})
    save()

# a predicate computed on the device inside the graph (as an exit decision would be)
try:
    flag = torch.zeros((), dtype=torch.bool, device=dev)
    v = torch.zeros(1, device=dev)
    out = torch.zeros(1, device=dev)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out.add_(1)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        torch.gt(v, 0.5, out=flag.view(1))
        with _if_body(flag):
            out.add_(1)
    out.zero_()
    v.fill_(1.0)
    g.replay()
    v.fill_(0.0)
    g.replay()
    torch.cuda.synchronize()
    res["device_predicate_count"] = float(out.item())  # 1.0 expected
except Exception:
    res["device_predicate_error"] = traceback.format_exc()[-3000:]
save()
print(json.dumps(res, indent=1))
