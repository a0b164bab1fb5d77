"""Fixtures for the SpecEE tests: the engine tests' tiny-model helpers (`byte_tokenizer` is in tests/conftest.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))


