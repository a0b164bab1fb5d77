"""The `mpq::mixed_linear` custom op and QuantLinear's CUDA path (fake-tensor rule, CUDA-graph replay)."""

import os

import pytest
import torch

pytest.importorskip("triton")

from kernels import KernelConfig, mixed_matmul  # noqa: E402
from mpq.runtime import ops  # noqa: E402
from mpq.runtime.quant_linear import KERNEL_TENSOR_ORDER, QuantLinear  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


def op_args(layer: QuantLinear, x):
    return (x, *(getattr(layer, n) for n in KERNEL_TENSOR_ORDER), layer.split_counters,
            layer.geometry["group_size"], layer.geometry["outliers"])


@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_op_matches_reference(make_packed, lead):
    packed = make_packed(48, 320, 64, 2, 1, seed=3)
    layer = QuantLinear(packed).to(DEVICE)
    x = torch.randn(*lead, 320, dtype=torch.float16, device=DEVICE)
    y = ops.mixed_linear(*op_args(layer, x))
    ref = x.double().cpu() @ packed.dequantize(torch.float64).t()
    assert y.shape == (*lead, 48)
    assert ((y.double().cpu() - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("m, group_size", [(1, 128), (17, 128), (1, 64)])
def test_ragged_stack_kernel_path(m, group_size, monkeypatch):
    """A ragged stack's kernel path (one tensor-core launch at M <= 16 and g = 128, else the parts one by one)
    equals its reference path, bias included, and at M = 1 honours the exit flag across its parts: one by one, each
    part keeps what is left of the kept row tiles, and the row tiles before the kept count are still right."""
    import mpq.runtime.quant_linear as quant_linear
    from mpq.bench.kernels import random_layer
    from mpq.runtime.quant_linear import RaggedQuantLinear

    launches = []
    real = quant_linear._cuda_matmul

    def spy(x, holder, counters, group_size, outliers, exit_flag, parts=None):
        launches.append(None if exit_flag is None else exit_flag[1])
        return real(x, holder, counters, group_size, outliers, exit_flag, parts)
    monkeypatch.setattr(quant_linear, "_cuda_matmul", spy)

    parts = [random_layer(n, 256, 1, DEVICE, group_size=group_size, seed=i, n4=n4)
             for i, (n, n4) in enumerate([(48, 1), (32, 0), (64, 2)])]
    parts[1].bias = torch.randn(32, dtype=torch.float16, device=DEVICE)
    stack = RaggedQuantLinear(parts)
    x = torch.randn(m, 256, dtype=torch.float16, device=DEVICE)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.double().cpu(), stack.dequantized_weight(torch.float64).cpu(),
                                          torch.cat([torch.zeros(48), parts[1].bias.cpu(), torch.zeros(64)]).double())
        got = stack.kernel_forward(x)
        assert got.shape == (m, 144) and ((got.double().cpu() - want).norm() / want.norm()) < 2e-3
        if m > 1:  # the exit flag is read by the decode GEMVs only
            return
        keep = 4  # the first part's 3 row tiles and one of the second's
        stack.exit_flag = (torch.ones(1, dtype=torch.int32, device=DEVICE), keep)
        launches.clear()
        poisoned = stack.kernel_forward(x)
    assert launches == ([4] if group_size == 128 else [4, 1, 0])
    kept = poisoned[:, :16 * keep].double().cpu()
    assert ((kept - want[:, :16 * keep]).norm() / want[:, :16 * keep].norm()) < 2e-3


def test_fake_tensor_rule(make_packed):
    layer = QuantLinear(make_packed(48, 192, 64, 1, 1, seed=4)).to(DEVICE)
    x = torch.randn(2, 5, 192, dtype=torch.float16, device=DEVICE)
    torch.library.opcheck(ops.mixed_linear, op_args(layer, x), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("m", [1, 4, 16])
def test_cuda_graph_replay(make_packed, m):
    """Warm up, capture, replay on new inputs: equal to eager (split-K counters reset themselves)."""
    layer = QuantLinear(make_packed(80, 384, 128, 1, 2, seed=5)).cuda()
    x = torch.randn(m, 384, dtype=torch.float16, device="cuda")
    layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("config", [KernelConfig("gemv", split=3), KernelConfig("gemm", split=2)])
def test_split_k_graph_replay(make_packed, config):
    """Split-K under graph replay: the workspace comes from the graph's pool, the counters reset themselves."""
    layer = QuantLinear(make_packed(80, 384, 128, 1, 2, seed=6)).cuda()
    args = tuple(getattr(layer, n) for n in KERNEL_TENSOR_ORDER)
    x = torch.randn(2, 384, dtype=torch.float16, device="cuda")
    run = lambda: mixed_matmul(x, args, group_size=128, outliers=2, counters=layer.split_counters, config=config)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, run(), rtol=0, atol=0)
