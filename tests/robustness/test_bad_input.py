"""Every bad input gives one line `error: ...`, exit code 2, no traceback, and writes nothing.

Each test drives the real CLI (typer's CliRunner, in process). docs/troubleshooting.md lists the same cases.
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from conftest import assert_one_line_error, invoke
from safetensors_edit import edit_manifest, flip_byte, read_header, rewrite_header
from tinymodel import save_tiny_model


def quantize(model, out, *extra):
    return invoke(["quantize", model, "--calib", "none", "--target-bits", "3.0", "--out", out, *extra])


def calibrate(model, out, dataset, *extra):
    return invoke(["calibrate", model, "--dataset", dataset, "--samples", "4", "--seq-len", "64", "--out", out,
                   "--device", "cpu", *extra])


# ---- the model argument ------------------------------------------------------------------------------------


def test_missing_model_path(tmp_path, small_text):
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tmp_path / "no-such-model", out, small_text), "model path not found", out)


def test_empty_model_path(tmp_path, small_text):
    out = tmp_path / "calib"
    assert_one_line_error(calibrate("", out, small_text), "empty model path", out)


def test_empty_model_folder(tmp_path, small_text):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "q"
    assert_one_line_error(quantize(tmp_path / "empty", out), "no config.json", out)


def test_hub_id_while_offline(tmp_path, small_text):
    out = tmp_path / "calib"
    res = invoke(["calibrate", "nobody-mpq-test/no-such-model", "--dataset", small_text, "--out", out],
                 env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(res, "could not fetch 'nobody-mpq-test/no-such-model' from the hub (offline", out)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=258).save_pretrained(str(tmp_path / "gpt2"))
    out = tmp_path / "q"
    assert_one_line_error(quantize(tmp_path / "gpt2", out), "unsupported architecture 'gpt2'", out)


def test_truncated_model_weights(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "q"
    assert_one_line_error(quantize(model, out), "could not load model weights", out)


def test_pickle_weights_are_refused(tmp_path, tiny_model):
    """Untrusted files: a float model whose only weights are a pickle (pytorch_model.bin) is not unpickled."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    torch.save(AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict(), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    out = tmp_path / "q"
    assert_one_line_error(quantize(model, out), "pickle checkpoints such as pytorch_model.bin are never loaded", out)


# ---- damaged artifacts (read by `mpq dequantize`, a writer, so "nothing written" is checked too) ---------------


def dequantize(art, out):
    return invoke(["dequantize", art, "--out", out])


def test_truncated_artifact(art_copy, tmp_path):
    f = art_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), "claims bytes beyond the file (truncated or corrupted)", out)


def test_corrupted_artifact_header(art_copy, tmp_path):
    f = art_copy / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"\xff" * 32
    f.write_bytes(bytes(raw))
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), "unreadable header", out)


def test_header_claims_shapes_larger_than_the_file(art_copy, tmp_path):
    name = "model.embed_tokens.weight"

    def grow(header):
        header[name]["shape"] = [1 << 20, 1 << 20]
        start = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [start, start + 2 * (1 << 40)]

    rewrite_header(art_copy / "model.safetensors", grow)
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), f"tensor '{name}' claims bytes beyond the file", out)


def test_tensor_with_the_wrong_dtype(art_copy, tmp_path):
    """model.norm.weight stored as fp32 while the manifest says fp16 (same bytes count is not required)."""
    from safetensors.torch import load_file, save_file

    f = art_copy / "model.safetensors"
    header, _ = read_header(f)
    tensors = load_file(str(f))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    save_file(tensors, str(f), metadata=header["__metadata__"])
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), "tensor 'model.norm.weight': dtype/shape differ from the manifest", out)


def test_manifest_hash_mismatch(art_copy, tmp_path):
    flip_byte(art_copy / "model.safetensors", "model.layers.0.mlp.up_proj.s2", index=3)
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), "sha256 mismatch", out)


def test_format_version_from_the_future(art_copy, tmp_path):
    edit_manifest(art_copy / "model.safetensors", lambda m: m.update(format_version=2))
    out = tmp_path / "hf"
    assert_one_line_error(dequantize(art_copy, out), "artifact format v2 is newer than this mpq", out)


def test_verify_of_a_missing_artifact(tmp_path):
    assert_one_line_error(invoke(["verify", tmp_path / "nothing", "--device", "cpu"]), "artifact folder not found")


# ---- quantize options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["1.5", "16.5"])
def test_target_bits_outside_the_format(tmp_path, tiny_model, bits):
    out = tmp_path / "q"
    res = invoke(["quantize", tiny_model, "--calib", "none", "--target-bits", bits, "--out", out])
    assert_one_line_error(res, f"--target-bits {bits} is outside what the format can reach", out)


