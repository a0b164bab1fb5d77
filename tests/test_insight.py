"""Issue 8 on a tiny model through the real CLI: plan-only, exact pins, the quality gate, provenance via
`inspect --json`, pictures, and a sweep that reuses one calibration."""

import json

import pytest
from typer.testing import CliRunner

from tinymodel import hamlet_text, save_tiny_model  # tests/robustness, on the path through tests/conftest.py

from mpq.artifact import load_artifact
from mpq.cli import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("insight")
    model = save_tiny_model(root / "tiny")
    text = root / "text.txt"
    text.write_text(hamlet_text()[:60000])
    calib = root / "calib"
    res = invoke("calibrate", model, "--dataset", text, "--samples", 6, "--seq-len", 128, "--out", calib, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return root, model, calib


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_plan_only_writes_plan_and_no_artifact(setup):
    root, model, calib = setup
    out = root / "planned"
    res = invoke("quantize", model, "--calib", calib, "--target-bits", 3.0, "--out", out, "--plan-only")
    assert res.exit_code == 0, res.output
    plan = json.loads(out.with_suffix(".plan.json").read_text())
    assert not out.exists()
    assert plan["bits_per_weight"] <= 3.0 and len(plan["linears"]) == 2 * 7
    assert all({"shape", "n4", "outliers", "bits_per_weight", "predicted_error"} <= set(r) for r in plan["linears"])


def test_overrides_honoured_exactly_and_recorded(setup):
    root, model, calib = setup
    out = root / "pinned"
    res = invoke("quantize", model, "--calib", calib, "--target-bits", 6.8, "--out", out, "--max-ppl-ratio", 100,
                 "--override", "model.layers.0.*=4", "--override", "*.down_proj=16",
                 "--override", "model.layers.1.self_attn.q_proj=2")
    assert res.exit_code == 0, res.output
    art = load_artifact(out)
    for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        p = art.linears[f"model.layers.0.{s}"]
        assert p.n4 == p.groups and p.n2 == 0
    q = art.linears["model.layers.1.self_attn.q_proj"]
    assert q.n4 == 0 and q.outliers == 0
    for i in (0, 1):
        assert f"model.layers.{i}.mlp.down_proj" not in art.linears
        assert f"model.layers.{i}.mlp.down_proj.weight" in art.floats
    pins = {r["name"]: r["pinned"] for r in art.manifest["plan"]["linears"]}
    assert pins["model.layers.0.mlp.up_proj"] == 4 and pins["model.layers.1.mlp.down_proj"] == 16
    assert art.manifest["overrides"] == {"model.layers.0.*": 4, "*.down_proj": 16, "model.layers.1.self_attn.q_proj": 2}
    assert art.bits_per_weight <= 6.8


def test_quality_gate_refuses_broken_quantization(setup):
    root, model, calib = setup
    out = root / "broken"
    env = {"MPQ_TEST_BREAK_QUANTIZATION": "1"}
    res = invoke("quantize", model, "--calib", calib, "--target-bits", 3.0, "--out", out, env=env)
    assert res.exit_code == 3 and "quality gate failed" in res.stderr and not out.exists()
    assert not list(root.glob(".broken*"))
    res = invoke("quantize", model, "--calib", calib, "--target-bits", 3.0, "--out", out, "--force", env=env)
    assert res.exit_code == 0 and out.exists()
    assert load_artifact(out).manifest["gate"]["passed"] is False


def test_provenance_round_trips_through_inspect(setup):
    root, model, calib = setup
    out = root / "prov"
    res = invoke("quantize", model, "--calib", calib, "--target-bits", 3.0, "--out", out, "--max-ppl-ratio", 100)
    assert res.exit_code == 0, res.output
    png = root / "alloc.png"
    res = invoke("inspect", out, "--json", "--plot", png)
    assert res.exit_code == 0, res.output
    info = last_json(res.stdout)
    manifest = load_artifact(out).manifest
    for key in ("tool", "source", "calibration", "recipe", "allocation_used", "overrides", "plan", "bits_per_weight", "gate"):
        assert info[key] == manifest[key]
    assert info["calibration"]["samples"] == 6 and info["calibration"]["seq_len"] == 128
    assert info["calibration"]["data"]["sha256"] and info["source"]["weights_sha256"]
    assert {"mpq", "commit", "torch", "transformers"} <= set(info["tool"])
    assert info["gate"]["ppl"] > 0 and png.stat().st_size > 1000


def test_sweep_reuses_one_calibration(setup, monkeypatch):
    root, model, calib = setup
    import mpq.calib.capture as capture

    def no_capture(*a, **k):
        raise AssertionError("sweep must not capture again")

    monkeypatch.setattr(capture, "calibrate", no_capture)
    monkeypatch.setattr(capture, "_HessianHooks", no_capture)
    png = root / "sweep.png"
    text = root / "text.txt"
    res = invoke("sweep", model, "--calib", calib, "--bits", "2.6,3.4", "--baselines", "4", "--dataset", text,
                 "--windows", 2, "--seq-len", 128, "--json", "--plot", png)
    assert res.exit_code == 0, res.output
    out = last_json(res.stdout)
    methods = [p["method"] for p in out["points"]]
    assert methods == ["mpq", "mpq", "rtn", "gptq"]
    mpq_pts = [p for p in out["points"] if p["method"] == "mpq"]
    assert mpq_pts[0]["bits_per_weight"] <= 2.6 and mpq_pts[1]["bits_per_weight"] <= 3.4
    assert mpq_pts[1]["kld"] <= mpq_pts[0]["kld"]
    assert all(0 <= p["top1_agreement"] <= 1 and p["ppl"] > 0 for p in out["points"])
    assert png.stat().st_size > 1000
    assert out["device"] == "cpu" and out["commit"] and out["torch"]  # the JSON says where and from what it came


def test_sweep_ablation_measures_each_variant_with_its_own_recipe(setup, monkeypatch):
    """The no-GPTQ and no-outlier points allocate from sensitivities measured with their own recipe (no GPTQ gains
    without GPTQ), as a user running that recipe would get, not from the default recipe's measurement."""
    root, model, calib = setup
    import mpq.quant.pipeline as pipeline

    seen = []
    real = pipeline.measure_model

    def spy(m, hessians, recipe, fisher=None):
        seen.append((recipe.gptq, recipe.outliers, recipe.allocation, fisher is not None))
        return real(m, hessians, recipe, fisher)

    monkeypatch.setattr(pipeline, "measure_model", spy)
    res = invoke("sweep", model, "--calib", calib, "--bits", "3.0", "--baselines", "", "--ablation", 3.0,
                 "--dataset", root / "text.txt", "--windows", 2, "--seq-len", 128, "--json")
    assert res.exit_code == 0, res.output
    assert seen == [(True, "auto", "fisher", True), (False, "auto", "fisher", True), (True, 0, "fisher", True),
                    (True, "auto", "relative", False)]
    variants = [p.get("variant") for p in last_json(res.stdout)["points"]]
    assert variants == ["default", "no-gptq", "no-outliers", "relative-allocation"]


def test_sweep_honours_recipe_pins_and_ties(setup, monkeypatch):
    """A recipe's overrides pin modules and its tied sets share one state at every budget of a sweep, as they do in
    `quantize`."""
    root, model, calib = setup
    import mpq.quant.allocation as allocation

    plans = []
    real = allocation.allocate

    ties = []

    def spy(costs, target, pins, tied_sets=()):
        ties.append(tied_sets)
        plans.append(real(costs, target, pins, tied_sets))
        return plans[-1]

    monkeypatch.setattr(allocation, "allocate", spy)
    recipe = root / "pinned.yaml"
    recipe.write_text('version: 1\nname: pinned\noverrides: {"*.down_proj": 16, "model.layers.0.self_attn.q_proj": 4}\n'
                      'tied_sets: [[mlp.gate_proj, mlp.up_proj]]\n')
    res = invoke("sweep", model, "--calib", calib, "--bits", "6.0,6.8", "--baselines", "", "--recipe", recipe,
                 "--dataset", root / "text.txt", "--windows", 2, "--seq-len", 128, "--json")
    assert res.exit_code == 0, res.output
    assert len(plans) == 2
    for plan in plans:
        rows = {r.name: r for r in plan.linears}
        assert all(rows[f"model.layers.{i}.mlp.down_proj"].bits == 16 for i in (0, 1))
        q = rows["model.layers.0.self_attn.q_proj"]
        assert q.pinned == 4 and q.n4 == q.groups
    assert ties == [[["mlp.gate_proj", "mlp.up_proj"]]] * 2  # the recipe's sets reach the allocator (test_allocation
    # checks what a tie does)


def test_sweep_refuses_unreachable_budget_before_loading(setup, monkeypatch):
    root, model, calib = setup
    from mpq import models

    def no_load(*a, **k):
        raise AssertionError("sweep must refuse before loading the model")

    monkeypatch.setattr(models, "load_float_model", no_load)
    res = invoke("sweep", model, "--calib", calib, "--bits", "3.0,1.5", "--baselines", "",
                 "--dataset", root / "text.txt", "--windows", 2, "--seq-len", 128)
    assert res.exit_code == 2 and "--target-bits 1.5 is outside what the format can reach" in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
