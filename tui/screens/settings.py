"""The settings screen: system prompt, sampling, memory budget, a reasoning model's thinking, snapshot codec and
theme.

It returns what the fields hold; `parse_settings` turns that into config values (a field left empty means
"the built-in default") and the app saves them with `edgectx.config.save_config`, which checks the ranges.
Ctrl+S saves, Esc closes without saving.

    self.app.push_screen(SettingsScreen(current, themes=["textual-dark", "nord"]), apply)
    parse_settings({"temperature": "0.2", "top_k": "", ...})  # {"temperature": 0.2, "top_k": None, ...}
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Select, TextArea

from edgectx.quant.formats import SNAPSHOT_CODECS
from edgectx.errors import UsageError

# field -> (label, kind); kind float/int parse numbers, "budget" takes a token count or "full".
FIELDS = {
    "temperature": ("Temperature (0 = greedy)", float),
    "top_p": ("Top-p (1 disables)", float),
    "top_k": ("Top-k (0 disables)", int),
    "max_tokens": ("Longest answer, in tokens", int),
    "budget": ("Memory budget, device tokens (or full)", "budget"),
}


def parse_settings(values: dict[str, str]) -> dict:
    """Config changes from the fields' text; raises UsageError naming the field whose text is not a number."""
    changes: dict = {"system": values.get("system", "").strip() or None}
    for name, (label, kind) in FIELDS.items():
        text = values.get(name, "").strip()
        if not text:
            changes[name] = None
        elif kind == "budget" and text == "full":
            changes[name] = "full"
        else:
            try:
                changes[name] = (float if kind is float else int)(text)
            except ValueError:
                what = "a number" if kind is float else "a whole number"
                raise UsageError(f"{label.split(' (')[0]} must be {what}, not {text!r}.") from None
    for name in ("snapshot_codec", "theme"):
        changes[name] = values.get(name) or None
    changes["thinking"] = False if values.get("thinking") == "off" else None  # "default": as the template has it
    return changes


class SettingsScreen(ModalScreen[dict | None]):
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "dismiss(None)", "Close without saving")]

    def __init__(self, current: dict, themes: list[str]):
        super().__init__()
        self.current, self.themes = current, themes

    def compose(self) -> ComposeResult:
        c = self.current
        with VerticalScroll(classes="dialog settings"):
            yield Label("Settings", classes="dialog-title")
            yield Label("System prompt (new conversations)")
            yield TextArea(c.get("system") or "", id="system", classes="settings-system")
            for name, (label, _) in FIELDS.items():
                with Horizontal(classes="settings-row"):
                    yield Label(label, classes="settings-label")
                    value = c.get(name)
                    yield Input("" if value is None else str(value), id=name, placeholder="default")
            with Horizontal(classes="settings-row"):
                yield Label("Reasoning models (Qwen3)", classes="settings-label")
                yield Select([("think before answering", "default"), ("answer without thinking", "off")],
                             value="off" if c.get("thinking") is False else "default", allow_blank=False, id="thinking")
            with Horizontal(classes="settings-row"):
                yield Label("Snapshot codec", classes="settings-label")
                yield Select([(f"{codec}{' (lossless)' if codec == 'fp16' else ''}", codec) for codec in SNAPSHOT_CODECS],
                             value=c.get("snapshot_codec") or "int4", allow_blank=False, id="snapshot_codec")
            with Horizontal(classes="settings-row"):
                yield Label("Theme", classes="settings-label")
                yield Select([(t, t) for t in self.themes], value=c.get("theme") or self.app.theme, allow_blank=False,
                             id="theme")
            yield Label("Ctrl+S saves to the config file · Esc closes without saving", classes="dialog-hint")

    def values(self) -> dict[str, str]:
        values = {name: self.query_one(f"#{name}", Input).value for name in FIELDS}
        values["system"] = self.query_one("#system", TextArea).text
        for name in ("thinking", "snapshot_codec", "theme"):
            values[name] = str(self.query_one(f"#{name}", Select).value)
        return values

    def action_save(self) -> None:
        self.dismiss(self.values())
