"""Shared fixtures: a tiny float model folder, an artifact quantized from it through the CLI, and helpers
for asserting the one-line error contract (exit code, one stderr line, no traceback, nothing written)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import hamlet_text, save_tiny_model  # noqa: E402


def invoke(args, env=None):
    from mpq.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_one_line_error(res, message: str, *unwritten: Path, code: int = 2):
    """The bad-input contract: exit `code`, one `error:` line naming the problem (the last thing on stderr, after
    any progress lines), no traceback, nothing written."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    err = lines[-1] if lines else ""
    assert err.startswith("error: ") and message in err, res.stderr
    assert sum(line.startswith("error") for line in lines) == 1 and len(err) < 400, res.stderr
    print(f"\n[one-line error] {err}")  # pytest -s shows every message (docs/troubleshooting.md quotes them)
    for p in unwritten:
        assert not p.exists(), f"{p} was written"
        strays = [q.name for q in p.parent.glob(f".{p.name}*")]
        assert not strays, f"temporary files left behind: {strays}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """A local calibration text (40k bytes of Hamlet): tokenizing it takes milliseconds."""
    p = tmp_path_factory.mktemp("data") / "small.txt"
    p.write_text(hamlet_text()[:40000])
    return p


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, tiny_model) -> Path:
    """The tiny model quantized (data-free) through `mpq quantize`; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-3b"
    res = invoke(["quantize", tiny_model, "--calib", "none", "--target-bits", "3.0", "--out", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def art_copy(artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst
