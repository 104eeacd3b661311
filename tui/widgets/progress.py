"""A progress row for long reads (loading the model, opening a document): a bar, tokens/s, ETA and the cancel key.

Hidden while idle.

    row = WorkProgress()
    row.begin("Reading report.pdf", total=98_304, cancel_key="Esc")
    row.advance(4_096, 98_304)   # "4,096/98,304 tokens · 2,310 tok/s · ETA 41 s · Esc cancels"
    row.end()
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


def eta_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.0f} s"


class WorkProgress(Horizontal):
    DEFAULT_CSS = """
    WorkProgress { height: 1; display: none; padding: 0 1; }
    WorkProgress.-active { display: block; }
    WorkProgress #what { width: auto; margin-right: 1; }
    WorkProgress ProgressBar { width: auto; margin-right: 1; }
    WorkProgress #rate { width: 1fr; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield Label(id="what")
        yield ProgressBar(show_eta=False, show_percentage=True)
        yield Label(id="rate")

    def begin(self, what: str, total: int | None = None, unit: str = "tokens", cancel_key: str | None = "Esc") -> None:
        self._unit, self._cancel = unit, f" · {cancel_key} cancels" if cancel_key else ""
        self._t0 = time.perf_counter()
        self.query_one("#what", Label).update(what)
        self.query_one(ProgressBar).update(total=total, progress=0)
        self.query_one("#rate", Label).update(self._cancel.removeprefix(" · "))
        self.add_class("-active")

    def advance(self, done: int, total: int) -> None:
        self.query_one(ProgressBar).update(total=total, progress=done)
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f" · ETA {eta_text((total - done) / rate)}" if rate > 0 and done < total else ""
        speed = f" · {rate:,.0f} {self._unit}/s"
        self.query_one("#rate", Label).update(f"{done:,}/{total:,} {self._unit}{speed}{eta}{self._cancel}")

    def end(self) -> None:
        self.remove_class("-active")

    @property
    def active(self) -> bool:
        return self.has_class("-active")

    @property
    def rate_text(self) -> str:
        return str(self.query_one("#rate", Label).render())
