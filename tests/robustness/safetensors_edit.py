"""Byte-level edits of safetensors files, the way a damaged download or a tampering hand would make them."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_header(path: Path) -> tuple[dict, int]:
    """(header JSON, byte offset where tensor data starts)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), 8 + n


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    header, base = read_header(path)
    start, end = header[name]["data_offsets"]
    return base + start, base + end


def flip_byte(path: Path, name: str, index: int = 0) -> None:
    start, end = tensor_span(path, name)
    raw = bytearray(Path(path).read_bytes())
    raw[start + index] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


def swap_tensors(path: Path, a: str, b: str) -> None:
    """Exchange the bytes of two same-size tensors; header and manifest stay as they were."""
    (sa, ea), (sb, eb) = tensor_span(path, a), tensor_span(path, b)
    assert ea - sa == eb - sb
    raw = bytearray(Path(path).read_bytes())
    raw[sa:ea], raw[sb:eb] = raw[sb:eb], raw[sa:ea]
    Path(path).write_bytes(bytes(raw))


def rewrite_header(path: Path, edit) -> None:
    """Apply edit(header) in place and write the header back (padded to 8 bytes), data unchanged."""
    header, base = read_header(path)
    data = Path(path).read_bytes()[base:]
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_manifest(path: Path, edit) -> None:
    """Apply edit(manifest) to the mpq manifest in the header's __metadata__."""
    def apply(header):
        manifest = json.loads(header["__metadata__"]["mpq.manifest"])
        edit(manifest)
        header["__metadata__"]["mpq.manifest"] = json.dumps(manifest)

    rewrite_header(path, apply)