@pytest.mark.parametrize("m", ["x", "0", "1,,-4", ""])
def test_bench_kernels_activation_rows(tmp_path, m):
    out = tmp_path / "k.json"
    assert_one_line_error(invoke(["bench", "kernels", "--m", m, "--json", out]), "--m takes activation row counts", out)


def test_group_size_that_does_not_divide_the_input(tmp_path, tiny_model):
    out = tmp_path / "q"
    assert_one_line_error(quantize(tiny_model, out, "--group-size", "128"),
                          "group size 128 does not divide the input dimension 64", out)


def test_unsupported_group_size(tmp_path, tiny_model):
    out = tmp_path / "q"
    assert_one_line_error(quantize(tiny_model, out, "--group-size", "48"), "--group-size 48 is not supported", out)


def test_negative_fisher_samples(tmp_path, tiny_model, small_text):
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tiny_model, out, small_text, "--fisher-samples", "-1"),
                          "--fisher-samples must be 0 (skip the loss-gradient pass) or positive", out)


def test_calibration_folder_from_another_model(tmp_path, tiny_model, small_text):
    other = save_tiny_model(tmp_path / "other", layers=3, seed=1)
    calib = tmp_path / "calib-other"
    assert calibrate(other, calib, small_text).exit_code == 0
    out = tmp_path / "q"
    res = invoke(["quantize", tiny_model, "--calib", calib, "--target-bits", "3.0", "--out", out])
    assert_one_line_error(res, "was made for another model", out)


def test_calibration_folder_that_is_not_one(tmp_path, tiny_model):
    (tmp_path / "junk").mkdir()
    out = tmp_path / "q"
    res = invoke(["quantize", tiny_model, "--calib", tmp_path / "junk", "--target-bits", "3.0", "--out", out])
    assert_one_line_error(res, "not a calibration folder", out)


# ---- data --------------------------------------------------------------------------------------------------


def test_dataset_path_that_does_not_exist(tmp_path, tiny_model):
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tiny_model, out, tmp_path / "none.txt"), "dataset path not found", out)


def test_empty_dataset_file(tmp_path, tiny_model):
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tiny_model, out, tmp_path / "empty.txt"), "dataset is empty", out)


def test_empty_dataset_folder(tmp_path, tiny_model):
    (tmp_path / "texts").mkdir()
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tiny_model, out, tmp_path / "texts"), "dataset folder has no", out)


def test_too_few_tokens_for_the_samples(tmp_path, tiny_model):
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question. " * 4)
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(tiny_model, out, tmp_path / "short.txt"), "has 172 tokens: 2 windows of 64 fit, 4 requested", out)


# ---- devices and outputs -----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
@pytest.mark.parametrize("command", ["calibrate", "verify"])
def test_cuda_requested_but_absent(tmp_path, tiny_model, small_text, artifact, command):
    out = tmp_path / "calib"
    if command == "calibrate":
        res = invoke(["calibrate", tiny_model, "--dataset", small_text, "--out", out, "--device", "cuda"])
    else:
        res = invoke(["verify", artifact, "--device", "cuda"])
    assert_one_line_error(res, "CUDA requested but no GPU is available", out)


def test_output_folder_that_exists(tmp_path, tiny_model):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(quantize(tiny_model, out), "output folder exists", tmp_path / "nothing")
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_existing_output(tmp_path, tiny_model):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res = quantize(tiny_model, out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"], "no temporary or old folders left"


def test_calibration_output_folder_that_is_something_else(tmp_path, tiny_model, small_text):
    out = tmp_path / "calib"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(calibrate(tiny_model, out, small_text), "output folder exists and is not a calibration", tmp_path / "nothing")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_an_artifact(tmp_path, tiny_model, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    out = tmp_path / "q"
    assert_one_line_error(quantize(tiny_model, out), "No space left on device", out)
    assert list(tmp_path.iterdir()) == [], "the temporary artifact folder must be removed"


def test_disk_full_while_writing_a_calibration(tmp_path, tiny_model, small_text, monkeypatch):
    """The first layer's Hessians fail to write: the job file stays, no partial layer or temporary file does."""
    import safetensors.torch

    written = []

    def half_then_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")  # a real writer dies with part of the file on disk
        written.append(filename)
        _disk_full()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    out = tmp_path / "calib"
    res = calibrate(tiny_model, out, small_text)
    assert_one_line_error(res, "No space left on device")
    assert written and sorted(p.name for p in out.iterdir()) == ["calibration.json"]
    assert json.loads((out / "calibration.json").read_text())["next_layer"] == 0


def test_truncated_model_weights_while_calibrating(tmp_path, tiny_model, small_text):
    """The weights are read after the job file is opened: a fresh calibration folder must not survive the error."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "calib"
    assert_one_line_error(calibrate(model, out, small_text), "could not load model weights", out)
