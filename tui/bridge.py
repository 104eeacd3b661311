"""The UI's side of a conversation: the one thing the TUI's screens talk to.

The conversation itself (turns, documents, resuming, storing, citations) is edgectx.chat.conversation's
`Conversation`, the same object `edgectx chat` drives; the bridge adds what only an app needs: loading the
model in the background and switching models, the memory budget the settings screen changes, and the
conversation list of the sidebar. Every method blocks (model loading, prefill, decoding, SQLite), so the app
calls the heavy ones from `@work(thread=True)` workers. The engine is made by a loader function, so tests can
hand in a fake engine (or a fake bridge). A remote engine (edgectx.chat.remote, `edgectx tui --engine URL`)
takes the local one's place: its conversations are RemoteConversations, and what only the local memory has
(the gauge, the budget, citations) is reported unavailable.

    bridge = Bridge(lambda progress: Engine.load(path), ConversationStore())
    bridge.load()
    bridge.send("Hello", on_piece=print, cancel=lambda: False)
    bridge.redo(None, on_piece=print, cancel=lambda: False)  # regenerate the last answer
    bridge.conversations()  # newest first
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgectx.chat.citations import Citation
from edgectx.chat.conversation import Conversation, Problem, Resumption, Settings
from edgectx.chat.documents import Document, read_document
from edgectx.chat.remote import RemoteConversation, RemoteEngine
from edgectx.engine import Cancel, Engine, GenerationStats, Progress
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.model.discover import ModelEntry
from edgectx.store.conversations import ConversationStore, StoredConversation
from edgectx.store.export import export_markdown


def describe(engine) -> str:
    """What the transcript says once the engine is ready."""
    if isinstance(engine, RemoteEngine):
        return engine.describe()
    return f"{engine.path.name}: {engine.spec.describe()} on {engine.device.type}"


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
        self.conversation: Conversation | None = None

    # -- the model ---------------------------------------------------------------------------------

    def load(self, progress: Progress | None = None) -> str:
        """Load the model (raises EdgectxError with a sentence when it cannot); returns its description."""
        self.engine = self._load_engine(progress)
        self.new_conversation()
        return describe(self.engine)

    def models(self) -> list[ModelEntry]:
        return self._list_models() if self._list_models is not None else []

    def switch_model(self, path: Path, progress: Progress | None = None) -> str:
        """Load another model; the one loaded stays if this one fails. A new conversation starts."""
        if self.remote:
            raise UsageError("The model is the remote engine's: restart with --engine-model to pick another it serves.")
        if self._load_model is None:
            raise UsageError("This edgectx cannot switch models while running: restart it with --model.")
        engine = self._load_model(Path(path), progress)
        self.engine, self.model_path = engine, Path(path)
        self.new_conversation()
        return describe(engine)

    def set_budget(self, budget: int | str) -> None:
        """Use another memory budget from now on: a new, empty conversation starts with it."""
        engine = self._require_engine()
        if self.remote:
            raise UsageError("The memory budget is the remote engine's own: it cannot be set from here.")
        self.settings.budget = budget
        chunk = engine.memory_config.chunk_tokens if engine.memory_config is not None else 512
        engine.configure_memory(None if budget == "full" else MemoryConfig.for_budget(int(budget), chunk_tokens=chunk))
        self.new_conversation()

    @property
    def remote(self) -> bool:
        """Whether the engine is a remote server (no memory gauge, snapshots or citations here)."""
        return isinstance(self.engine, RemoteEngine)

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

    def _require_conversation(self) -> Conversation:
        self._require_engine()
        return self.conversation

    # -- the open conversation (edgectx.chat.conversation) -----------------------------------------

    @property
    def conversation_id(self) -> int | None:
        return self.conversation.id if self.conversation is not None else None

    @property
    def snapshot_state(self) -> str | None:
        """"snapshot saved" / "snapshot restored" while documents are open."""
        return self.conversation.snapshot_state if self.conversation is not None else None

    def new_conversation(self) -> None:
        """An empty conversation without documents; it reaches the store with its first message (not when the
        store is read-only: the chat goes on unsaved, as `chat --no-history` does)."""
        kind = RemoteConversation if self.remote else Conversation
        self.conversation = kind(self._require_engine(), self.store, self.settings, record=not self.store.read_only)

    def send(self, text: str, on_piece: Callable[[str], None], cancel: Cancel,
             progress: Progress | None = None, on_reasoning: Callable[[str], None] | None = None) -> GenerationStats:
        return self._require_conversation().send(text, on_piece, cancel, progress, on_reasoning)

    def redo(self, text: str | None, on_piece: Callable[[str], None], cancel: Cancel,
             progress: Progress | None = None, on_reasoning: Callable[[str], None] | None = None) -> GenerationStats:
        return self._require_conversation().redo(text, on_piece, cancel, progress, on_reasoning)

    def last_user_message(self) -> str | None:
        return self.conversation.last_user_message() if self.conversation is not None else None

    def plan(self, text: str) -> tuple[int, int] | None:
        """(tokens already in memory, tokens to prefill) for sending `text` now; None before the model loads."""
        return self.conversation.plan(text) if self.conversation is not None else None

    def citations(self) -> list[Citation]:
        return self.conversation.citations() if self.conversation is not None else []

    def resume(self, conversation_id: int, progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> Resumption:
        return self._require_conversation().resume(conversation_id, progress=progress, cancel=cancel, on_problem=on_problem)

    def read_document(self, path: str) -> Document:
        """Read a file to attach, refusing bad ones (DocumentError) before any model work."""
        return read_document(path.strip(), max_bytes=self.settings.max_file_bytes)

    def attach(self, doc: Document, progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> str:
        return self._require_conversation().attach([doc], progress=progress, cancel=cancel, on_problem=on_problem)

    # -- the store ---------------------------------------------------------------------------------

    def conversations(self, search: str = "") -> list[StoredConversation]:
        """Newest first; with `search`, those whose title or messages hold every word (the store's full-text search)."""
        if search.strip():
            return [hit.conversation for hit in self.store.search(search)]
        return self.store.list_conversations()

    def messages(self, conversation_id: int) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.store.messages(conversation_id) if m.role != "system"]

    def rename(self, conversation_id: int, title: str) -> None:
        stored = self.store.rename_conversation(conversation_id, title)
        if self.conversation is not None and self.conversation_id == conversation_id:
            self.conversation.recorder.conversation = stored

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
