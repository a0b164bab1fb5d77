"""Nothing lost: SIGINT/SIGTERM to a real `mpq` process mid-run leaves the previous state intact, no half-written
artifact or temporary file, and a calibration that resumes where its last checkpoint left it.

The processes run tests/robustness/slow_cli.py: the real entry point with each layer slowed by a sleep, so the
signal lands mid-run at a known step instead of racing a run that takes milliseconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import invoke
from tinymodel import cli_env, save_tiny_model

SLOW_CLI = Path(__file__).parent / "slow_cli.py"


def run_until(args, marker: str, sig, delay: float, env=None, timeout: float = 120) -> tuple[int, str]:
    """Start slow_cli with `args`, send `sig` once `marker` appears on stderr; (exit code, stderr)."""
    # a job started in the background of a non-interactive shell inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, str(SLOW_CLI), str(delay), *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=cli_env(**(env or {})),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            raise AssertionError(f"never saw {marker!r}: {''.join(seen)}")
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, "".join(seen) + rest


def no_temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("six") / "six", layers=6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_calibrate_interrupted_resumes(tmp_path, six_layers, small_text, sig):
    args = ["calibrate", six_layers, "--dataset", small_text, "--samples", "8", "--seq-len", "64", "--device", "cpu"]
    out = tmp_path / "calib"
    code, err = run_until([*args, "--out", out], "calibrate: layer 2/6", sig, delay=0.5, env={"MPQ_CHECKPOINT_SECONDS": "0"})
    assert code == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    import json

    job = json.loads((out / "calibration.json").read_text())
    stopped = job["hidden_layer"]  # 2 unless this test was descheduled for longer than a slowed layer
    assert not job["complete"] and 2 <= stopped < 6
    assert not no_temporaries(out), no_temporaries(out)

    res = invoke([*args, "--out", out], env={"MPQ_CHECKPOINT_SECONDS": "0"})
    assert res.exit_code == 0, res.output
    assert f"resuming from layer {stopped}" in res.output
    fresh = tmp_path / "fresh"
    assert invoke([*args, "--out", fresh]).exit_code == 0
    for i in range(6):
        a, b = load_file(str(out / f"layer_{i:03d}.safetensors")), load_file(str(fresh / f"layer_{i:03d}.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"layer {i} differs after resume"
    assert json.loads((out / "calibration.json").read_text())["complete"]


def test_quantize_interrupted_writes_nothing(tmp_path, tiny_model):
    out = tmp_path / "art"
    args = ["quantize", tiny_model, "--calib", "none", "--target-bits", "3.0", "--out", out]
    code, err = run_until(args, "measure: layer 2/2", signal.SIGTERM, delay=0.3)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted:"), err
    assert list(tmp_path.iterdir()) == []


def test_quantize_interrupted_while_writing_keeps_the_previous_artifact(tmp_path, tiny_model, artifact):
    import shutil

    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["quantize", tiny_model, "--calib", "none", "--target-bits", "3.5", "--out", out, "--overwrite"]
    code, err = run_until(args, "writing tensors", signal.SIGTERM, delay=0.0, env={"MPQ_TEST_SLOW_WRITE": "30"})
    assert code == 130, err
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "the temporary folder must be gone"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_calibrate_stopped_between_checkpoint_writes_resumes(tmp_path, tiny_model, small_text, monkeypatch):
    """A stop after the hidden-state checkpoint is written but before the job file catches up: the checkpoint's own
    layer number is trusted, and the resumed Hessians equal those of an uninterrupted run."""
    import json

    import mpq.calib.capture as capture

    real, calls = capture.atomic_write_text, []

    def stop_on_second_job_write(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, text)

    args = ["calibrate", tiny_model, "--dataset", small_text, "--samples", "4", "--seq-len", "64", "--device", "cpu"]
    out, fresh = tmp_path / "calib", tmp_path / "fresh"
    monkeypatch.setattr(capture, "atomic_write_text", stop_on_second_job_write)
    res = invoke([*args, "--out", out], env={"MPQ_CHECKPOINT_SECONDS": "0"})
    assert res.exit_code == 130 and "interrupted" in res.stderr
    assert json.loads((out / "calibration.json").read_text())["hidden_layer"] == 0
    monkeypatch.setattr(capture, "atomic_write_text", real)
    res = invoke([*args, "--out", out])
    assert res.exit_code == 0 and "resuming from layer 1" in res.output, res.output
    assert invoke([*args, "--out", fresh]).exit_code == 0
    for i in range(2):
        a, b = load_file(str(out / f"layer_{i:03d}.safetensors")), load_file(str(fresh / f"layer_{i:03d}.safetensors"))
        assert all((a[k] == b[k]).all() for k in a)


def test_train_predictors_interrupted_while_writing_keeps_the_artifact_and_resumes(tmp_path, artifact, small_text):
    """SIGTERM while the specee tensors are being written into the artifact: the artifact stays byte for byte as it
    was, no temporary folder is left, the finished stages are kept, and a rerun completes a verifiable artifact."""
    import json
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    args = ["train-predictors", art, "--dataset", small_text, "--samples", "4", "--seq-len", "64", "--draft-vocab", "64"]
    code, err = run_until(args, "writing tensors", signal.SIGTERM, delay=0.0, env={"MPQ_TEST_SLOW_WRITE": "30"})
    assert code == 130, err
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.specee-work"], "no temporary folder left"
    done = json.loads((tmp_path / "art.specee-work" / "job.json").read_text())["done"]
    assert done and "write" not in done

    assert invoke(args).exit_code == 0
    res = invoke(["verify", art, "--device", "cpu"])
    assert res.exit_code == 0 and "predictors  PASS" in res.stdout, res.output
