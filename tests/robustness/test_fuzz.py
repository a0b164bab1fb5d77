"""Fuzz the artifact reader: mutated headers and manifests may only ever raise the tool's own error.

10,000 derandomized hypothesis cases over a tiny artifact (one quantized linear, two float tensors): byte flips in
the header, truncation anywhere, and JSON mutations of header entries and manifest fields (wrong types, huge and
negative shapes and offsets, future versions, missing and unknown keys). `read_manifest` and `load_artifact` must
either succeed or raise an `MpqError`; any other exception (or a crash) fails the test.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpq.artifact import load_artifact, read_manifest, save_artifact
from mpq.errors import MpqError
from mpq.quant.format import PackedLinear

CASES = int(os.environ.get("MPQ_FUZZ_CASES", 10_000))
FQN = "model.layers.0.mlp.up_proj"


def tiny_packed() -> PackedLinear:
    gen = torch.Generator().manual_seed(0)
    n, k, g = 16, 64, 32
    return PackedLinear.pack(codes=torch.randint(0, 4, (n, k), generator=gen, dtype=torch.uint8),
                             tile_bits=torch.tensor([[2, 4]]), scale_codes=torch.randint(1, 255, (n, 2), generator=gen),
                             zeros=torch.randint(0, 4, (n, 2), generator=gen), super_scale2=torch.rand(n, generator=gen),
                             super_scale4=torch.rand(n, generator=gen),
                             outlier_offsets=torch.randint(0, g, (n, 2, 1), generator=gen),
                             outlier_values=torch.randn(n, 2, 1, generator=gen), group_size=g)


def build(folder: Path) -> bytes:
    floats = {"model.norm.weight": torch.ones(16).half(), "model.embed_tokens.weight": torch.randn(8, 16).half()}
    save_artifact(folder, config={"model_type": "llama"}, tokenizer=None, linears={FQN: tiny_packed()}, floats=floats,
                  manifest={"float_linears": []})
    return (folder / "model.safetensors").read_bytes()


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


BIG = st.sampled_from([-1, 0, 1, 2, 7, 16, 31, 2**15, 2**31, 2**32 + 1, 2**63, 2**64 + 5, -(2**63), 10**30,
                       1.5, -0.0, 1e300, float("inf"), float("-inf"), float("nan"), True, "1", "F16", [], {}])
NUM = BIG | st.integers() | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False) | st.booleans()
LEAF = st.none() | NUM | st.text(max_size=6)
JSON = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
DELETE = object()


def set_path(obj, path, value):
    """obj[path[0]]...[path[-1]] = value (or delete); silently stops where the path no longer exists."""
    for key in path[:-1]:
        if not isinstance(obj, dict) or key not in obj:
            return
        obj = obj[key]
    if isinstance(obj, dict):
        if value is DELETE:
            obj.pop(path[-1], None)
        else:
            obj[path[-1]] = value


@st.composite
def mutation(draw, raw: bytes):
    header, data = split(raw)
    names = [n for n in header if n != "__metadata__"]
    kind = draw(st.sampled_from(["flip", "truncate", "header", "manifest", "manifest", "tensor_entry"]))
    if kind == "flip":
        out = bytearray(raw)
        end = 8 + struct.unpack("<Q", raw[:8])[0]
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    value = draw(st.one_of(st.just(DELETE), NUM, st.lists(NUM, max_size=4), JSON))
    if kind == "header":
        path = [draw(st.sampled_from(names + ["__metadata__", "extra"])),
                draw(st.sampled_from(["dtype", "shape", "data_offsets", "mpq.manifest", "format"]))]
        if draw(st.booleans()):
            path = path[:1]
        set_path(header, path, value)
        return join(header, data)
    manifest = json.loads(header["__metadata__"]["mpq.manifest"])
    if kind == "manifest":
        path = [draw(st.sampled_from(["format_version", "quant_version", "tensors", "linears", "float_linears", "x"]))]
        if path[0] in ("tensors", "linears") and draw(st.booleans()):
            path.append(draw(st.sampled_from(sorted(manifest[path[0]]) + ["nope"])))
    else:
        path = ["tensors", draw(st.sampled_from(names)), draw(st.sampled_from(["dtype", "shape", "sha256", "file"]))]
        if draw(st.booleans()):
            path = ["linears", FQN, draw(st.sampled_from(["out_features", "in_features", "group_size", "tile_rows",
                                                          "n4", "outliers", "bias"]))]
    set_path(manifest, path, value)
    header["__metadata__"]["mpq.manifest"] = json.dumps(manifest)
    return join(header, data)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "art"
    raw = build(folder)
    load_artifact(folder)  # the unmutated artifact must load
    return folder, raw


def test_reader_raises_only_its_own_errors(base):
    folder, raw = base
    target = folder / "model.safetensors"
    outcomes = {"ok": 0, "refused": 0}
    started = time.perf_counter()

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutation(raw))
    def case(mutated):
        target.write_bytes(mutated)
        try:
            read_manifest(folder)
            load_artifact(folder)
            outcomes["ok"] += 1
        except MpqError:
            outcomes["refused"] += 1

    case()
    seconds = time.perf_counter() - started
    print(f"fuzz: {sum(outcomes.values())} cases in {seconds:.1f} s: {outcomes}")
    assert sum(outcomes.values()) >= CASES and outcomes["refused"] > CASES // 2
