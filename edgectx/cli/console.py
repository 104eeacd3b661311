"""What the commands print on stderr besides their answers: warnings in one unbroken line, and progress bars.

    status = Console(stderr=True)
    warn(status, "report.pdf changed since this conversation read it: ...")
    with reading_progress(status, "Reading report.pdf", 98_304) as update:
        engine.prefill(ids, progress=update)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.text import Text


def warn(status: Console, sentence: str) -> None:
    """A problem the command gets past, in one unbroken line (paths stay whole for copying)."""
    status.print(Text(sentence, style="yellow"), soft_wrap=True)


def note(status: Console, line: str) -> None:
    """A dim status line, printed as it is (no markup: lines carry file names)."""
    status.print(Text(line, style="dim"), soft_wrap=True)


@contextmanager
def reading_progress(status: Console, description: str, total_tokens: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A transient bar for tokens being read (count, tok/s, ETA); yields the engine's progress callback, whose
    second argument (the total) replaces `total_tokens` once known."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Bar(*columns, console=status, transient=True) as bar:
        task = bar.add_task(description, total=total_tokens, rate="")
        t0 = time.perf_counter()

        def update(n_done: int, n_total: int) -> None:
            bar.update(task, completed=n_done, total=n_total or None,
                       rate=f"{n_done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        yield update
