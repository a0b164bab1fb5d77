"""GPTQ-aware sensitivities: the measured gain that scales each linear's group errors."""

import torch

from mpq.quant.pipeline import measure_linear
from mpq.quant.recipe import Recipe
from mpq.quant.sensitivity import gptq_gain, group_sensitivity


def correlated_hessian(k: int, seed: int) -> torch.Tensor:
    """X^T X / n of inputs with strongly correlated neighbouring features (where GPTQ has error to move)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(512, k, generator=gen)
    x = base + 0.9 * torch.roll(base, 1, dims=1) + 0.5 * torch.roll(base, 2, dims=1)
    return x.t() @ x / x.shape[0]


def test_gain_is_one_without_correlations():
    """With a diagonal Hessian GPTQ has nowhere to move the error: it rounds exactly like RTN."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5)
    for maxq in (3, 15):
        assert abs(gptq_gain(w, h, 64, maxq, damp=0.01, act_order=True) - 1.0) < 1e-4


def test_gain_below_one_with_correlations():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    h = correlated_hessian(128, seed=3)
    g2 = gptq_gain(w, h, 64, 3, damp=0.01, act_order=True)
    g4 = gptq_gain(w, h, 64, 15, damp=0.01, act_order=True)
    assert 0.0 < g2 < 0.9 and 0.0 < g4 < 0.9


def test_gains_scale_the_error_tables():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    hdiag = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.5
    plain = group_sensitivity(w, hdiag, 64, (0, 1))
    scaled = group_sensitivity(w, hdiag, 64, (0, 1), gains=(0.25, 0.5))
    for k in (0, 1):
        torch.testing.assert_close(scaled[k].err2, plain[k].err2 * 0.25)
        torch.testing.assert_close(scaled[k].err4, plain[k].err4 * 0.5)
        assert torch.equal(scaled[k].outlier_mask, plain[k].outlier_mask)


def test_recipe_switch_changes_the_measurement():
    """gptq_aware (the default) uses the measured gains; off, the tables are the round-to-nearest ones."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    h = correlated_hessian(128, seed=7)
    aware = measure_linear("m.layers.0.mlp.up_proj", w, h, Recipe(group_size=64))
    plain = measure_linear("m.layers.0.mlp.up_proj", w, h, Recipe(group_size=64, gptq_aware=False))
    ratio = aware.errors[0][0] / plain.errors[0][0]  # all 2-bit, no outliers: the 2-bit gain
    expected = gptq_gain(w, h, 64, 3, damp=0.01, act_order=True)
    assert abs(float(ratio) - expected) < 1e-6 * max(1.0, expected)
