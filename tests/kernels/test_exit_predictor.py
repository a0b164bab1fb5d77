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
