"""The conversation as it reads: user messages, assistant answers rendered as Markdown (streamed as they
arrive), dim notices (documents opened, an answer stopped) and the citations under an answer.
Messages take the focus (Tab, or a click), so the copy key can act on the one chosen.

    transcript = Transcript()
    await transcript.show([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "**Hello**"}])
    answer = await transcript.start_answer()
    await answer.write("Hel"); await answer.write("lo"); await answer.finish()
"""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static

from edgectx.chat.reasoning import split_answer
from edgectx.tui.widgets.citations import CitationList


class UserMessage(Static):
    can_focus = True

    def __init__(self, text: str):
        super().__init__(text, markup=False)
        self.text = text


def _quoted(text: str) -> str:
    return text.replace("\n", "\n> ")


class AssistantMessage(Markdown):
    """An answer; `text` is the answer received so far, also while it streams, and `thinking` a reasoning model's
    thinking before it (edgectx.chat.reasoning), shown as a dimmed quote above the answer. A stored answer is
    split as it is shown (it keeps the model's `<think>` block)."""

    can_focus = True

    def __init__(self, text: str = ""):
        thinking, answer = split_answer(text)
        super().__init__(f"> {_quoted(thinking)}\n\n{answer}" if thinking else answer)
        self.text, self.thinking = answer, thinking
        self._stream = None

    async def write_thinking(self, piece: str) -> None:
        shown = ("" if self.thinking else "> ") + _quoted(piece)
        self.thinking += piece
        await self._write(shown)

    async def write(self, piece: str) -> None:
        shown = "\n\n" + piece if self.thinking and not self.text else piece  # the answer starts below the quote
        self.text += piece
        await self._write(shown)

    async def _write(self, markdown: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self)
        await self._stream.write(markdown)

    async def finish(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None


class Notice(Static):
    def __init__(self, text: str):
        super().__init__(text, markup=False)
        self.text = text


class Transcript(VerticalScroll):
    DEFAULT_CSS = """
    Transcript { height: 1fr; padding: 0 1; }
    UserMessage { margin: 1 0 0 8; padding: 0 1; background: $boost; border-left: thick $accent; }
    AssistantMessage { margin: 1 8 0 0; padding: 0 1; }
    AssistantMessage MarkdownBlockQuote { color: $text-muted; }
    UserMessage:focus { background: $accent 20%; }
    AssistantMessage:focus { background: $accent 10%; }
    Notice { margin: 1 0 0 0; color: $text-muted; }
    """

    def on_mount(self) -> None:
        self.anchor()  # a chat: the newest message sits at the bottom, and the view follows it

    async def show(self, messages: list[dict[str, str]]) -> None:
        await self.remove_children()
        widgets = [UserMessage(m["content"]) if m["role"] == "user" else AssistantMessage(m["content"])
                   for m in messages if m["role"] in ("user", "assistant")]
        await self.mount_all(widgets)
        self.scroll_end(animate=False)

    async def add_user(self, text: str) -> UserMessage:
        return await self._add(UserMessage(text))

    async def add_notice(self, text: str) -> Notice:
        return await self._add(Notice(text))

    async def add_citations(self, citations) -> CitationList:
        return await self._add(CitationList(citations))

    async def drop_last_turn(self) -> None:
        """Remove the last user message and everything after it (the turn being regenerated or edited)."""
        users = [w for w in self.children if isinstance(w, UserMessage)]
        if users:
            after = self.children[self.children.index(users[-1]):]
            await self.remove_children(list(after))

    def last_answer(self) -> AssistantMessage | None:
        answers = [w for w in self.children if isinstance(w, AssistantMessage)]
        return answers[-1] if answers else None

    def last_citations(self) -> CitationList | None:
        lists = [w for w in self.children if isinstance(w, CitationList)]
        return lists[-1] if lists else None

    async def start_answer(self) -> AssistantMessage:
        self.anchor()  # follow the answer as it grows, until the user scrolls away
        return await self._add(AssistantMessage())

    async def _add(self, widget):
        await self.mount(widget)
        self.scroll_end(animate=False)
        return widget

    @property
    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every message shown, in order: what tests and exports read."""
        kinds = {UserMessage: "user", AssistantMessage: "assistant", Notice: "notice"}
        return [(kinds[type(w)], w.text) for w in self.children if type(w) in kinds]
