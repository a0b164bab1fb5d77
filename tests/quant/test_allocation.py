"""Allocation: the budget is respected, tiles are aligned (equal 4-bit count per row tile), pins are exact,
unreachable targets are refused with the reachable range."""

import pytest
import torch

from mpq.errors import MpqError
from mpq.quant.allocation import allocate, linear_costs, parse_overrides, pin_for, reachable_range, tile_choice
from mpq.quant.sensitivity import group_sensitivity


def make_costs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    costs = []
    for i, (n, k) in enumerate([(64, 256), (32, 128), (48, 384), (64, 128)]):
        w = torch.randn(n, k, generator=gen) * (1 + i)
        w[:, :7] *= 6  # a few hot input channels
        hd = torch.rand(k, generator=gen) + 0.1
        g = 64
        costs.append(linear_costs(f"model.layers.{i}.mlp.up_proj", group_sensitivity(w, hd, g, (0, 1)), n, k, g, 16))
    return costs


@pytest.mark.parametrize("target", [2.35, 2.6, 3.0, 3.5])
def test_budget_respected_and_spent(target):
    costs = make_costs()
    plan = allocate(costs, target, {})
    assert plan.bits_per_weight <= target + 1e-9
    # nothing affordable left: the cheapest single move would overshoot, so the plan is close to the target
    assert plan.bits_per_weight > target - 0.2


def test_more_bits_never_increase_predicted_error():
    costs = make_costs()
    errs = [sum(p.predicted_error for p in allocate(costs, b, {}).linears) for b in (2.4, 2.8, 3.2, 3.8)]
    assert errs == sorted(errs, reverse=True)


def test_tiles_aligned_equal_count_per_row_tile():
    costs = make_costs()
    plan = allocate(costs, 3.0, {})
    for c, row in zip(costs, plan.linears):
        chosen = tile_choice(c, row.n4, row.outliers)
        assert chosen.shape == (c.out_features // 16, c.groups)
        assert torch.all(chosen.sum(dim=1) == row.n4)


def test_tiles_with_largest_benefit_go_first():
    costs = make_costs()
    c = costs[2]
    sens = group_sensitivity(torch.randn(48, 384), torch.ones(384), 64, (0,))[0]
    c = linear_costs("x", {0: sens}, 48, 384, 64, 16)
    chosen = tile_choice(c, 2, 0)
    benefit = sens.tile_benefit(16)
    assert torch.all(benefit[chosen].view(3, 2).min(dim=1).values >= benefit[~chosen].view(3, 4).max(dim=1).values)


def test_pins_honoured_exactly():
    costs = make_costs()
    pins = {costs[0].name: 4, costs[1].name: 2, costs[2].name: 16}
    lo, hi = reachable_range(costs, pins)
    target = (lo + hi) / 2
    plan = allocate(costs, target, pins)
    by = {p.name: p for p in plan.linears}
    assert by[costs[0].name].n4 == costs[0].groups and by[costs[0].name].pinned == 4
    assert by[costs[1].name].n4 == 0 and by[costs[1].name].outliers == 0
    assert by[costs[2].name].bits == 16.0
    assert plan.bits_per_weight <= target + 1e-9
    assert by[costs[3].name].bits > costs[3].bits(0, 0)  # the budget left is spent on the free linear


def test_unreachable_target_refused_with_range():
    costs = make_costs()
    lo, hi = reachable_range(costs, {})
    with pytest.raises(MpqError, match=f"{lo:.3f} to {hi:.3f}"):
        allocate(costs, lo - 0.05, {})
    with pytest.raises(MpqError, match="outside"):
        allocate(costs, hi + 0.05, {})


def test_override_parsing_and_matching():
    o = parse_overrides(["model.layers.0.*=4", "*.down_proj=16"])
    assert pin_for("model.layers.0.self_attn.q_proj", o) == 4
    assert pin_for("model.layers.3.mlp.down_proj", o) == 16
    assert pin_for("model.layers.3.mlp.up_proj", o) is None
    with pytest.raises(MpqError):
        parse_overrides(["*.q_proj=3"])


QKV_GATE_UP = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]


def shared_input_costs(seed=0):
    """Two layers of q/k/v (k and v narrower, as in GQA) and gate/up, plus a down projection, all K = 128."""
    gen = torch.Generator().manual_seed(seed)
    costs = []
    for layer in range(2):
        for suffix, n in (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32),
                          ("mlp.gate_proj", 48), ("mlp.up_proj", 48), ("mlp.down_proj", 32)):
            w = torch.randn(n, 128, generator=gen) * (1 + 3 * torch.rand(1, generator=gen))
            hd = torch.rand(128, generator=gen) + 0.1
            costs.append(linear_costs(f"model.layers.{layer}.{suffix}", group_sensitivity(w, hd, 32, (0, 1)), n, 128, 32, 16))
    return costs


@pytest.mark.parametrize("target", [2.8, 3.2, 3.8])
def test_tied_shared_inputs_end_with_one_state_per_set(target):
    costs = shared_input_costs()
    free = allocate(costs, target, {})
    plan = allocate(costs, target, {}, tied_sets=QKV_GATE_UP)
    by = {p.name: (p.n4, p.outliers) for p in plan.linears}
    for layer in range(2):
        p = f"model.layers.{layer}."
        assert by[p + "self_attn.q_proj"] == by[p + "self_attn.k_proj"] == by[p + "self_attn.v_proj"]
        assert by[p + "mlp.gate_proj"] == by[p + "mlp.up_proj"]
    assert target - 0.25 < plan.bits_per_weight <= target + 1e-9
    # tying only removes choices, so the untied plan predicts no more error
    assert sum(p.predicted_error for p in free.linears) <= sum(p.predicted_error for p in plan.linears) + 1e-9


def test_a_pinned_member_leaves_its_set_and_keeps_its_pin():
    costs = shared_input_costs()
    pins = {"model.layers.0.self_attn.v_proj": 4}
    plan = allocate(costs, 3.0, pins, tied_sets=QKV_GATE_UP)
    by = {p.name: p for p in plan.linears}
    assert by["model.layers.0.self_attn.v_proj"].n4 == costs[2].groups
    assert (by["model.layers.0.self_attn.q_proj"].n4, by["model.layers.0.self_attn.q_proj"].outliers) == \
        (by["model.layers.0.self_attn.k_proj"].n4, by["model.layers.0.self_attn.k_proj"].outliers)


def test_untied_sets_differ_here_so_the_tie_test_means_something():
    by = {p.name: (p.n4, p.outliers) for p in allocate(shared_input_costs(), 3.0, {}).linears}
    assert any(len({by[f"model.layers.{i}.self_attn.{m}_proj"] for m in "qkv"}) > 1 for i in range(2))


def test_recipe_tied_sets_are_checked_and_the_shipped_recipes_load():
    from mpq.quant.recipe import Recipe, load_recipe

    assert load_recipe("default") == Recipe()  # the YAML and the built-in defaults agree
    assert load_recipe("fast").tied_sets == [["self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]
    for bad in ("mlp.gate_proj", [["mlp.gate_proj", 3]], ["mlp.gate_proj"]):
        with pytest.raises(MpqError, match="tied_sets"):
            Recipe.from_dict({"tied_sets": bad})
    assert load_recipe("quality") == Recipe(name="quality", refit_scales=True)
    for key in ("gptq", "refit_scales"):
        with pytest.raises(MpqError, match=f"{key} must be true or false"):
            Recipe.from_dict({key: "no"})
