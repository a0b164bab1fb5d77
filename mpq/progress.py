"""Progress of long passes: rich bars on a terminal, one plain line per step otherwise, or JSON lines.

The mode comes from `mpq --progress auto|plain|json` (or MPQ_PROGRESS). `json` writes one object per step to
stderr, `{"event": "progress", "what", "unit", "done", "total", "elapsed_s", "eta_s", "note"}`, for scripts and
job schedulers that watch a run (users asked for machine-readable progress: notes/user-expectations row 4).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mpq.errors import MpqError

MODES = ("auto", "plain", "json")


def _default_mode() -> str:
    return os.environ.get("MPQ_PROGRESS", "auto")


_mode = {"value": _default_mode()}


def set_progress_mode(mode: str | None) -> None:
    """`mode` one of MODES; None: MPQ_PROGRESS, else auto."""
    mode = mode or _default_mode()
    if mode not in MODES:
        raise MpqError(f"unknown --progress '{mode}' ({' | '.join(MODES)})")
    _mode["value"] = mode


def _eta(done: int, start: int, total: int, elapsed: float) -> float | None:
    return elapsed / (done - start) * (total - done) if done > start and elapsed > 0 else None


@contextmanager
def layer_progress(total: int, what: str, start: int = 0, unit: str = "layer"):
    """Yield `advance(index, note="")` for steps start..total-1 (layers, windows or epochs: `unit`); shows the
    step, elapsed time and ETA."""
    mode = _mode["value"]
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    t0 = time.monotonic()
    if mode == "json":
        def advance(i: int, note: str = "") -> None:
            elapsed = time.monotonic() - t0
            eta = _eta(i + 1, start, total, elapsed)
            print(json.dumps({"event": "progress", "what": what, "unit": unit, "done": i + 1, "total": total,
                              "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 1),
                              "note": note}), file=sys.stderr, flush=True)
        yield advance
        return
    if mode != "rich":
        def advance(i: int, note: str = "") -> None:
            print(f"{what}: {unit} {i + 1}/{total} {note}".rstrip(), file=sys.stderr, flush=True)
        yield advance
        return
    columns = (TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("", total=total, completed=start)

        def advance(i: int, note: str = "") -> None:
            bar.update(task, completed=i + 1, description=note)

        yield advance
