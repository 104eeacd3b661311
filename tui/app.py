"""EdgectxApp: the terminal UI's App, its key bindings, command palette entries, settings, models and themes.

The chat screen does the work; the app maps keys and palette commands onto it, opens the help, settings and
model screens, and keeps the config file (edgectx.config) in step: the theme chosen (also from the palette's
"Change theme"), the settings saved, the model picked. Every binding has an id, its action's name, so the
config's `[keys]` table remaps it (`regenerate = "ctrl+r"`); the help screen shows the keys in effect.

    app = EdgectxApp(Bridge(load_engine, ConversationStore()), config=load_config())
    app.run()
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from edgectx.config import Config, config_path, save_config
from edgectx.errors import UsageError
from edgectx.model.sampling import SamplingParams
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.chat import ChatScreen
from edgectx.tui.screens.help import HelpScreen
from edgectx.tui.screens.models import ModelScreen
from edgectx.tui.screens.settings import SettingsScreen, parse_settings
from edgectx.tui.widgets.sidebar import ConversationList

# How soon a thread waiting for the GIL gets it (Python's default is 5 ms). The engine's worker holds it between
# torch calls; each turn of the UI's event loop gives it up and waits to get it back, so a shorter interval keeps
# a key press during a long read near the idle latency (tests/test_tui_latency.py measures it).
SWITCH_INTERVAL_S = 0.001

CHAT_ACTIONS = {"new_conversation", "attach", "export", "rename", "stop", "conversations", "regenerate", "edit_last",
                "copy", "sources", "search", "models", "settings"}


def _binding(keys: str, action: str, description: str, **kwargs) -> Binding:
    return Binding(keys, action, description, id=action, **kwargs)


class EdgectxApp(App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere keep the stylesheet
    TITLE = "edgectx"
    BINDINGS = [
        _binding("ctrl+n", "new_conversation", "New conversation"),
        _binding("ctrl+o", "attach", "Attach document"),
        _binding("ctrl+s", "export", "Export to Markdown"),
        _binding("f2", "rename", "Rename conversation"),
        _binding("ctrl+l", "conversations", "Conversations (↑↓ Enter opens)"),
        _binding("ctrl+f", "search", "Search conversations", show=False),
        _binding("escape", "stop", "Stop the answer or the read"),
        _binding("ctrl+r", "regenerate", "Regenerate the last answer"),
        _binding("ctrl+t", "edit_last", "Edit and resend the last message", show=False),
        _binding("ctrl+b", "copy", "Copy the focused message, else the last answer", show=False),
        _binding("ctrl+g", "sources", "Sources of the last answer (Enter opens one)", show=False),
        _binding("f3", "models", "Models", show=False),
        _binding("f4", "settings", "Settings", show=False),
        _binding("f1,question_mark", "help", "Help"),
    ]

    def __init__(self, bridge: Bridge, export_dir: Path | None = None, config: Config | None = None):
        super().__init__()
        self.bridge = bridge
        self.config = config or Config()
        self.chat = ChatScreen(bridge, export_dir)
        known = {b.id for b in self.BINDINGS}
        self.keymap = {k: v for k, v in self.config.keys.items() if k in known}
        self._startup_warnings = [f"The config's [keys] names unknown actions ({', '.join(sorted(set(self.config.keys) - known))}): "
                                  f"the actions are {', '.join(sorted(known))}."] if set(self.config.keys) - known else []
        if self.keymap:
            self.set_keymap(self.keymap)

    def get_default_screen(self) -> Screen:
        return self.chat

    def on_mount(self) -> None:
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        theme = self.config.theme
        if theme and theme in self.available_themes:
            self.theme = theme
        elif theme:
            self._startup_warnings.append(f"The config's theme {theme!r} is not one of Textual's themes: the default is used.")
        for warning in self._startup_warnings:
            self.chat.say(warning, severity="warning", timeout=10)

    def on_unmount(self) -> None:
        sys.setswitchinterval(self._switch_interval)

    def watch_theme(self, theme: str) -> None:
        """Keep the theme chosen (Settings, or the palette's "Change theme") for next time."""
        if self.is_mounted and theme != self.config.theme:
            self._save({"theme": theme})

    def _save(self, changes: dict) -> bool:
        try:
            self.config = save_config(changes)
        except UsageError as e:
            self.chat.say(str(e), title="Settings not saved", severity="error", timeout=15)
            return False
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Chat keys do nothing while a dialog or the help screen is open.
        return self.screen is self.chat if action in CHAT_ACTIONS else True

    async def action_new_conversation(self) -> None:
        await self.chat.new_conversation()

    def action_attach(self) -> None:
        self.chat.attach()

    def action_export(self) -> None:
        self.chat.export()

    def action_rename(self) -> None:
        self.chat.rename()

    def action_conversations(self) -> None:
        self.chat.query_one(ConversationList).focus()

    def action_search(self) -> None:
        self.chat.search()

    def action_stop(self) -> None:
        self.chat.cancel()

    async def action_quit(self) -> None:
        """Ctrl+Q: stop the answer or the read in progress (the answer so far is stored), then exit."""
        self.chat.quitting = True
        await self.chat.stop_job()
        self.exit()

    async def action_regenerate(self) -> None:
        await self.chat.regenerate()

    def action_edit_last(self) -> None:
        self.chat.edit_last()

    def action_copy(self) -> None:
        self.chat.copy()

    def action_sources(self) -> None:
        self.chat.sources()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.BINDINGS, self.keymap))

    # -- models and settings -----------------------------------------------------------------------

    def action_models(self) -> None:
        current = self.bridge.engine.path if self.bridge.ready else None

        def chosen(path: Path | None) -> None:
            if path is not None and path != current:
                self.chat.switch_model(path)

        self.push_screen(ModelScreen(self.bridge.models(), current), chosen)

    def model_switched(self, path: Path) -> None:
        embedded = next((e.path for e in self.bridge.models() if e.source == "embedded"), None)
        self._save({"model": None if path == embedded else str(path)})

    def settings_values(self) -> dict:
        s = self.bridge.settings
        return {"system": s.system, "temperature": s.sampling.temperature, "top_p": s.sampling.top_p,
                "top_k": s.sampling.top_k, "max_tokens": s.max_tokens, "budget": s.budget, "snapshot_codec": s.codec,
                "thinking": s.thinking, "theme": self.theme}

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings_values(), sorted(self.available_themes)), self.apply_settings)

    def apply_settings(self, values: dict | None) -> None:
        """Save the settings screen's values to the config file and use them from the next message on."""
        if values is None:
            return
        try:
            changes = parse_settings(values)
        except UsageError as e:
            self.chat.say(str(e), title="Settings not saved", severity="error", timeout=15)
            return
        old_budget = self.bridge.settings.budget
        changes["theme"] = changes["theme"] or self.theme
        if not self._save(changes):
            return
        s, default = self.bridge.settings, SamplingParams()
        s.system = changes["system"]
        s.sampling = replace(s.sampling, **{k: default.__dict__[k] if changes[k] is None else changes[k]
                                            for k in ("temperature", "top_p", "top_k")})
        s.max_tokens = changes["max_tokens"] or 512
        s.codec = changes["snapshot_codec"] or "int4"
        s.thinking = changes["thinking"]
        if changes["theme"] in self.available_themes:
            self.theme = changes["theme"]
        self.chat.say(f"Settings saved to {config_path()}.", title="Settings")
        if changes["budget"] is not None and changes["budget"] != old_budget and self.bridge.ready:
            self.chat.set_budget(changes["budget"])

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is self.chat:
            yield SystemCommand("New conversation", "Start an empty conversation", self.action_new_conversation)
            yield SystemCommand("Attach document", "Read a file into this conversation", self.action_attach)
            yield SystemCommand("Export conversation", "Write it as Markdown into the current directory", self.action_export)
            yield SystemCommand("Rename conversation", "Give the highlighted conversation a title", self.action_rename)
            yield SystemCommand("Regenerate answer", "Answer the last message again", self.action_regenerate)
            yield SystemCommand("Edit last message", "Change the last message and send it again", self.action_edit_last)
            yield SystemCommand("Copy answer", "Copy the focused message, else the last answer", self.action_copy)
            yield SystemCommand("Sources", "The passages the last answer retrieved most", self.action_sources)
            yield SystemCommand("Search conversations", "Filter the list by words in titles and messages", self.action_search)
            yield SystemCommand("Models", "Load another model", self.action_models)
            yield SystemCommand("Settings", "System prompt, sampling, memory budget, thinking, snapshot codec, theme",
                                self.action_settings)
        yield SystemCommand("Help: keys", "Every key binding", self.action_help)
