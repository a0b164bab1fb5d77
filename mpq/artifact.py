"""The artifact container: an HF-style folder holding format-v1 linears, float tensors and a manifest.

Layout (docs/format.md): config.json (with quantization_config), tokenizer files, model.safetensors
(model-0000i-of-0000n.safetensors + model.safetensors.index.json past the shard size). The manifest is
JSON in the `mpq.manifest` key of every shard's `__metadata__`; it lists every tensor with its dtype,
shape, shard and sha256. Writes go to a temporary sibling folder renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpq.errors import ArtifactError, MpqError
from mpq.quant.format import FORMAT_VERSION, QUANT_VERSION, TENSOR_NAMES, PackedLinear

MANIFEST_KEY = "mpq.manifest"
SHARD_BYTES = 4 * 1024**3
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
           "I16": torch.int16, "U8": torch.uint8, "I64": torch.int64, "I8": torch.int8}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


@dataclass
class Artifact:
    path: Path
    config: dict
    manifest: dict
    linears: dict[str, PackedLinear]
    floats: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # namespaced add-ons, e.g. specee.*

    @property
    def bits_per_weight(self) -> float:
        """All-in bits/weight over the decoder linears, from the stored tensors (float-pinned ones count 16)."""
        stored = sum(8 * p.stored_bytes() for p in self.linears.values())
        weights = sum(p.out_features * p.in_features for p in self.linears.values())
        for fqn in self.manifest.get("float_linears", []):
            w = self.floats.get(f"{fqn}.weight")
            if w is not None:
                stored += 16 * w.numel()
                weights += w.numel()
        return stored / weights if weights else 16.0


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MpqError(f"output folder exists: {out} (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """Write tensors as safetensors shards, recording dtype/shape/shard/sha256 of each in the manifest."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    entries = {}
    for fname, shard in zip(files, shards):
        for name, t in shard.items():
            entries[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "file": fname, "sha256": tensor_sha256(t)}
    manifest = dict(manifest, tensors=entries)
    text = json.dumps(manifest, sort_keys=True)
    for fname, shard in zip(files, shards):
        save_file(shard, str(folder / fname), metadata={MANIFEST_KEY: text, "format": "pt"})
    if len(files) > 1:
        index = {"metadata": {MANIFEST_KEY: text}, "weight_map": {n: e["file"] for n, e in entries.items()}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def save_artifact(out: Path, *, config: dict, tokenizer, linears: dict[str, PackedLinear], floats: dict[str, torch.Tensor],
                  manifest: dict, extras: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> None:
    tensors: dict[str, torch.Tensor] = dict(floats)
    for fqn, packed in linears.items():
        for name, t in packed.tensors().items():
            tensors[f"{fqn}.{name}"] = t
    tensors.update(extras or {})
    manifest = dict(manifest, format_version=FORMAT_VERSION, quant_version=QUANT_VERSION,
                    linears={fqn: p.meta() for fqn, p in linears.items()})
    with atomic_folder(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_tensors(tmp, tensors, manifest)


def read_safetensors_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header before any tensor is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 1024**2:
                raise ArtifactError(f"{path.name}: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path.name}: unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}: header is not an object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape, offsets = list(info["shape"]), list(info["data_offsets"])
            if not all(type(v) is int for v in shape + offsets):  # JSON floats, Infinity and booleans are not sizes
                raise TypeError
            start, end = offsets
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path.name}: malformed entry for tensor {name!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise ArtifactError(f"{path.name}: negative dimension in {name!r}")
            numel *= s
        if not 0 <= start <= end <= data_size or end - start != numel * torch.empty((), dtype=dtype).element_size():
            raise ArtifactError(f"{path.name}: tensor {name!r} claims bytes beyond the file (truncated or corrupted)")
    return header


def is_artifact(path: str) -> bool:
    """An mpq artifact folder (its safetensors carry the mpq manifest), as opposed to a float model."""
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    shards = sorted(p.glob("model*.safetensors"))
    if not shards:
        return False
    try:
        meta = read_safetensors_header(shards[0]).get("__metadata__") or {}
    except MpqError:
        return "quantization_config" in (p / "config.json").read_text(errors="replace")
    return isinstance(meta, dict) and MANIFEST_KEY in meta


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError("model.safetensors.index.json is malformed") from None
        files = [path / n for n in names]
        if any(Path(n).name != n for n in names):
            raise ArtifactError("shard names must be plain file names")
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise ArtifactError(f"missing {f.name} in {path}")
    return files


def read_manifest(path: Path) -> tuple[dict, dict, list[Path]]:
    """(config, manifest, shard files) of an artifact folder, validated for format version and consistency."""
    path = Path(path)
    if not path.is_dir():
        raise MpqError(f"artifact folder not found: {path}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ArtifactError(f"{path}: missing or unreadable config.json") from None
    files = _shard_files(path)
    texts = []
    for f in files:
        meta = read_safetensors_header(f).get("__metadata__") or {}
        if not isinstance(meta, dict) or not isinstance(meta.get(MANIFEST_KEY), str):
            raise ArtifactError(f"{f.name}: no mpq manifest (not an mpq artifact?)")
        texts.append(meta[MANIFEST_KEY])
    if len(set(texts)) != 1:
        raise ArtifactError("shards carry different manifests")
    try:
        manifest = json.loads(texts[0])
    except ValueError:
        raise ArtifactError("manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(config, dict):
        raise ArtifactError("manifest or config is not an object")
    version = manifest.get("format_version")
    if type(version) is not int:
        raise ArtifactError("manifest has no format version")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format v{version} is newer than this mpq (reads up to v{FORMAT_VERSION}); upgrade mpq")
    if version < 1:
        raise ArtifactError(f"unknown artifact format v{version}")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("linears"), dict):
        raise ArtifactError("manifest lacks its tensor or linear table")
    return config, manifest, files


def load_artifact(path: Path, check_hashes: bool = True) -> Artifact:
    """Load and validate every tensor (names, dtypes, shapes, hashes) of an artifact onto the CPU."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config, manifest, files = read_manifest(path)
    entries = manifest["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if name in tensors:
                        raise ArtifactError(f"tensor {name!r} appears in two shards")
                    tensors[name] = st.get_tensor(name)
        except SafetensorError as e:
            raise ArtifactError(f"{f.name}: {str(e)[:200]}") from None
    if set(tensors) != set(entries):
        missing, extra = sorted(set(entries) - set(tensors))[:3], sorted(set(tensors) - set(entries))[:3]
        raise ArtifactError(f"tensors do not match the manifest (missing {missing}, unknown {extra})")
    for name, t in tensors.items():
        e = entries[name]
        if not isinstance(e, dict) or e.get("dtype") != _DTYPE_NAMES.get(t.dtype) or e.get("shape") != list(t.shape):
            raise ArtifactError(f"tensor {name!r}: dtype/shape differ from the manifest")
        if check_hashes and e.get("sha256") != tensor_sha256(t):
            raise ArtifactError(f"tensor {name!r}: sha256 mismatch (corrupted or modified)")
    linears = {}
    for fqn, meta in manifest["linears"].items():
        if not isinstance(meta, dict):
            raise ArtifactError(f"linear {fqn!r}: bad metadata")
        own = {n: tensors.pop(f"{fqn}.{n}") for n in (*TENSOR_NAMES, "bias") if f"{fqn}.{n}" in tensors}
        linears[fqn] = PackedLinear.from_tensors(meta, own)
    extras = {n: tensors.pop(n) for n in list(tensors) if n.startswith("specee.")}
    return Artifact(path, config, manifest, linears, tensors, extras)
