"""Versions and commit of the running tool, for provenance and benchmark JSON."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The repository commit mpq runs from ('+dirty' with local changes); $MPQ_COMMIT where the copy has no .git."""
    if os.environ.get("MPQ_COMMIT"):
        return os.environ["MPQ_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if sha and dirty else "")


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device=None) -> dict:
    """device, date, commit and library versions: the header of every benchmark JSON. `device` is the torch
    device the measured work ran on (default: the GPU if there is one), so a CPU run on a GPU host says "cpu"."""
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "triton": triton_version()}
