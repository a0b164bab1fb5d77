"""Spend an all-in bits/weight budget over every linear of the model.

Each linear m has a state (n4, k): n4 4-bit tiles in every row tile (the R-row tiles with the largest
2-bit-minus-4-bit error go first) and k outliers per 2-bit group. The predicted error of a state is the
Hessian-weighted squared error summed over groups. Starting from (0, 0) everywhere, a greedy loop takes
the move (n4 + 1, or k + 1) with the most error removed per stored bit until the budget is spent.
Pinned linears (overrides) take no moves: 2 = all 2-bit without outliers, 4 = all 4-bit, 16 = float.
With `tied_sets` (module suffixes, e.g. k/v and gate/up), the unpinned linears of one set in one layer move as one
unit, so they end with equal (n4, k) and the runtime can stack them into one GEMV launch (`PackedLinear.stack_rows`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

from mpq.errors import MpqError
from mpq.quant.format import bits_per_weight

PIN_VALUES = (2, 4, 16)


@dataclass
class LinearCosts:
    """What the allocator needs of one linear: shape, layout constants and the error table E[k][n4]."""

    name: str
    out_features: int
    in_features: int
    group_size: int
    tile_rows: int
    errors: dict[int, torch.Tensor]  # k -> [G + 1] predicted error with n4 = 0..G
    order: dict[int, torch.Tensor]  # k -> [T, G] group columns of each row tile, most benefit first
    outlier_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> [N, G, g], kept for small models

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    def bits(self, n4: int, k: int) -> float:
        return bits_per_weight(self.out_features, self.in_features, self.group_size, self.tile_rows, n4, k)


@dataclass
class LinearPlan:
    name: str
    n4: int
    outliers: int
    pinned: int | None  # 2, 4 or 16 where an override applies
    bits: float
    predicted_error: float
    shape: tuple[int, int] = (0, 0)
    groups: int = 1  # group columns of the linear (the 4-bit fraction is n4 / groups)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "groups": self.groups, "n4": self.n4, "outliers": self.outliers,
                "pinned": self.pinned, "bits_per_weight": round(self.bits, 4), "predicted_error": self.predicted_error}


@dataclass
class Plan:
    target_bits: float
    linears: list[LinearPlan] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        total = sum(p.shape[0] * p.shape[1] for p in self.linears)
        return sum(p.bits * p.shape[0] * p.shape[1] for p in self.linears) / total

    def to_dict(self) -> dict:
        return {"target_bits": self.target_bits, "bits_per_weight": round(self.bits_per_weight, 4),
                "linears": [p.to_dict() for p in self.linears]}


def parse_overrides(items: list[str] | dict) -> dict[str, int]:
    """'PATTERN=2|4|16' strings (or a recipe mapping) -> {pattern: bits}."""
    pairs = items.items() if isinstance(items, dict) else (s.rsplit("=", 1) if "=" in s else (s, "") for s in items)
    out = {}
    for pattern, value in pairs:
        try:
            bits = int(value)
        except (TypeError, ValueError):
            bits = -1
        if bits not in PIN_VALUES or not str(pattern).strip():
            raise MpqError(f"bad override '{pattern}={value}': use PATTERN=2|4|16 (PATTERN matches module names, * wildcards)")
        out[str(pattern).strip()] = bits
    return out


def pin_for(name: str, overrides: dict[str, int]) -> int | None:
    """The last matching override wins (recipe first, command line after); patterns are globs or regexes."""
    found = None
    for pattern, bits in overrides.items():
        if fnmatch.fnmatchcase(name, pattern) or _regex_match(pattern, name):
            found = bits
    return found


def pins_for(names, overrides: dict[str, int]) -> dict[str, int]:
    """{name: bits} for every name an override pins (`pin_for`)."""
    return {name: bits for name in names if (bits := pin_for(name, overrides)) is not None}


def _regex_match(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def pinned_state(lin: LinearCosts, pin: int) -> tuple[int, int]:
    return (0, 0) if pin == 2 else (lin.groups, 0)


def reachable_range(linears: list[LinearCosts], pins: dict[str, int]) -> tuple[float, float]:
    """(lowest, highest) all-in bits/weight the format can reach under the pins."""
    total = sum(lin.weights for lin in linears)
    lo = hi = 0.0
    for lin in linears:
        pin = pins.get(lin.name)
        if pin == 16:
            lo += 16 * lin.weights
            hi += 16 * lin.weights
        elif pin is not None:
            b = lin.bits(*pinned_state(lin, pin))
            lo += b * lin.weights
            hi += b * lin.weights
        else:
            lo += lin.bits(0, 0) * lin.weights
            hi += max(lin.bits(lin.groups, k) for k in lin.errors) * lin.weights
    return lo / total, hi / total


def tied_units(linears: list[LinearCosts], tied_sets) -> list[list[LinearCosts]]:
    """The linears grouped into units that move together: the members of each tied set (module suffixes) within one
    layer that have the same group columns and candidate outlier counts; every other linear alone."""
    units: dict[tuple, list[LinearCosts]] = {}
    for lin in linears:
        key: tuple = (lin.name,)
        for s, suffixes in enumerate(tied_sets):
            suffix = next((x for x in suffixes if lin.name.endswith("." + x)), None)
            if suffix is not None:
                key = (lin.name[: -len(suffix)], s, lin.groups, lin.tile_rows, tuple(sorted(lin.errors)))
        units.setdefault(key, []).append(lin)
    return list(units.values())


def allocate(linears: list[LinearCosts], target_bits: float, pins: dict[str, int], tied_sets=()) -> Plan:
    lo, hi = reachable_range(linears, pins)
    if not lo - 1e-9 <= target_bits <= hi + 1e-9:
        raise MpqError(f"--target-bits {target_bits} is outside what the format can reach here: {lo:.3f} to {hi:.3f} bits/weight")
    total = sum(lin.weights for lin in linears)
    budget = target_bits * total
    state: dict[str, tuple[int, int]] = {}
    spent = 0.0
    for lin in linears:
        pin = pins.get(lin.name)
        state[lin.name] = pinned_state(lin, pin) if pin in (2, 4) else (0, 0)
        spent += (16.0 if pin == 16 else lin.bits(*state[lin.name])) * lin.weights
    free = [lin for lin in linears if lin.name not in pins]
    units = tied_units(free, tied_sets)
    while True:
        best, best_ratio = None, 0.0
        for unit in units:
            n4, k = state[unit[0].name]
            for nxt in ((n4 + 1, k), (n4, k + 1)):
                if nxt[0] > unit[0].groups or nxt[1] not in unit[0].errors:
                    continue
                cost = sum((lin.bits(*nxt) - lin.bits(n4, k)) * lin.weights for lin in unit)
                gain = sum(float(lin.errors[k][n4] - lin.errors[nxt[1]][nxt[0]]) for lin in unit)
                if cost <= 0 or spent + cost > budget + 1e-6:
                    continue
                if gain / cost > best_ratio:
                    best, best_ratio = (unit, nxt, cost), gain / cost
        if best is None:
            break
        unit, nxt, cost = best
        for lin in unit:
            state[lin.name] = nxt
        spent += cost
    plan = Plan(target_bits)
    for lin in linears:
        n4, k = state[lin.name]
        pin = pins.get(lin.name)
        bits = 16.0 if pin == 16 else lin.bits(n4, k)
        err = 0.0 if pin == 16 else float(lin.errors.get(k, lin.errors[0])[n4])
        plan.linears.append(LinearPlan(lin.name, n4, k, pin, bits, err, (lin.out_features, lin.in_features), lin.groups))
    return plan


def tile_choice(lin: LinearCosts, n4: int, k: int) -> torch.Tensor:
    """[T, G] bool: the n4 tiles of each row tile that get 4 bits."""
    order = lin.order[k if k in lin.order else 0]
    chosen = torch.zeros(order.shape, dtype=torch.bool)
    if n4:
        chosen.scatter_(1, order[:, :n4], True)
    return chosen


def linear_costs(name: str, sens_by_k: dict, out_features: int, in_features: int, group_size: int, tile_rows: int,
                 importance: float = 1.0, keep_masks: bool = False) -> LinearCosts:
    """Build the error table from group sensitivities computed for each candidate k, scaled by `importance`."""
    errors, order = {}, {}
    for k, sens in sens_by_k.items():
        benefit = sens.tile_benefit(tile_rows).cpu()  # [T, G]
        srt, idx = torch.sort(benefit, dim=1, descending=True)
        base = float(sens.err2.sum())
        cum = torch.cat([torch.zeros(1), srt.sum(dim=0).cumsum(0)])
        errors[k] = (base - cum).clamp(min=0).double() * importance
        order[k] = idx
    masks = {k: sens.outlier_mask for k, sens in sens_by_k.items() if k > 0} if keep_masks else {}
    return LinearCosts(name, out_features, in_features, group_size, tile_rows, errors, order, masks)
