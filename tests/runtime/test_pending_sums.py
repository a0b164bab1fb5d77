"""Pending sums inside `Transformer.forward`, on the CPU (Triton interpreter): the split-K tensor-core GEMV adds its
shares into the engine's fp32 sums and the small-op kernels consume them (the last one in the final norm),
against the same engine without them (every GEMV forced to the split-K configuration the 7B table picks for o,
gate/up and down; the CUDA counterpart is tests/runtime/test_engine_cuda.py::test_pending_sums_change_no_token)."""

import os

import pytest
import torch

from engine_testlib import random_packed_layers, record_in_place_adds, rel_err, tiny_config, tiny_hf_model
from mpq.runtime.model import ModelArgs, PendingSums, SmallOps, Transformer, WeightSource

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1, as scripts/test.sh sets)",
                allow_module_level=True)

from kernels import dispatch, step_ops  # noqa: E402
from kernels.dispatch import KernelConfig  # noqa: E402


def test_one_token_steps_consume_what_the_gemvs_add(monkeypatch):
    monkeypatch.setattr(dispatch, "choose_config", lambda *a, **kw: KernelConfig("tc", split=2))
    hf = tiny_hf_model(tiny_config(hidden_size=256, intermediate_size=256, num_hidden_layers=1))
    packed, floats = random_packed_layers(hf, 0.1, 0.2, 0.05)  # weights of ~0.04
    model = Transformer(ModelArgs.from_hf_config(hf.config.to_dict()),
                        WeightSource(floats, packed, device=torch.device("cpu"), dtype=torch.float16)).eval()
    model.setup_caches(64)
    a = model.args
    model.sums = PendingSums(o=torch.zeros(1, 1, a.dim), gate_up=torch.zeros(1, 1, 2 * a.intermediate_size),
                             down=torch.zeros(1, 1, a.dim))
    model.ops = SmallOps(add_rms_norm=step_ops.add_rms_norm, silu_mul=step_ops.silu_mul)
    added = record_in_place_adds(monkeypatch)
    tok, pos = torch.tensor([[7]]), torch.tensor([12])
    with torch.no_grad():
        model(torch.arange(20, 32)[None], torch.arange(12))  # prefill: the float path, no sums
        assert not added
        model.sums.down.fill_(3.0)  # left by a step that stopped early: the next prompt's prefill clears it
        model(torch.arange(20, 32)[None], torch.arange(12))
        on = model(tok, pos).float()
        assert added == [True] * 3 * a.n_layers  # o, gate/up and down of every layer
        assert not any(s.any() for s in (model.sums.o, model.sums.gate_up, model.sums.down))
        model.sum_in_place = False
        off = model(tok, pos).float()
    assert len(added) == 3 * a.n_layers
    assert torch.isfinite(on).all() and on.std() > 0.1
    assert rel_err(on, off) < 2e-3
