"""Temporary (GPU, branch graph-if): can IF-node bodies built by mpq.runtime.graph_if allocate? Bodies that
allocate or not x one level / nested x outer capture mode x a pool of the bodies' own or none, checked by
replaying both sides; full tracebacks on failure. JSON to argv[1]."""

import json
import os
import sys
import traceback

import torch

from mpq.runtime.graph_if import DeviceBranch


def case(alloc: bool, nested: bool, mode: str, use_pool: bool) -> dict:
    dev = torch.device("cuda")
    ctl = torch.zeros(16, dtype=torch.int32, device=dev)
    x = torch.arange(1, 1025, dtype=torch.float32, device=dev)
    y = torch.zeros_like(x)
    pool = torch.cuda.MemPool() if use_pool else None
    br = DeviceBranch(ctl, pool)

    def then_fn(depth):
        if alloc:
            t = x * 2
            y.copy_(t + depth)
        else:
            y.copy_(x)
            y.mul_(2).add_(depth)
        if nested and depth == 0:
            br.if_else(lambda: then_fn(1), lambda: else_fn(1))

    def else_fn(depth):
        if alloc:
            y.copy_(x * -1 - depth)
        else:
            y.copy_(x).mul_(-1).sub_(depth)

    def step():
        br.if_else(lambda: then_fn(0), lambda: else_fn(0))
        if alloc:
            z = y * 1
            y.copy_(z)

    br.warming = True
    step()
    br.warming = False
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=mode):
        step()
    out = {}
    for flag in (0, 1, 0):
        ctl[0] = flag
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        want = -x if flag else 2 * x + (1 if nested else 0)
        out[f"flag{flag}_ok"] = bool(torch.equal(y, want))
    return out


def main(path):
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "body": os.environ.get("MPQ_IF_BODY")}
    for alloc in (False, True):
        for nested in (False, True):
            for mode in ("thread_local", "global"):
                for use_pool in (True, False):
                    key = f"alloc{int(alloc)}_nest{int(nested)}_{mode}_pool{int(use_pool)}"
                    try:
                        res[key] = case(alloc, nested, mode, use_pool)
                    except Exception:  # noqa: BLE001 - a debug probe reports every failure
                        tb = traceback.format_exc()
                        res[key] = tb[:1800] + (" ... " + tb[-1200:] if len(tb) > 3000 else "")
                    torch.cuda.synchronize()
    json.dump(res, open(path, "w"), indent=1)
    print(json.dumps({k: (v if isinstance(v, dict) else v[:300] + " ..." + v[-700:]) if not isinstance(v, str) or
                      len(v) < 1000 else v[:300] + " ... " + v[-700:] for k, v in res.items()}, indent=0))


if __name__ == "__main__":
    main(sys.argv[1])
