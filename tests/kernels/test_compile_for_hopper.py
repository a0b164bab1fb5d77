"""The kernels' GPU paths compile for an H100 (sm_90) here, without a GPU: tests/kernels/hopper_compile.py in a
process without the interpreter. A kernel that only the interpreter accepts (a global the GPU compiler refuses),
inline PTX that ptxas rejects, or a kernel no case compiles fails here rather than on the lent GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("hopper_compile.py")


def test_every_fast_path_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    lines = run.stdout.splitlines()
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert run.returncode == 0 and not failed and lines, "\n".join(failed) or run.stderr[-2000:]
    assert len([ln for ln in lines if ln.startswith("ok ")]) >= 20
