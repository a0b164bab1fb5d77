"""Data-dependent branches inside a captured CUDA graph: IF nodes, built through the CUDA driver API during a torch
capture (torch 2.11 has no API for them).

`DeviceBranch.if_else(then_fn, else_fn)` queues both functions' work as the bodies of two IF nodes. A Triton kernel
sets their conditions from the exit flag just before them (`kernels.graph_cond`), so on replay exactly one runs and
the other costs nothing but its node. Outside a capture (the warm-up run, or the eager CPU path) it runs the one
branch the flag selects, or both when warming up.

How a body is captured: the IF node is added to the graph being captured, the capture's dependencies are moved to
it, and the body is captured on a fresh stream into the node's body graph (`cuStreamBeginCaptureToGraph`), with
its temporaries in a memory pool of the bodies' own (every body of the graph: the outermost one routes the
thread's allocations there, nested ones inherit it). Driver entry points are fetched with `cuGetProcAddress` at the
CUDA 12.4 ABI (conditional nodes need a 12.4+ driver).

A body must not fork onto a stream that is still joined to the enclosing capture. torch's side streams come from a
small pool it cycles through (on SmolLM2, whose 52 split linears outnumber it, such a fork crashed the driver at
instantiation), so body streams and the split linears' side streams come from the driver (`driver_stream`): each
forking module owns its streams, and a module runs once in a step.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.exit_flag import CTL_EXITED
from mpq.errors import MpqError

_IF, _NODE_CONDITIONAL, _ASSIGN_DEFAULT, _SET_DEPENDENCIES, _THREAD_LOCAL, _ACTIVE, _NON_BLOCKING = 0, 13, 1, 1, 1, 1, 1
_P, _U64, _SIZE, _PTR = ctypes.POINTER, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
_PROTOTYPES = {
    "cuStreamGetCaptureInfo": (_PTR, _P(ctypes.c_int), _P(_U64), _P(_PTR), _P(_P(_PTR)), _P(_PTR), _P(_SIZE)),
    "cuGraphAddNode": (_P(_PTR), _PTR, _P(_PTR), _PTR, _SIZE, _PTR),
    "cuStreamUpdateCaptureDependencies": (_PTR, _P(_PTR), _PTR, _SIZE, ctypes.c_uint),
    "cuGraphConditionalHandleCreate": (_P(_U64), _PTR, _PTR, ctypes.c_uint, ctypes.c_uint),
    "cuStreamBeginCaptureToGraph": (_PTR, _PTR, _PTR, _PTR, _SIZE, ctypes.c_int),
    "cuStreamEndCapture": (_PTR, _P(_PTR)),
    "cuCtxGetCurrent": (_P(_PTR),),
    "cuStreamCreate": (_P(_PTR), ctypes.c_uint),
}


class _ConditionalParams(ctypes.Structure):  # CUDA_CONDITIONAL_NODE_PARAMS
    _fields_ = [("handle", _U64), ("type", ctypes.c_int), ("size", ctypes.c_uint), ("bodies", _P(_PTR)),
                ("ctx", _PTR)]


class _NodeParams(ctypes.Structure):  # CUgraphNodeParams: type, reserved, a 232-byte union, reserved
    _fields_ = [("type", ctypes.c_int), ("reserved0", ctypes.c_int * 3), ("params", ctypes.c_longlong * 29),
                ("reserved2", ctypes.c_longlong)]


@functools.lru_cache(maxsize=None)
def _driver() -> dict:
    lib = ctypes.CDLL("libcuda.so.1")
    fns = {}
    for name, args in _PROTOTYPES.items():
        fn, status = _PTR(), ctypes.c_int()
        _check(lib, lib.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), 12040, _U64(0), ctypes.byref(status)),
               name)
        if not fn.value:
            raise MpqError(f"the CUDA driver has no {name} (conditional graph nodes need a 12.4+ driver)")
        fns[name] = ctypes.CFUNCTYPE(ctypes.c_int, *args)(fn.value)
    fns["lib"] = lib
    return fns


def supported() -> bool:
    """Whether this machine's CUDA driver has what IF nodes need (else callers capture without branches)."""
    try:
        _driver()
    except (OSError, MpqError):
        return False
    return True


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise MpqError(f"{what}: CUDA driver error {result} ({(name.value or b'?').decode()})")


def _call(name: str, *args) -> None:
    d = _driver()
    _check(d["lib"], d[name](*args), name)


