"""`mpq verify` passes on a good artifact and fails with the right line on each kind of damage."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke
from safetensors_edit import edit_manifest, flip_byte, swap_tensors, tensor_span


def lines(res) -> dict[str, str]:
    """{check name: its line} of the verify output."""
    out = {}
    for line in res.stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name in ("integrity", "kernels", "quality", "predictors"):
            out[name] = line
    return out


def status(line: str) -> str:
    return line.split()[1]


def test_passes_on_a_good_artifact(artifact):
    res = invoke(["verify", artifact, "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    got = lines(res)
    assert [status(got[n]) for n in ("integrity", "kernels", "quality", "predictors")] == ["PASS", "PASS", "PASS", "N/A"]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["passed"] and [c["name"] for c in result["checks"]] == ["integrity", "kernels", "quality", "predictors"]
    assert "sha256 ok" in got["integrity"] and "bound 1e-05" in got["kernels"] and "recorded on shakespeare:hamlet 2x256" in got["quality"]


def test_flipped_byte_in_a_weight_fails_integrity(art_copy):
    name = "model.layers.1.mlp.down_proj.q2"
    flip_byte(art_copy / "model.safetensors", name, index=5)
    res = invoke(["verify", art_copy, "--device", "cpu"])
    got = lines(res)
    assert res.exit_code == 1 and status(got["integrity"]) == "FAIL"
    assert "1 sha256 mismatch" in got["integrity"] and name in got["integrity"]
    assert all(status(got[n]) == "SKIPPED" for n in ("kernels", "quality", "predictors"))


def differing_pair(f) -> tuple[str, str]:
    """Two tensors with the same dtype and shape but different bytes: swapping them keeps the header valid."""
    from mpq.artifact import read_manifest

    _, manifest, _ = read_manifest(f.parent)
    raw, seen = f.read_bytes(), {}
    for name, e in sorted(manifest["tensors"].items()):
        key = (e["dtype"], tuple(e["shape"]))
        start, end = tensor_span(f, name)
        if end > start:
            for other in seen.get(key, []):
                o_start, o_end = tensor_span(f, other)
                if raw[o_start:o_end] != raw[start:end]:
                    return other, name
            seen.setdefault(key, []).append(name)
    raise AssertionError("no two same-shape tensors differ")


def test_swapped_tensors_fail_integrity(art_copy):
    f = art_copy / "model.safetensors"
    a, b = differing_pair(f)
    swap_tensors(f, a, b)
    res = invoke(["verify", art_copy, "--device", "cpu"])
    line = lines(res)["integrity"]
    assert res.exit_code == 1 and status(line) == "FAIL"
    assert "2 sha256 mismatch" in line and a in line and b in line


def test_broken_kernel_fails_kernels(artifact):
    res = invoke(["verify", artifact, "--device", "cpu"], env={"MPQ_TEST_BREAK_KERNEL": "1"})
    got = lines(res)
    assert res.exit_code == 1
    assert status(got["integrity"]) == "PASS" and status(got["kernels"]) == "FAIL" and status(got["quality"]) == "PASS"
    assert "over the bound" in got["kernels"]


def test_quality_regression_fails_quality(artifact):
    res = invoke(["verify", artifact, "--device", "cpu"], env={"MPQ_TEST_QUALITY_REGRESSION": "1"})
    got = lines(res)
    assert res.exit_code == 1
    assert status(got["kernels"]) == "PASS" and status(got["quality"]) == "FAIL"


def test_config_that_disagrees_with_the_tensors_fails_integrity(art_copy):
    cfg = json.loads((art_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (art_copy / "config.json").write_text(json.dumps(cfg))
    line = lines(invoke(["verify", art_copy, "--device", "cpu"]))["integrity"]
    assert status(line) == "FAIL" and "config says 3 layers" in line


def test_missing_reference_is_not_applicable(art_copy):
    edit_manifest(art_copy / "model.safetensors", lambda m: m.pop("verify_reference"))
    res = invoke(["verify", art_copy, "--device", "cpu"])
    line = lines(res)["quality"]
    assert res.exit_code == 0 and status(line) == "N/A" and "no figure recorded" in line


@pytest.mark.parametrize("finite", [True, False])
def test_foreign_predictor_tensors_fail(tmp_path, artifact, finite):
    """specee.* tensors that train-predictors did not write fail: non-finite values, or no recorded agreement to
    hold exit decoding to (trained predictors pass: tests/robustness/test_interrupt.py)."""
    from mpq.artifact import load_artifact, save_artifact
    from mpq.models import load_tokenizer, resolve_model

    art = load_artifact(artifact)
    extras = {"specee.layer0.weight": torch.randn(4, 8).half()}
    if not finite:
        extras["specee.layer0.weight"][0, 0] = float("nan")
    keep = {k: v for k, v in art.manifest.items() if k not in ("tensors", "linears", "format_version", "quant_version")}
    out = tmp_path / "with-specee"
    save_artifact(out, config=art.config, tokenizer=load_tokenizer(resolve_model(str(artifact))), linears=art.linears,
                  floats=art.floats, manifest=dict(keep, specee={"version": 1}), extras=extras)
    line = lines(invoke(["verify", out, "--device", "cpu"]))["predictors"]
    assert status(line) == "FAIL"
    assert ("no agreement rate recorded" if finite else "non-finite values") in line


def test_independent_dequantize_agrees_with_the_reference_path(artifact):
    """The two dequantizations are written independently; they must agree exactly (up to fp32 rounding)."""
    from mpq.artifact import load_artifact
    from mpq.verify import independent_dequantize

    art = load_artifact(artifact)
    for p in art.linears.values():
        torch.testing.assert_close(independent_dequantize(p), p.dequantize(torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a GPU")
def test_passes_on_cuda(artifact):
    res = invoke(["verify", artifact, "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert "Triton" in lines(res)["kernels"]
