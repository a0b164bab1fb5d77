"""The loss-gradient pass through the CLI: skipped with --fisher-samples 0 (quantize then says so and allocates by
relative error), added to a finished calibration by rerunning calibrate, and recorded in the provenance."""

import json

from conftest import invoke


def calibrate(model, out, text, *extra):
    return invoke(["calibrate", model, "--dataset", text, "--samples", "4", "--seq-len", "64", "--out", out, *extra])


def allocation_used(tmp_path, model, calib, name):
    out = tmp_path / name
    res = invoke(["quantize", model, "--calib", calib, "--target-bits", "3.0", "--out", out])
    assert res.exit_code == 0, res.output
    info = invoke(["inspect", out, "--json"])
    return res.output, json.loads(info.stdout.strip().splitlines()[-1])["allocation_used"]


def test_loss_gradients_optional_then_added(tmp_path, tiny_model, small_text):
    calib = tmp_path / "calib"
    assert calibrate(tiny_model, calib, small_text, "--fisher-samples", "0").exit_code == 0
    assert not (calib / "fisher.safetensors").exists()
    output, used = allocation_used(tmp_path, tiny_model, calib, "q-relative")
    assert "has no loss gradients" in output and used == "relative"
    res = calibrate(tiny_model, calib, small_text)  # same inputs: the Hessians are kept, the gradients added
    assert res.exit_code == 0 and "already complete" in res.output, res.output
    assert (calib / "fisher.safetensors").exists()
    output, used = allocation_used(tmp_path, tiny_model, calib, "q-fisher")
    assert "has no loss gradients" not in output and used == "fisher"