def _capture_graph(stream: torch.cuda.Stream):
    status, cid, graph = ctypes.c_int(), _U64(), _PTR()
    deps, edges, n = _P(_PTR)(), _PTR(), _SIZE()
    _call("cuStreamGetCaptureInfo", _PTR(stream.cuda_stream), ctypes.byref(status), ctypes.byref(cid),
          ctypes.byref(graph), ctypes.byref(deps), ctypes.byref(edges), ctypes.byref(n))
    if status.value != _ACTIVE:
        raise RuntimeError("DeviceBranch.if_else inside a capture needs the current stream to be capturing")
    return graph, deps, n.value


def driver_stream(device: torch.device) -> torch.cuda.ExternalStream:
    """A non-blocking stream of the driver's own, never handed to anyone else (never destroyed: streams are made
    once per module, before any capture). torch's streams come from a small pool it cycles through, so a nested body
    could be handed a stream its parent is still being captured on, which the driver refuses."""
    stream = _PTR()
    with torch.cuda.device(device):  # the stream belongs to the current context
        _call("cuStreamCreate", ctypes.byref(stream), _NON_BLOCKING)
    return torch.cuda.ExternalStream(stream.value, device=device)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream a module may fork onto, also inside device branches: the driver's own where IF nodes are
    supported (the only captures with bodies), else one of torch's."""
    return driver_stream(device) if supported() else torch.cuda.Stream(device)


class DeviceBranch:
    """See the module docstring. ctl: the control block whose exit flag picks the branch; pool: a
    `torch.cuda.MemPool` of the bodies' own, for their temporaries. It must not be the enclosing capture's pool:
    torch (2.11) refuses to route a thread's allocations to a pool a capture records to, and without a pool of
    their own, body temporaries would come from the shared cache and be handed to other tensors after the
    capture."""

    def __init__(self, ctl: torch.Tensor, pool=None):
        self.ctl, self.pool = ctl, pool
        self.warming = False  # set by the caller around the warm-up run before a capture: run both branches
        self._streams: list[torch.cuda.ExternalStream] = []  # body streams outlive their captures
        self._spare: list[torch.cuda.ExternalStream] = []
        self._setter_loaded = False
        self._depth = 0  # bodies being captured around the current one

    def if_else(self, then_fn, else_fn) -> None:
        if self.ctl.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            if self.warming:
                if self.ctl.device.type == "cuda":
                    if not self._setter_loaded:
                        from kernels.graph_cond import warm_up

                        warm_up(self.ctl)  # a capture may not load modules
                        self._setter_loaded = True
                    # the bodies' streams, made before capture
                    self._spare += [driver_stream(self.ctl.device) for _ in range(2)]
                else_fn()
                then_fn()
            elif int(self.ctl[int(CTL_EXITED)]) == 0:
                then_fn()
            else:
                else_fn()
            return
        from kernels.graph_cond import set_branch

        stream = torch.cuda.current_stream()
        graph, _, _ = _capture_graph(stream)
        ctx = _PTR()
        _call("cuCtxGetCurrent", ctypes.byref(ctx))
        handles = [_U64(), _U64()]
        for h in handles:
            _call("cuGraphConditionalHandleCreate", ctypes.byref(h), graph, ctx, 0, _ASSIGN_DEFAULT)
        set_branch(handles[0].value, handles[1].value, self.ctl)
        for handle, body_fn in zip(handles, (then_fn, else_fn)):
            graph, deps, n = _capture_graph(stream)
            cond = _ConditionalParams(handle=handle.value, type=_IF, size=1, ctx=ctx)
            params = _NodeParams(type=_NODE_CONDITIONAL)
            ctypes.memmove(ctypes.addressof(params.params), ctypes.addressof(cond), ctypes.sizeof(cond))
            node = _PTR()
            _call("cuGraphAddNode", ctypes.byref(node), graph, deps, None, n, ctypes.addressof(params))
            ctypes.memmove(ctypes.addressof(cond), ctypes.addressof(params.params), ctypes.sizeof(cond))
            body = _PTR(cond.bodies[0])
            _call("cuStreamUpdateCaptureDependencies", _PTR(stream.cuda_stream), ctypes.byref(node), None, 1,
                  _SET_DEPENDENCIES)
            self._capture_body(body, body_fn)

    def _capture_body(self, body, body_fn) -> None:
        side = self._spare.pop() if self._spare else driver_stream(self.ctl.device)
        self._streams.append(side)
        _call("cuStreamBeginCaptureToGraph", _PTR(side.cuda_stream), body, None, None, 0, _THREAD_LOCAL)
        outermost = self._depth == 0
        self._depth += 1
        try:
            with torch.cuda.stream(side):
                if self.pool is not None and outermost:  # torch refuses to enter one pool twice
                    with torch.cuda.use_mem_pool(self.pool):
                        body_fn()
                else:
                    body_fn()
        finally:
            self._depth -= 1
            out = _PTR()
            _call("cuStreamEndCapture", _PTR(side.cuda_stream), ctypes.byref(out))
