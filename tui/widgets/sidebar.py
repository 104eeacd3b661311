"""The conversation list: stored conversations, newest first; Enter opens one, Delete asks to delete it.

    list = ConversationList()
    list.show(bridge.conversations(), current_id=3)
    list.highlighted_id  # the conversation rename and export act on
"""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Label, ListItem, ListView

from edgectx.store.conversations import StoredConversation
from edgectx.store.export import UNTITLED


def when_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


class ConversationItem(ListItem):
    def __init__(self, conversation: StoredConversation, current: bool):
        when = when_text(conversation.updated_at)
        title = conversation.title or UNTITLED
        n = conversation.n_messages
        line = Text.assemble(("▶ " if current else "") + title, "\n", (f"{when} · {n} message{'' if n == 1 else 's'}", "dim"))
        super().__init__(Label(line), id=f"conversation-{conversation.id}")
        self.conversation = conversation


class ConversationList(ListView):
    DEFAULT_CSS = """
    ConversationList { height: 1fr; }
    ConversationItem { padding: 0 1; height: auto; }
    """
    BINDINGS = [Binding("delete,d", "delete", "Delete conversation")]

    class Opened(Message):
        """The user chose a conversation to continue."""

        def __init__(self, conversation_id: int):
            super().__init__()
            self.conversation_id = conversation_id

    class DeleteRequested(Message):
        def __init__(self, conversation_id: int):
            super().__init__()
            self.conversation_id = conversation_id

    @property
    def conversation_ids(self) -> list[int]:
        return [item.conversation.id for item in self.query(ConversationItem)]

    @property
    def highlighted_id(self) -> int | None:
        item = self.highlighted_child
        return item.conversation.id if isinstance(item, ConversationItem) else None

    async def show(self, conversations: list[StoredConversation], current_id: int | None) -> None:
        """Replace the list, keeping the highlight on the same conversation (else on the current one)."""
        keep = self.highlighted_id or current_id
        await self.clear()
        await self.extend(ConversationItem(c, c.id == current_id) for c in conversations)
        ids = [c.id for c in conversations]
        if ids:
            self.index = ids.index(keep) if keep in ids else 0

    @on(ListView.Selected)
    def _opened(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            event.stop()
            self.post_message(self.Opened(event.item.conversation.id))

    def action_delete(self) -> None:
        if self.highlighted_id is not None:
            self.post_message(self.DeleteRequested(self.highlighted_id))
