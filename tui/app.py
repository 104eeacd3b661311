"""EdgectxApp: the terminal UI's App, its key bindings and its command palette entries.

The chat screen does the work; the app maps keys and palette commands onto it and opens the help screen.

    app = EdgectxApp(Bridge(load_engine, ConversationStore()))
    app.run()
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.chat import ChatScreen
from edgectx.tui.screens.help import HelpScreen
from edgectx.tui.widgets.sidebar import ConversationList

CHAT_ACTIONS = {"new_conversation", "attach", "export", "rename", "stop", "conversations"}


class EdgectxApp(App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere keep the stylesheet
    TITLE = "edgectx"
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New conversation"),
        Binding("ctrl+o", "attach", "Attach document"),
        Binding("ctrl+s", "export", "Export to Markdown"),
        Binding("f2", "rename", "Rename conversation"),
        Binding("ctrl+l", "conversations", "Conversations (↑↓ Enter opens)"),
        Binding("escape", "stop", "Stop the answer or the read"),
        Binding("f1,question_mark", "help", "Help"),
    ]

    def __init__(self, bridge: Bridge, export_dir: Path | None = None):
        super().__init__()
        self.bridge = bridge
        self.chat = ChatScreen(bridge, export_dir)

    def get_default_screen(self) -> Screen:
        return self.chat

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

    def action_stop(self) -> None:
        self.chat.cancel()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.BINDINGS))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is self.chat:
            yield SystemCommand("New conversation", "Start an empty conversation (Ctrl+N)", self.action_new_conversation)
            yield SystemCommand("Attach document", "Read a file into this conversation (Ctrl+O)", self.action_attach)
            yield SystemCommand("Export conversation", "Write it as Markdown into the current directory (Ctrl+S)",
                                self.action_export)
            yield SystemCommand("Rename conversation", "Give the highlighted conversation a title (F2)", self.action_rename)
        yield SystemCommand("Help: keys", "Every key binding (F1)", self.action_help)


def run_tui(args, config) -> int:
    """`edgectx` in a terminal, and `edgectx tui`: load the model in the background and run the app."""
    from edgectx.cli import memory_config_from
    from edgectx.engine import Engine
    from edgectx.models import resolve_model
    from edgectx.store import ConversationStore
    from edgectx.tui.bridge import Settings

    def load_engine(progress):
        path = resolve_model(args.model, config)
        return Engine.load(path, device=args.device or config.device, n_ctx=args.ctx, n_threads=args.threads or config.threads,
                           progress=progress, memory_config=memory_config_from(args, config),
                           weights=args.weights or config.weights or "auto")

    settings = Settings(system=args.system or config.system, codec=args.codec or config.snapshot_codec or "int4")
    with ConversationStore() as store:
        EdgectxApp(Bridge(load_engine, store, settings)).run()
    return 0
