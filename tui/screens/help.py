"""The help screen: every key binding the app has, as remapped by the config's `[keys]` table, plus the keys
that belong to widgets. F1, ? or Esc closes it.

    HelpScreen(app.BINDINGS, keymap={"regenerate": "f5"})  # "F5  Regenerate the last answer"
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
    ("Esc (editing, passage)", "leave editing the last message; close the passage panel"),
    ("Delete / d", "delete the highlighted conversation (in the sidebar)"),
    ("Tab / Shift+Tab", "move between search, list, messages (to copy one), sources and prompt"),
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

    def __init__(self, bindings: list[Binding], keymap: dict[str, str] | None = None):
        super().__init__()
        keymap = keymap or {}
        self.rows = [(key_label(keymap.get(b.id, b.key)), b.description) for b in bindings if b.description] + WIDGET_KEYS

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Label("edgectx: keys", classes="dialog-title")
            table = DataTable(show_cursor=False, zebra_stripes=True)
            table.add_columns("key", "what it does")
            table.add_rows(self.rows)
            yield table
            yield Label("Esc, F1 or ? closes this screen · remap keys in the config file's [keys] table, "
                        'e.g. regenerate = "f5"', classes="dialog-hint")
