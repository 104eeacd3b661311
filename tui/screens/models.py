"""The model picker: the embedded default and the GGUF files `edgectx models` finds; Enter loads the one chosen.

    self.app.push_screen(ModelScreen(bridge.models(), current=engine.path), callback)  # callback(Path | None)
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from edgectx.model.discover import ModelEntry


class ModelScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, entries: list[ModelEntry], current: Path | None):
        super().__init__()
        self.entries, self.current = entries, current

    def compose(self) -> ComposeResult:
        options = []
        for i, e in enumerate(self.entries):
            mark = "▶ " if self.current is not None and e.path == self.current else "  "
            line = Text.assemble(mark, (e.name, "bold"), f"  {e.source} · {e.size_bytes / 2**20:,.0f} MiB\n",
                                 ("    " + str(e.path), "dim"))
            options.append(Option(line, id=f"model-{i}"))
        with Vertical(classes="dialog models"):
            yield Label("Models", classes="dialog-title")
            if options:
                yield OptionList(*options)
            else:
                yield Label("No models found: add model_paths to the config file, or pass --model PATH.")
            yield Label("Enter loads the model (a new conversation starts) · Esc cancels", classes="dialog-hint")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.entries[event.option_index].path)
