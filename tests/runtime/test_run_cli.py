"""`mpq run` end to end on a tiny artifact (CPU), and its one-line errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from engine_testlib import rtn_artifact, tiny_config, tiny_hf_model
from mpq.cli import app


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, byte_tokenizer):
    out = tmp_path_factory.mktemp("run") / "art"
    rtn_artifact(tiny_hf_model(tiny_config()), out, byte_tokenizer)
    return out


def test_run_json(artifact):
    res = CliRunner().invoke(app, ["run", str(artifact), "--prompt", "hello there", "--max-new-tokens", "6", "--json",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert 1 <= out["tokens"] <= 6 and isinstance(out["text"], str)
    assert out["prefill_ms"] > 0 and out["prompt_tokens"] == len("hello there")
    assert out["peak_mem_gb"] is None and out["device"] == "cpu"
    if out["tokens"] > 1:
        assert out["decode_ms_per_token"] > 0


def test_run_streams_text_from_stdin(artifact):
    res = CliRunner().invoke(app, ["run", str(artifact), "--max-new-tokens", "4", "--device", "cpu", "--temperature",
                                   "0.7", "--seed", "1"], input="from stdin")
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "no/such/folder", "--prompt", "x"], "not found"),
    (["run", "{art}", "--prompt", "x", "--device", "tpu"], "unknown device"),
    (["run", "{art}", "--prompt", "x", "--top-p", "0"], "top-p"),
    (["run", "{art}", "--prompt", "   "], "empty"),
])
def test_bad_input_is_one_line(artifact, args, message):
    res = CliRunner().invoke(app, [a.format(art=artifact) for a in args])
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_refused(artifact):
    res = CliRunner().invoke(app, ["run", str(artifact), "--prompt", "x", "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.stderr


@pytest.mark.parametrize("flag, in_place", [([], True), (["--deterministic"], False)])
def test_deterministic_turns_pending_sums_off(artifact, monkeypatch, flag, in_place):
    """--deterministic: the engine's split-K GEMVs hand their partials over in one fixed order (no pending sums,
    whose atomic additions come in a varying order); the engine it ran is checked."""
    from mpq.runtime import run as run_module

    engines = []
    load = run_module.load_engine
    monkeypatch.setattr(run_module, "load_engine", lambda *a: engines.append(load(*a)) or engines[-1])
    res = CliRunner().invoke(app, ["run", str(artifact), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                                   *flag])
    assert res.exit_code == 0, res.output
    assert engines[0].model.sum_in_place is in_place
