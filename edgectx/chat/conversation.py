"""A conversation over one engine: the one object `edgectx chat` and the terminal UI both drive.

It ties together what a conversation needs below the faces: the turns (ChatSession), the documents at its
start (restored from their snapshots or read and snapshotted: edgectx.chat.opening), the conversation store
(each message saved as it exists: ChatRecorder), resuming a stored conversation, and the citations of the
last answer. Every method blocks (prefill, decoding, SQLite); the TUI calls them from a worker thread.

    conversation = Conversation(engine, store, Settings(system="Be brief."))
    conversation.attach([read_document("report.pdf")], progress=bar.update)  # "report.pdf: restored 98,304 tokens in 1.2 s"
    conversation.send("What does chapter 3 claim?", on_piece=print)
    conversation.citations()                    # the passages the answer retrieved most
    conversation.redo(None, on_piece=print)     # answer the last message again

Messages are stored as they exist: the user's before the answer starts, the answer (a stopped one too) when
it ends. A message whose prompt was never read (stopped, or the read failed) leaves the store again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from edgectx.chat.citations import Citation, cite
from edgectx.chat.documents import DEFAULT_MAX_BYTES, Document
from edgectx.chat.opening import Opening, build_opening, open_documents
from edgectx.chat.reasoning import Routing
from edgectx.chat.recorder import ChatRecorder, load_resumed
from edgectx.chat.session import ChatSession
from edgectx.engine import Cancel, Cancelled, Engine, GenerationStats, Progress
from edgectx.model.sampling import SamplingParams
from edgectx.store.conversations import ConversationStore, StoredConversation

Problem = Callable[[str], None]  # a problem the conversation got past, in one sentence
OnPiece = Callable[[str], None]  # each piece of the answer as it is decoded


@dataclass
class Settings:
    """How a conversation answers and stores; the faces fill it from flags, the config file and the settings screen."""

    system: str | None = None
    codec: str = "int4"  # how new document snapshots are stored
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # the answer ends when it contains one of these
    max_file_bytes: int = DEFAULT_MAX_BYTES
    budget: int | str | None = None  # the memory budget the engine was loaded with (None: the default; "full": none)
    thinking: bool | None = None  # a reasoning model's thinking: None as its template has it, False asks for none

    @property
    def template_vars(self) -> dict:
        """What the model's chat template is told besides the messages (Qwen3's `enable_thinking` switch)."""
        return {} if self.thinking is None else {"enable_thinking": self.thinking}


@dataclass
class Resumption:
    """A stored conversation continued: its turns, what went wrong, and how its documents came back."""

    conversation: StoredConversation
    messages: list[dict[str, str]]
    warnings: list[str]
    documents_line: str | None  # "report.pdf: restored 98,304 tokens in 1.2 s"; None without documents


class Conversation:
    """`record=False` keeps the turns out of the store (`chat --no-history`); documents and snapshots still use it."""

    def __init__(self, engine: Engine, store: ConversationStore, settings: Settings | None = None, record: bool = True):
        self.engine, self.store, self.record = engine, store, record
        self.settings = settings or Settings()
        self.new()

    def new(self) -> None:
        """An empty conversation without documents; it reaches the store with its first message."""
        self.engine.reset()
        self._begin(self.settings.system, [], None, [], None)

    def _begin(self, system: str | None, documents: list[Document], opening: Opening | None, document_ids: list[int],
               stored: StoredConversation | None, turns: list[dict[str, str]] = (), snapshot_state: str | None = None) -> None:
        self.documents, self.opening, self.snapshot_state = list(documents), opening, snapshot_state
        self.retrieved: list[dict] = []  # what the last answer retrieved (GenerationStats.retrieved)
        self.session = ChatSession(self.engine, system=system, opening=opening, template_vars=self.settings.template_vars)
        self.session.messages += turns
        self.recorder = ChatRecorder(self.store if self.record else None, self.engine, system, self.documents,
                                     document_ids, stored)
        if stored is not None and self.record:
            for doc_id in document_ids:
                self.store.documents.attach(stored.id, doc_id)

    @property
    def id(self) -> int | None:
        """The stored conversation's id; None until its first message is stored."""
        return self.recorder.conversation.id if self.recorder.conversation is not None else None

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.session.messages

    def reset(self) -> None:
        """A new conversation over the same documents (`/reset`): their tokens stay in memory, the turns go."""
        self.session.reset()
        self.recorder.new_conversation()
        self.retrieved = []

    # -- documents ---------------------------------------------------------------------------------

    def attach(self, documents: list[Document], progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> str:
        """Add documents (restored from their snapshots, or read and snapshotted); the turns so far stay.
        A cancel or a failure leaves the conversation as it was. Returns the line that says what it cost."""
        held = {d.sha256 for d in self.documents}
        new = [d for d in documents if d.sha256 not in held]
        if not new:
            return f"{', '.join(d.path.name for d in documents)} is already attached to this conversation."
        documents = self.documents + new
        turns = [m for m in self.session.messages if m["role"] != "system"]
        system = self.recorder.system
        try:
            opening, opened = self._open(documents, progress, cancel, on_problem)
        except BaseException:
            # The memory holds part of the new opening: start it afresh; the next turn reads the old opening again.
            self.engine.reset()
            self.session = ChatSession(self.engine, system=system, opening=self.opening,
                                       template_vars=self.settings.template_vars)
            self.session.messages += turns
            raise
        self._begin(system, documents, opening, opened.document_ids, self.recorder.conversation, turns, opened.snapshot_state)
        return opened.summary(", ".join(d.path.name for d in documents))

    def _open(self, documents: list[Document], progress, cancel, on_problem):
        opening = build_opening(self.engine, documents)
        opened = open_documents(self.engine, self.store, opening, codec=self.settings.codec, progress=progress,
                                cancel=cancel, on_problem=on_problem)
        return opening, opened

    def resume(self, conversation_id: int, documents: list[Document] = (), progress: Progress | None = None,
               cancel: Cancel | None = None, on_problem: Problem | None = None) -> Resumption:
        """Continue a stored conversation: its system prompt, turns and documents (re-read from their paths and
        checked by SHA-256, restored from their snapshots), plus `documents` not among them. A cancel or a failure
        while reading leaves a new, empty conversation."""
        resumed = load_resumed(self.store, conversation_id, self.settings.max_file_bytes)
        system = resumed.conversation.system_prompt or self.settings.system
        held = {d.sha256 for d in resumed.documents}
        documents = resumed.documents + [d for d in documents if d.sha256 not in held]
        self.engine.reset()
        opening, opened, line = None, None, None
        if documents:
            try:
                opening, opened = self._open(documents, progress, cancel, on_problem)
            except BaseException:
                self.new()  # the memory no longer holds the conversation that was open
                raise
            line = opened.summary(", ".join(d.path.name for d in documents))
        self._begin(system, documents, opening, opened.document_ids if opened else [], resumed.conversation,
                    resumed.messages, opened.snapshot_state if opened else None)
        return Resumption(resumed.conversation, resumed.messages, resumed.warnings, line)

    # -- turns -------------------------------------------------------------------------------------

    def send(self, text: str, on_piece: OnPiece, cancel: Cancel | None = None,
             progress: Progress | None = None, on_reasoning: OnPiece | None = None) -> GenerationStats:
        """One exchange. A cancel while the prompt is read takes the message back (from the store too); a cancel
        while answering keeps and stores the answer so far. Returns the turn's statistics. `on_reasoning`: a
        reasoning model's thinking goes there, apart from the answer (edgectx.chat.reasoning); the conversation
        keeps the answer whole, as the model wrote it (its template drops past thinking)."""
        s = self.settings
        self.recorder.user(text)
        before, n_messages = self.engine.last_stats, len(self.session.messages)
        self.retrieved = []
        pieces: list[str] = []
        answer = self.session.send(text, s.sampling, max_tokens=s.max_tokens, stop=s.stop, progress=progress, cancel=cancel)
        route = Routing(on_piece, on_reasoning, self.session.reasons, lambda: self.session.opened_thinking)
        try:
            for piece in answer:
                pieces.append(piece)
                route(piece)
            route.close()
        except Cancelled:
            pass  # stopped while reading the prompt: taken back below
        finally:
            answer.close()  # an exception from on_piece: the session keeps the answer so far before we look
            if len(self.session.messages) == n_messages:  # the session took the message back: so does the store
                self._unstore_last_message()
            stats = self.engine.last_stats
            if pieces or (stats is not before and stats.generated_tokens):
                self.recorder.assistant("".join(pieces), stats)
                self.retrieved = list(stats.retrieved)
        return self.engine.last_stats

    def _unstore_last_message(self) -> None:
        conversation_id = self.id
        if conversation_id is None or self.recorder.store is None:
            return
        self.store.delete_last(conversation_id, 1)
        if not self.store.messages(conversation_id):  # it was the first: no conversation yet after all
            self.store.delete_conversation(conversation_id)
            self.recorder.new_conversation()

    def redo(self, text: str | None, on_piece: OnPiece, cancel: Cancel | None = None,
             progress: Progress | None = None, on_reasoning: OnPiece | None = None) -> GenerationStats:
        """Send the last user message again (`text` None: regenerate its answer) or an edited one in its place:
        the message and its answer leave the session and the store, and the memory is cut back to before them."""
        last = self.session.pop_turn()
        conversation_id = self.id
        if conversation_id is not None and self.recorder.store is not None:
            stored = self.store.messages(conversation_id)
            users = [i for i, m in enumerate(stored) if m.role == "user"]
            if users:
                self.store.delete_last(conversation_id, len(stored) - users[-1])
        return self.send(last if text is None else text, on_piece, cancel, progress, on_reasoning)

    def last_user_message(self) -> str | None:
        users = [m["content"] for m in self.session.messages if m["role"] == "user"]
        return users[-1] if users else None

    def plan(self, text: str) -> tuple[int, int] | None:
        """(tokens already in memory, tokens to prefill) for sending `text` now; None for an empty text."""
        return self.session.plan(text.strip()) if text.strip() else None

    def citations(self) -> list[Citation]:
        """The passages of this conversation's documents the last answer retrieved most (none under full attention,
        or when nothing was evicted: then nothing was retrieved)."""
        return cite(self.opening, self.retrieved)
