"""Progress bars for long passes: rich on a terminal, one plain line per step otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def layer_progress(total: int, what: str, start: int = 0):
    """Yield `advance(index, note="")`; shows layer, elapsed time and ETA."""
    if not sys.stderr.isatty():
        def advance(i: int, note: str = "") -> None:
            print(f"{what}: layer {i + 1}/{total} {note}".rstrip(), file=sys.stderr, flush=True)
        yield advance
        return
    columns = (TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("", total=total, completed=start)

        def advance(i: int, note: str = "") -> None:
            bar.update(task, completed=i + 1, description=note)

        yield advance
