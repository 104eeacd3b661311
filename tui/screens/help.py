"""The help screen: every key binding the app has, read from the bindings themselves, plus the prompt's keys.

F1, ? or Esc closes it.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

# Keys that belong to widgets rather than the app, listed by hand because they are handled in key events.
WIDGET_KEYS = [
    ("Enter", "send (in the prompt); open the conversation (in the sidebar)"),
    ("Ctrl+J / Shift+Enter", "new line in the prompt"),
    ("Delete / d", "delete the highlighted conversation (in the sidebar)"),
    ("Tab / Shift+Tab", "move between the list, the transcript (arrows scroll it) and the prompt"),
    ("Ctrl+P", "command palette: new conversation, attach, export, help, ..."),
    ("Ctrl+Q", "quit"),
]


NAMES = {"question_mark": "?", "escape": "Esc", "enter": "Enter", "delete": "Delete"}


def key_label(keys: str) -> str:
    """"ctrl+o" -> "Ctrl+O", "f1,question_mark" -> "F1 / ?"."""
    def one(key: str) -> str:
        *mods, name = key.split("+")
        name = NAMES.get(name, name.upper() if len(name) <= 3 else name.capitalize())
        return "+".join([m.capitalize() for m in mods] + [name])

    return " / ".join(one(k) for k in keys.split(","))


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,question_mark,q", "dismiss", "Close help")]

    def __init__(self, bindings: list[Binding]):
        super().__init__()
        self.rows = [(key_label(b.key), b.description) for b in bindings if b.description] + WIDGET_KEYS

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Label("edgectx: keys", classes="dialog-title")
            table = DataTable(show_cursor=False, zebra_stripes=True)
            table.add_columns("key", "what it does")
            table.add_rows(self.rows)
            yield table
            yield Label("Esc, F1 or ? closes this screen", classes="dialog-hint")
