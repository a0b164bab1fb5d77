"""Progress output: one JSON object per step with `--progress json`, plain lines otherwise, a bad mode refused."""

import json

import pytest

from conftest import assert_one_line_error, invoke
from mpq import progress
from tinymodel import hamlet_text


@pytest.fixture(autouse=True)
def restore_mode():
    saved = progress._mode["value"]
    yield
    progress._mode["value"] = saved


def test_json_lines_count_steps_and_estimate_time(capsys):
    progress.set_progress_mode("json")
    with progress.layer_progress(4, "calibrate", start=1, unit="layer") as advance:
        for i in range(1, 4):
            advance(i, "ok")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["done"] for e in events] == [2, 3, 4] and {e["total"] for e in events} == {4}
    assert all(e["event"] == "progress" and e["what"] == "calibrate" and e["unit"] == "layer" for e in events)
    assert events[-1]["eta_s"] == 0 and events[0]["eta_s"] >= 0 and events[-1]["note"] == "ok"


def test_plain_lines_name_the_unit(capsys):
    progress.set_progress_mode("plain")
    with progress.layer_progress(3, "collect hidden states", unit="window") as advance:
        advance(0)
    assert capsys.readouterr().err.strip() == "collect hidden states: window 1/3"


def test_cli_json_progress_on_a_real_pass(tmp_path, tiny_model):
    text = tmp_path / "small.txt"
    text.write_text(hamlet_text()[:20000])
    res = invoke(["--progress", "json", "calibrate", tiny_model, "--dataset", text, "--samples", "4", "--seq-len", "64",
                  "--out", tmp_path / "calib"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    passes = {e["what"]: e for e in events}  # the last event of each pass
    assert set(passes) == {"calibrate", "loss gradients"}
    assert all(e["done"] == e["total"] for e in passes.values()) and passes["loss gradients"]["unit"] == "window"


def test_cli_refuses_an_unknown_mode(tmp_path):
    assert_one_line_error(invoke(["--progress", "loud", "calibrate", tmp_path / "m", "--out", tmp_path / "c"]),
                          "unknown --progress 'loud'", tmp_path / "c")
