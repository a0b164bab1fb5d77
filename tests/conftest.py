"""Fixtures shared by every test folder."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "robustness"))


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A 258-token byte-level tokenizer (256 bytes + <s> + </s>), no chat template."""
    from tinymodel import byte_tokenizer as build

    return build()
