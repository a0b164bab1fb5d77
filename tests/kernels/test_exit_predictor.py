"""The fused exit-decision kernel against the reference path (features + ExitPredictors.prob), on CUDA or on the
CPU under TRITON_INTERPRET=1. Hidden widths and MLP widths that are not multiples of the kernel's blocks."""

import os

import pytest
import torch

from mpq.specee.features import draft_logits, features, final_norm
from mpq.specee.predictor import ExitPredictors

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

from kernels.dispatch import pdl_enabled  # noqa: E402
from kernels.exit_predictor import exit_probability  # noqa: E402

# launched as a programmatic dependent too, where the GPU can (sm_90+), as the trace bench launches it
PDL = [False] + ([True] if DEV == "cuda" and pdl_enabled(torch.device(DEV)) else [])


def random_predictors(layers, hidden, gen):
    pred = ExitPredictors(layers, hidden).requires_grad_(False)
    with torch.no_grad():
        for t in (pred.b1, pred.w2, pred.b2, pred.mu):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
        pred.sigma.copy_(torch.rand(pred.sigma.shape, generator=gen) + 0.5)
    return pred.to(DEV)


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("dim,hidden,dtype", [(200, 512, torch.float32), (1100, 300, torch.float16),
                                              (576, 512, torch.float16), (9000, 700, torch.float16), (4096, 512, torch.float16)])
def test_exit_probability_matches_reference(dim, hidden, dtype, pdl):
    gen = torch.Generator().manual_seed(dim)
    layers = [1, 4, 7]
    pred = random_predictors(layers, hidden, gen)
    norm_w = (torch.rand(dim, generator=gen) + 0.5).to(DEV, dtype)
    rows = (torch.randn(4, dim, generator=gen) * 0.3).to(DEV, dtype)
    mlp = pred.kernel_tensors()
    out = torch.full((8,), float("nan"), device=DEV)
    p_state = torch.full((4,), float("nan"), device=DEV)
    p_ref = None
    for step, layer in enumerate(layers):
        x = (torch.randn(dim, generator=gen) * (1 + step)).to(DEV, dtype)
        if step == 1:  # the deferred residual add: the kernel is given x - delta and delta
            delta = (torch.randn(dim, generator=gen)).to(DEV, dtype)
            exit_probability(x - delta, norm_w, 1e-5, rows, p_state, out, layer, mlp, pred.slot[layer], first=False,
                             delta=delta, pdl=pdl)
            x = (x - delta) + delta
        else:
            exit_probability(x, norm_w, 1e-5, rows, p_state, out, layer, mlp, pred.slot[layer], first=step == 0,
                             pdl=pdl)
        feat, p_ref = features(draft_logits(final_norm(x, norm_w, 1e-5), rows), p_ref)
        want = float(pred.prob(layer, feat.float()))
        assert abs(float(out[layer]) - want) < 1e-4 * max(1.0, abs(want)), (layer, float(out[layer]), want)
        torch.testing.assert_close(p_state, p_ref.float(), rtol=1e-4, atol=1e-5)  # fp32, summation order differs
    untouched = [i for i in range(8) if i not in layers]
    assert torch.isnan(out[untouched]).all()  # writes only its own slot


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("dim,dtype,with_delta", [(1100, torch.float16, True), (4096, torch.float16, True),
                                                  (576, torch.float16, False), (200, torch.float32, True)])
def test_exit_probability_with_next_norm_is_the_step_norm(dim, dtype, with_delta, pdl):
    """With next_norm the kernel also returns exactly what the step's add + RMSNorm kernel returns (the residual
    add and the next layer's normed input), and the probability it writes is the one it writes without (up to the
    order of an fp32 sum)."""
    from kernels.step_ops import add_rms_norm

    gen = torch.Generator().manual_seed(dim + with_delta)
    pred = random_predictors([0, 3], 300, gen)
    mlp = pred.kernel_tensors()
    norm_w, next_w = ((torch.rand(dim, generator=gen) + 0.5).to(DEV, dtype) for _ in range(2))
    rows = (torch.randn(4, dim, generator=gen) * 0.3).to(DEV, dtype)
    x = (torch.randn(dim, generator=gen) * 3).to(DEV, dtype)
    delta = torch.randn(dim, generator=gen).to(DEV, dtype) if with_delta else None
    out = torch.full((4,), float("nan"), device=DEV)
    p_state = torch.full((4,), float("nan"), device=DEV)
    exit_probability(x, norm_w, 1e-5, rows, p_state, out, 0, mlp, pred.slot[3], first=True, delta=delta, pdl=pdl)
    x_next, h_next = exit_probability(x, norm_w, 1e-5, rows, p_state, out, 1, mlp, pred.slot[3], first=True,
                                      delta=delta, pdl=pdl, next_norm=next_w)
    x_ref, h_ref = add_rms_norm(x, delta, next_w, 1e-5, pdl=pdl)
    assert torch.equal(x_next, x_ref) and torch.equal(h_next, h_ref)
    assert not torch.isnan(out[:2]).any()
    assert abs(float(out[0]) - float(out[1])) < 1e-5  # the warp count (sum order) may differ
