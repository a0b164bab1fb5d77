"""The --device option, one rule for every command."""

from __future__ import annotations

import torch

from mpq.errors import MpqError


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu; an explicit cuda without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MpqError("CUDA requested but no GPU is available")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise MpqError(f"bad device '{device}'") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MpqError(f"no GPU {dev.index} (found {torch.cuda.device_count()})")
        return dev
    raise MpqError(f"unknown device '{device}' (use auto, cpu or cuda)")
