"""Citations under an answer, and the side panel that shows a cited passage.

`CitationList` lists the passages of the attached documents the answer retrieved most ("notes.md:12-18"),
best first; Enter (or a click) on one posts `CitationList.Opened`, and the chat screen shows the passage in
the `PassagePanel` beside the transcript.

    await transcript.add_citations(bridge.citations())
    panel.show(citation); panel.close()
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, Static

from edgectx.chat.citations import Citation


class CitationItem(ListItem):
    def __init__(self, citation: Citation):
        snippet = " ".join(citation.text.split())[:60]
        line = Text.assemble((citation.where, "bold"), f"  {citation.score:.2f}  ", (snippet, "dim"))
        super().__init__(Label(line))
        self.citation = citation


class CitationList(ListView):
    DEFAULT_CSS = """
    CitationList { height: auto; max-height: 7; margin: 0 8 0 0; background: $boost; }
    CitationList > CitationItem { height: 1; padding: 0 1; }
    """

    class Opened(Message):
        def __init__(self, citation: Citation):
            super().__init__()
            self.citation = citation

    def __init__(self, citations: list[Citation]):
        super().__init__(*(CitationItem(c) for c in citations))
        self.citations = citations
        self.border_title = "sources the answer retrieved most (Enter opens)"

    @on(ListView.Selected)
    def _opened(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, CitationItem):
            self.post_message(self.Opened(event.item.citation))


class PassagePanel(VerticalScroll):
    """A cited passage beside the transcript; hidden until a citation is opened."""

    DEFAULT_CSS = """
    PassagePanel { width: 45%; display: none; border-left: solid $accent; padding: 0 1; }
    PassagePanel.-open { display: block; }
    PassagePanel #passage-title { text-style: bold; margin-bottom: 1; }
    """
    BINDINGS = [Binding("escape", "close", "Close the passage", show=False)]

    def compose(self) -> ComposeResult:
        yield Label(id="passage-title")
        yield Static(id="passage-text", markup=False)

    def show(self, citation: Citation) -> None:
        self.citation = citation
        self.query_one("#passage-title", Label).update(f"{citation.path} · {citation.where.split(':', 1)[1]}")
        self.query_one("#passage-text", Static).update(citation.text)
        self.add_class("-open")
        self.scroll_home(animate=False)
        self.focus()

    def action_close(self) -> None:
        self.remove_class("-open")

    @property
    def is_open(self) -> bool:
        return self.has_class("-open")

    @property
    def text(self) -> str:
        return str(self.query_one("#passage-text", Static).render())
