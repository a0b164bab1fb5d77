"""SpecEE add-ons inside an artifact: `specee.*` tensors plus the manifest key `specee` (its own version).

The add-ons are bound to one artifact by a fingerprint over the sha256 of every non-specee tensor listed in the
manifest; loading refuses predictors whose fingerprint differs (trained on another artifact, or the artifact
was re-quantized since), because a draft head and predictors only make sense for the weights they saw.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.errors import ArtifactError, MpqError
from mpq.quant.format import PackedLinear
from mpq.specee.draft import HEAD, LINEAR_NAMES, DraftHead
from mpq.specee.predictor import ExitPredictors

SPECEE_VERSION = 1
PREFIX = "specee."
QUANTIZED_DRAFT = "specee.draft_q."  # + linear name + "." + format tensor name; their geometry in meta["draft_quantized"]


@dataclass
class SpecEE:
    draft: DraftHead
    predictors: ExitPredictors
    offline: list[int]  # layer indices evaluated on every token
    meta: dict
    quantized_draft: dict | None = None  # {name: PackedLinear}: the draft as the GPU decoders run it, if stored


def quantized_draft_tensors(packed: dict) -> dict[str, torch.Tensor]:
    """`DraftHead.quantize`'s output as artifact tensors (their geometry goes to meta["draft_quantized"])."""
    return {f"{QUANTIZED_DRAFT}{n}.{t}": v for n, p in packed.items() for t, v in p.tensors().items()}


def artifact_fingerprint(manifest: dict) -> str:
    """sha256 over (name, sha256) of every tensor that is not a specee add-on."""
    h = hashlib.sha256()
    for name in sorted(manifest.get("tensors", {})):
        if not name.startswith(PREFIX):
            h.update(f"{name}={manifest['tensors'][name].get('sha256')}\n".encode())
    return h.hexdigest()


def _read_specee_tensors(path: Path, manifest: dict, files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from mpq.artifact import tensor_sha256

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name.startswith(PREFIX):
                    out[name] = st.get_tensor(name)
    for name, t in out.items():
        if manifest["tensors"].get(name, {}).get("sha256") != tensor_sha256(t):
            raise ArtifactError(f"tensor {name!r}: sha256 mismatch (corrupted or modified)")
    return out


def has_specee(path: Path) -> bool:
    from mpq.artifact import read_manifest

    try:
        _, manifest, _ = read_manifest(Path(path))
    except MpqError:
        return False
    return "specee" in manifest


def load_specee(path: Path, config: dict | None = None) -> SpecEE:
    """Load and check the add-ons of the artifact at `path` (MpqError if absent, foreign or malformed)."""
    from mpq.artifact import read_manifest

    cfg, manifest, files = read_manifest(Path(path))
    meta = manifest.get("specee")
    if not isinstance(meta, dict):
        raise MpqError(f"{path}: no exit predictors (run `mpq train-predictors {path}` first)")
    if meta.get("version") != SPECEE_VERSION:
        raise ArtifactError(f"specee add-on version {meta.get('version')} is not supported (this mpq reads v{SPECEE_VERSION})")
    if meta.get("artifact_fingerprint") != artifact_fingerprint(manifest):
        raise MpqError(f"{path}: the exit predictors were trained for another artifact (fingerprint mismatch); "
                       "rerun mpq train-predictors on this one")
    t = _read_specee_tensors(Path(path), manifest, files)
    cfg = config or cfg
    heads = int(cfg["num_attention_heads"])
    try:
        draft = DraftHead.from_tensors(t, heads, int(cfg.get("num_key_value_heads") or heads), float(cfg.get("rms_norm_eps", 1e-6)))
        layers = [int(x) for x in meta["predictor_layers"]]
        pred = ExitPredictors.from_tensors(t, layers)
    except (KeyError, RuntimeError, IndexError) as e:
        raise ArtifactError(f"specee tensors are malformed ({type(e).__name__}: {str(e)[:120]})") from None
    if draft.dim != int(cfg["hidden_size"]) or int(draft.vocab.max()) >= int(cfg["vocab_size"]):
        raise MpqError("the draft head does not fit this model's width or vocabulary")
    return SpecEE(draft, pred, [int(x) for x in meta["offline_layers"]], meta, _quantized_draft(t, meta, draft))


def _quantized_draft(t: dict[str, torch.Tensor], meta: dict, draft: DraftHead) -> dict | None:
    """The stored quantized draft, each linear checked against the float draft's shape (the head: its rows padded
    to fewer than one row tile more)."""
    geometry = meta.get("draft_quantized")
    if geometry is None:
        return None
    if not isinstance(geometry, dict) or set(geometry) != {*LINEAR_NAMES, HEAD}:
        raise ArtifactError("specee draft_quantized: expected the linears " + ", ".join((*LINEAR_NAMES, HEAD)))
    out = {}
    for name, geo in geometry.items():
        prefix = f"{QUANTIZED_DRAFT}{name}."
        out[name] = PackedLinear.from_tensors(geo, {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        want = (draft.vocab.numel(), draft.dim) if name == HEAD else tuple(getattr(draft, name).shape)
        got = (out[name].out_features, out[name].in_features)
        pad = got[0] - want[0]
        if got[1] != want[1] or not (pad == 0 or name == HEAD and 0 <= pad < out[name].tile_rows):
            raise ArtifactError(f"specee quantized draft {name}: shape {list(got)} does not fit the draft's {list(want)}")
    return out


def write_specee(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Add (or replace) the specee tensors and manifest key, rewriting the artifact atomically."""
    from safetensors import safe_open

    from mpq.artifact import atomic_folder, read_manifest, write_tensors

    path = Path(path)
    _, manifest, files = read_manifest(path)
    keep: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not name.startswith(PREFIX):
                    keep[name] = st.get_tensor(name)
    keep.update(tensors)
    meta = dict(meta, version=SPECEE_VERSION, artifact_fingerprint=artifact_fingerprint(manifest))
    new_manifest = {k: v for k, v in manifest.items() if k != "tensors"}
    new_manifest["specee"] = json.loads(json.dumps(meta))
    shard_names = {f.name for f in files} | {"model.safetensors.index.json"}
    with atomic_folder(path, overwrite=True) as tmp:
        for item in path.iterdir():
            if item.name in shard_names:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_tensors(tmp, keep, new_manifest)
