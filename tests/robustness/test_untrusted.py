"""Untrusted files: tensors only through safetensors (never pickle), YAML/JSON through safe loaders, and no
remote code unless --trust-remote-code is given. (Pickle weights refused: test_bad_input.py; reader fuzz:
test_fuzz.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.joinpath("mpq").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")])
FORBIDDEN = {
    r"\btorch\.load\(": "torch.load unpickles",
    r"^\s*import pickle|^\s*from pickle |\bpickle\.loads?\(": "pickle",
    r"\byaml\.(load|unsafe_load|full_load)\(": "an unsafe YAML loader",
    r"trust_remote_code\s*=\s*True": "remote code switched on in code",
    r"\bweights_only\s*=\s*False": "unpickling allowed",
}


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_no_unsafe_loader_in_the_sources(pattern):
    assert SOURCES, "no sources found"
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line)]
    assert not hits, f"{FORBIDDEN[pattern]}: {hits}"


def test_remote_code_is_off_by_default():
    import typer.main

    from mpq.cli import app

    group = typer.main.get_command(app)
    seen = 0
    for name, command in group.commands.items():
        for param in getattr(command, "params", []):
            if param.name == "trust_remote_code":
                seen += 1
                assert param.default is False, name
    assert seen >= 2  # calibrate and quantize at least


def test_recipe_with_a_python_tag_is_refused(tmp_path, tiny_model):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'target_bits: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = tmp_path / "q"
    res = invoke(["quantize", tiny_model, "--calib", "none", "--recipe", recipe, "--out", out])
    assert_one_line_error(res, "is not valid YAML", out)
    assert not marker.exists()
