"""The one thing the TUI talks to: the engine, the chat session, the recorder and the conversation store.

Every method blocks (model loading, prefill, decoding, SQLite), so the app calls the heavy ones from
`@work(thread=True)` workers and gets progress and answer pieces back through callbacks it turns into
messages. The engine is made by a loader function, so tests can hand in a fake engine (or a fake bridge).
Messages are stored as `edgectx chat` stores them: the user's before the answer starts, the answer
(a stopped one too) when it ends.

    bridge = Bridge(lambda: Engine.load(path), ConversationStore())
    bridge.load()
    bridge.send("Hello", on_piece=print, cancel=lambda: False)
    bridge.redo(None, on_piece=print, cancel=lambda: False)  # regenerate the last answer
    bridge.citations()  # the passages of the documents the last answer retrieved most
    bridge.conversations()  # newest first
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgectx.chat import ChatSession
from edgectx.chat_history import ChatRecorder, load_resumed
from edgectx.citations import Citation, cite
from edgectx.documents import DEFAULT_MAX_BYTES, Document, read_document
from edgectx.engine import Cancel, Cancelled, Engine, GenerationStats, Progress
from edgectx.errors import UsageError
from edgectx.models import ModelEntry
from edgectx.sampling import SamplingParams
from edgectx.store import Conversation, ConversationStore
from edgectx.store_export import export_markdown

Problem = Callable[[str], None]


@dataclass
class Resumption:
    """A conversation opened from the sidebar: its turns, what went wrong, and how its documents came back."""

    conversation: Conversation
    messages: list[dict[str, str]]
    warnings: list[str]
    documents_line: str | None  # "report.pdf: restored 98,304 tokens in 1.2 s"; None without documents


@dataclass
class Settings:
    system: str | None = None
    codec: str = "int4"  # how new document snapshots are stored
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    max_file_bytes: int = DEFAULT_MAX_BYTES
    budget: int | str | None = None  # the memory budget the loader uses (None: its default; "full": no memory)


def opened_line(names: str, opened) -> str:
    """What opening documents cost, in the words `edgectx chat --doc` prints."""
    if opened.restored_tokens:
        line = f"restored {opened.restored_tokens:,} tokens in {opened.elapsed_s:.1f} s"
        line += f", read {opened.prefilled_tokens:,} more" if opened.prefilled_tokens else ""
    else:
        line = f"read {opened.n_tokens:,} tokens in {opened.elapsed_s:.1f} s (saved for next time)"
    return f"{names}: {line}"


class Bridge:
    """`load_model(path, progress)` loads another model (the model picker); `list_models()` lists the choices."""

    def __init__(self, load_engine: Callable[[Progress | None], Engine], store: ConversationStore,
                 settings: Settings | None = None, load_model: Callable[[Path, Progress | None], Engine] | None = None,
                 list_models: Callable[[], list[ModelEntry]] | None = None):
        self._load_engine = load_engine
        self._load_model = load_model
        self._list_models = list_models
        self.store = store
        self.settings = settings or Settings()
        self.engine: Engine | None = None
        self.chat: ChatSession | None = None
        self.recorder: ChatRecorder | None = None
        self.documents: list[Document] = []
        self.snapshot_state: str | None = None  # "snapshot saved" / "snapshot restored" while documents are open
        self.retrieved: list[dict] = []  # what the last answer retrieved (GenerationStats.retrieved)
        self._opening = None
        self._opened_state: str | None = None

    # -- the model ---------------------------------------------------------------------------------

    def load(self, progress: Progress | None = None) -> str:
        """Load the model (raises EdgectxError with a sentence when it cannot); returns its description."""
        self.engine = self._load_engine(progress)
        self.new_conversation()
        return f"{self.engine.path.name}: {self.engine.spec.describe()} on {self.engine.device.type}"

    def models(self) -> list[ModelEntry]:
        return self._list_models() if self._list_models is not None else []

    def switch_model(self, path: Path, progress: Progress | None = None) -> str:
        """Load another model; the one loaded stays if this one fails. A new conversation starts."""
        if self._load_model is None:
            raise UsageError("This edgectx cannot switch models while running: restart it with --model.")
        engine = self._load_model(Path(path), progress)
        self.engine, self.model_path = engine, Path(path)
        self.new_conversation()
        return f"{engine.path.name}: {engine.spec.describe()} on {engine.device.type}"

    def set_budget(self, budget: int | str) -> None:
        """Use another memory budget from now on: a new, empty conversation starts with it."""
        from edgectx.memory_config import MemoryConfig

        engine = self._require_engine()
        self.settings.budget = budget
        chunk = engine.memory_config.chunk_tokens if engine.memory_config is not None else 512
        engine.configure_memory(None if budget == "full" else MemoryConfig.for_budget(int(budget), chunk_tokens=chunk))
        self.new_conversation()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model_name(self) -> str:
        return self.engine.path.name if self.engine is not None else ""

    def stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {}

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise UsageError("The model is not loaded: wait for it to load, or restart with another --model.")
        return self.engine

    # -- the conversation --------------------------------------------------------------------------

    @property
    def conversation_id(self) -> int | None:
        conversation = self.recorder.conversation if self.recorder is not None else None
        return conversation.id if conversation is not None else None

    def new_conversation(self) -> None:
        """An empty conversation without documents; it reaches the store with its first message."""
        engine = self._require_engine()
        engine.reset()
        self.documents, self._opening, self.snapshot_state, self.retrieved = [], None, None, []
        self.chat = ChatSession(engine, system=self.settings.system)
        self.recorder = ChatRecorder(self.store, engine, self.settings.system, [], [])

    def send(self, text: str, on_piece: Callable[[str], None], cancel: Cancel,
             progress: Progress | None = None) -> GenerationStats:
        """One exchange; a cancel keeps (and stores) the answer so far. Returns the turn's statistics."""
        engine = self._require_engine()
        self.recorder.user(text)
        before = engine.last_stats
        self.retrieved = []
        pieces: list[str] = []
        try:
            for piece in self.chat.send(text, self.settings.sampling, max_tokens=self.settings.max_tokens,
                                        progress=progress, cancel=cancel):
                pieces.append(piece)
                on_piece(piece)
        except Cancelled:
            # Stopped while reading the prompt: the chat took the message back, and so does the store.
            conversation_id = self.conversation_id
            if conversation_id is not None:
                self.store.delete_last(conversation_id, 1)
                if not self.store.messages(conversation_id):  # it was the first: no conversation yet after all
                    self.store.delete_conversation(conversation_id)
                    self.recorder.new_conversation()
        finally:
            stats = engine.last_stats
            if pieces or (stats is not before and stats.generated_tokens):
                self.recorder.assistant("".join(pieces), stats)
                self.retrieved = list(stats.retrieved)
        return engine.last_stats

    def redo(self, text: str | None, on_piece: Callable[[str], None], cancel: Cancel,
             progress: Progress | None = None) -> GenerationStats:
        """Send the last user message again (`text` None: regenerate its answer) or an edited one in its place:
        the message and its answer leave the chat and the store, and the memory is cut back to before them."""
        self._require_engine()
        last = self.chat.pop_turn()
        conversation_id = self.conversation_id
        if conversation_id is not None:
            stored = self.store.messages(conversation_id)
            users = [i for i, m in enumerate(stored) if m.role == "user"]
            if users:
                self.store.delete_last(conversation_id, len(stored) - users[-1])
        return self.send(last if text is None else text, on_piece, cancel, progress)

    def last_user_message(self) -> str | None:
        users = [m["content"] for m in self.chat.messages if m["role"] == "user"] if self.chat is not None else []
        return users[-1] if users else None

    def plan(self, text: str) -> tuple[int, int] | None:
        """(tokens already in memory, tokens to prefill) for sending `text` now; None before the model loads."""
        if self.chat is None or not text.strip():
            return None
        return self.chat.plan(text.strip())

    def citations(self) -> list[Citation]:
        """The passages of this conversation's documents the last answer retrieved most (none under full attention,
        or when nothing was evicted: then nothing was retrieved)."""
        return cite(self._opening, self.retrieved)

    def resume(self, conversation_id: int, progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> Resumption:
        """Continue a stored conversation, as `chat --resume` does: its documents restored from snapshots."""
        engine = self._require_engine()
        resumed = load_resumed(self.store, conversation_id, self.settings.max_file_bytes)
        system = resumed.conversation.system_prompt or self.settings.system
        engine.reset()
        line, doc_ids, opening = None, [], None
        if resumed.documents:
            try:
                opening, doc_ids, line = self._open(resumed.documents, progress, cancel, on_problem)
            except BaseException:
                self.new_conversation()  # the memory no longer holds the conversation that was open
                raise
        self.documents, self._opening, self.retrieved = list(resumed.documents), opening, []
        self.snapshot_state = self._opened_state if opening is not None else None
        self.chat = ChatSession(engine, system=system, opening=opening)
        self.chat.messages += resumed.messages
        self.recorder = ChatRecorder(self.store, engine, system, self.documents, doc_ids, resumed.conversation)
        for doc_id in doc_ids:
            self.store.documents.attach(resumed.conversation.id, doc_id)
        return Resumption(resumed.conversation, resumed.messages, resumed.warnings, line)

    def read_document(self, path: str) -> Document:
        """Read a file to attach, refusing bad ones (DocumentError) before any model work."""
        return read_document(path.strip(), max_bytes=self.settings.max_file_bytes)

    def attach(self, doc: Document, progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> str:
        """Add a document to the current conversation (restored from its snapshot, or read and snapshotted);
        the turns so far stay. A cancel leaves the conversation as it was. Returns the completion line."""
        engine = self._require_engine()
        if any(d.sha256 == doc.sha256 for d in self.documents):
            return f"{doc.path.name} is already attached to this conversation."
        documents = self.documents + [doc]
        turns = [m for m in self.chat.messages if m["role"] != "system"]
        system = self.recorder.system
        try:
            opening, doc_ids, line = self._open(documents, progress, cancel, on_problem)
        except BaseException:
            # The memory holds part of the new opening: start it afresh; the next turn reads the old opening again.
            engine.reset()
            self.chat = ChatSession(engine, system=system, opening=self._opening)
            self.chat.messages += turns
            raise
        self.documents, self._opening, self.snapshot_state = documents, opening, self._opened_state
        self.chat = ChatSession(engine, system=system, opening=opening)
        self.chat.messages += turns
        conversation = self.recorder.conversation
        self.recorder = ChatRecorder(self.store, engine, system, documents, doc_ids, conversation)
        if conversation is not None:
            for doc_id in doc_ids:
                self.store.documents.attach(conversation.id, doc_id)
        return line

    def _open(self, documents: list[Document], progress, cancel, on_problem):
        from edgectx.doc_context import build_opening, open_documents

        engine = self._require_engine()
        opening = build_opening(engine, documents)
        opened = open_documents(engine, self.store, opening, codec=self.settings.codec, progress=progress,
                                cancel=cancel, on_problem=on_problem)
        names = ", ".join(d.path.name for d in documents)
        self._opened_state = "snapshot restored" if opened.restored_tokens and not opened.prefilled_tokens else "snapshot saved"
        return opening, opened.document_ids, opened_line(names, opened)

    # -- the store ---------------------------------------------------------------------------------

    def conversations(self, search: str = "") -> list[Conversation]:
        """Newest first; with `search`, those whose title or messages hold every word (the store's full-text search)."""
        if search.strip():
            return [hit.conversation for hit in self.store.search(search)]
        return self.store.list_conversations()

    def messages(self, conversation_id: int) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.store.messages(conversation_id) if m.role != "system"]

    def rename(self, conversation_id: int, title: str) -> None:
        conversation = self.store.rename_conversation(conversation_id, title)
        if self.recorder is not None and self.conversation_id == conversation_id:
            self.recorder.conversation = conversation

    def delete(self, conversation_id: int) -> None:
        """Delete a stored conversation; deleting the open one starts a new one."""
        self.store.delete_conversation(conversation_id)
        if self.conversation_id == conversation_id and self.engine is not None:
            self.new_conversation()

    def export(self, conversation_id: int, directory: Path) -> Path:
        """Write the conversation as Markdown into `directory` (never over an existing file); returns the file."""
        text = export_markdown(self.store, conversation_id)
        path = directory / f"edgectx-conversation-{conversation_id}.md"
        n = 1
        while path.exists():
            n += 1
            path = directory / f"edgectx-conversation-{conversation_id}-{n}.md"
        path.write_text(text, encoding="utf-8")
        return path
