"""Small modal prompts: one line of text (a path, a title) and a yes/no question.

A path prompt completes like a shell: the rest of the longest unambiguous name is shown greyed and Tab
(or →) takes it; a folder gets its "/" so the next Tab goes on inside it.

    self.app.push_screen(TextPrompt("Attach a document", placeholder="path/to/file.pdf", paths=True), callback)
    self.app.push_screen(Confirm("Delete conversation 3?"), callback)  # callback(True | False)
"""

from __future__ import annotations

import os
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Input, Label


def complete_path(value: str) -> str | None:
    """`value` extended by the longest name part every matching entry shares (a lone folder gets "/");
    None when nothing matches or nothing can be added. Hidden entries only when the part typed starts with "."."""
    folder, typed = os.path.split(value)
    try:
        names = [e.name + ("/" if e.is_dir() else "") for e in os.scandir(Path(folder or ".").expanduser())
                 if e.name.startswith(typed) and (typed.startswith(".") or not e.name.startswith("."))]
    except OSError:
        return None
    common = os.path.commonprefix(names)
    return value + common[len(typed):] if len(common) > len(typed) else None


class PathSuggester(Suggester):
    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)  # the disk changes; names are case-sensitive

    async def get_suggestion(self, value: str) -> str | None:
        return complete_path(value) if value else None


class TextPrompt(ModalScreen[str | None]):
    """Enter gives the text (None when empty), Esc gives None; with `paths`, Tab completes a file path."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("tab", "complete", "Complete the path", show=False)]

    def __init__(self, title: str, value: str = "", placeholder: str = "", paths: bool = False):
        super().__init__()
        self.title_text, self.value, self.placeholder, self.paths = title, value, placeholder, paths

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(value=self.value, placeholder=self.placeholder, suggester=PathSuggester() if self.paths else None)
            hint = "Tab completes · Enter confirms · Esc cancels" if self.paths else "Enter confirms · Esc cancels"
            yield Label(hint, classes="dialog-hint")

    def action_complete(self) -> None:
        field = self.query_one(Input)
        completed = complete_path(field.value) if self.paths and field.value else None
        if completed is not None:
            field.value = completed
            field.cursor_position = len(completed)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            yield Label("y: yes · n or Esc: no", classes="dialog-hint")
