"""Recipes: versioned YAML defaults for `mpq quantize` (recipes/NAME.yaml), loaded with a safe loader."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mpq.errors import MpqError

RECIPE_VERSION = 1
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
ALLOCATIONS = ("fisher", "relative", "absolute")


@dataclass
class Recipe:
    version: int = RECIPE_VERSION
    name: str = "default"
    target_bits: float = 3.0
    group_size: int | str = "auto"  # "auto": 128 where it divides the input width, else 64
    tile_rows: int = 16
    outliers: int | str = "auto"  # "auto": the allocator picks 0 or 1 per linear
    # "fisher": weight each linear's errors by its loss-gradient energy (needs the calibration's fisher pass; without
    # it, falls back to "relative"); "relative": errors relative to each linear's output energy; "absolute"
    allocation: str = "fisher"
    gptq: bool = True
    act_order: bool = True
    gptq_aware: bool = True  # scale each linear's sensitivities by its measured GPTQ gain (2 GPTQ runs per linear)
    damp: float = 0.01
    refit_scales: bool = False  # after GPTQ, the group scales refitted by least squares on the Hessian, per row
    # GPTQ rounds each row tile's 2-bit groups first, then refits its 4-bit grids to the moved weights and rounds them
    coarse_first: bool = True
    # module suffixes whose linears (same input) share one (4-bit tiles, outliers) state in each layer, so that the
    # runtime stacks each set into one GEMV launch (recipes/fast.yaml); [] lets every linear take its own, and
    # untied parts that end in one state still stack
    tied_sets: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # module pattern -> 2 | 4 | 16
    max_ppl_ratio: float = 3.0  # quality gate on held-back calibration windows
    gate_windows: int = 4
    gate_seq_len: int = 512

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise MpqError("recipe must be a mapping of option: value")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MpqError(f"recipe has unknown keys {unknown} (known: {sorted(known)})")
        if int(data.get("version", RECIPE_VERSION)) > RECIPE_VERSION:
            raise MpqError(f"recipe version {data['version']} is newer than this mpq understands ({RECIPE_VERSION})")
        try:
            recipe = cls(**data)
        except TypeError as e:
            raise MpqError(f"bad recipe: {e}") from None
        recipe.check()
        return recipe

    def check(self) -> None:
        for key in ("gptq", "act_order", "gptq_aware", "refit_scales", "coarse_first"):  # YAML 'no' is a bool, '"no"' a string
            if not isinstance(getattr(self, key), bool):
                raise MpqError(f"recipe {key} must be true or false, not {getattr(self, key)!r}")
        if not (self.group_size == "auto" or isinstance(self.group_size, int)):
            raise MpqError(f"recipe group_size must be 'auto' or an integer, not {self.group_size!r}")
        if not (self.outliers == "auto" or isinstance(self.outliers, int)):
            raise MpqError(f"recipe outliers must be 'auto' or an integer, not {self.outliers!r}")
        if self.allocation not in ALLOCATIONS:
            raise MpqError(f"recipe allocation must be one of {', '.join(ALLOCATIONS)}, not {self.allocation!r}")
        if not (isinstance(self.tied_sets, list) and all(isinstance(t, list) and all(isinstance(m, str) for m in t)
                                                         for t in self.tied_sets)):
            raise MpqError("recipe tied_sets must be a list of lists of module suffixes, e.g. [[mlp.gate_proj, mlp.up_proj]]")
        if not isinstance(self.overrides, dict):
            raise MpqError("recipe overrides must be a mapping PATTERN: 2|4|16")

    def group_size_for(self, in_features: int) -> int:
        if self.group_size == "auto":
            return 128 if in_features % 128 == 0 else 64
        return int(self.group_size)


def load_recipe(path: Path | str | None) -> Recipe:
    """A recipe from a YAML path or a name under recipes/; None gives the built-in defaults."""
    import yaml

    if path is None:
        return Recipe()
    p = Path(path)
    if not p.exists() and (RECIPE_DIR / f"{path}.yaml").exists():
        p = RECIPE_DIR / f"{path}.yaml"
    try:
        data = yaml.safe_load(p.read_text())
    except OSError:
        raise MpqError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        raise MpqError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return Recipe.from_dict(data or {})
