"""What `edgectx chat` keeps in the conversation store: each message as soon as it exists, and what to resume.

A user message is committed before its answer starts and the answer when it ends (stopped answers too),
each in its own SQLite transaction, so a killed process loses at most the answer being written.
Resuming re-reads the conversation's documents from their paths and checks their SHA-256: a file that
changed or vanished is left out with one warning, never silently mixed with the old text.

    recorder = ChatRecorder(store, engine, system="Be brief.", document_ids=[3])
    recorder.user("What does chapter 3 claim?")
    recorder.assistant("That ...", engine.last_stats)
"""

from __future__ import annotations

from dataclasses import dataclass

from edgectx.chat.documents import Document, read_document
from edgectx.engine import Engine, GenerationStats
from edgectx.errors import DocumentError
from edgectx.store.conversations import ConversationStore, StoredConversation

TITLE_CHARS = 60


def title_from(text: str, documents: list[Document]) -> str:
    first = " ".join(text.split())
    title = first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1].rstrip() + "…"
    return f"{documents[0].path.name}: {title}" if documents else title


class ChatRecorder:
    """Writes one chat's messages to the store; the conversation row is made at the first message."""

    def __init__(self, store: ConversationStore | None, engine: Engine, system: str | None,
                 documents: list[Document], document_ids: list[int], conversation: StoredConversation | None = None):
        self.store, self.engine, self.system = store, engine, system
        self.documents, self.document_ids = documents, document_ids
        self.conversation = conversation

    def user(self, text: str) -> None:
        if self.store is None:
            return
        if self.conversation is None:
            self.conversation = self.store.create_conversation(
                title_from(text, self.documents), model_name=self.engine.path.name,
                model_fingerprint=self.engine.fingerprint, system_prompt=self.system)
            for doc_id in self.document_ids:
                self.store.documents.attach(self.conversation.id, doc_id)
        tokenizer = self.engine.tokenizer  # None for a remote engine, which tokenizes on its side
        self.store.add_message(self.conversation.id, "user", text,
                               n_tokens=len(tokenizer.encode(text)) if tokenizer is not None else None)

    def assistant(self, text: str, stats: GenerationStats) -> None:
        if self.store is None or self.conversation is None:
            return
        timings = {"prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
                   "tokens_per_s": round(stats.decode_tok_s, 2), "prompt_tokens": stats.prompt_tokens,
                   "reused_tokens": stats.reused_tokens, "stop_reason": stats.stop_reason}
        self.store.add_message(self.conversation.id, "assistant", text, n_tokens=stats.generated_tokens, timings=timings)

    def new_conversation(self) -> None:
        self.conversation = None


@dataclass
class Resumed:
    conversation: StoredConversation
    messages: list[dict[str, str]]  # user and assistant turns, oldest first
    documents: list[Document]  # those still on disk unchanged
    warnings: list[str]


def load_resumed(store: ConversationStore, conversation_id: int, max_bytes: int) -> Resumed:
    conversation = store.get_conversation(conversation_id)  # StoreError names `edgectx history` when unknown
    messages = [{"role": m.role, "content": m.content} for m in store.messages(conversation_id) if m.role != "system"]
    documents, warnings = [], []
    for row in store.documents.attached(conversation_id):
        if "\x00" in row.path:  # no file has such a name: the row is damaged
            warnings.append(f"Conversation {conversation_id} names a document by a damaged path: the conversation goes on "
                            "without it.")
            continue
        try:
            doc = read_document(row.path, max_bytes=max_bytes)
        except DocumentError as e:
            warnings.append(f"{e} The conversation goes on without it.")
            continue
        if doc.sha256 != row.sha256:
            warnings.append(f"{row.path} changed since this conversation read it: the conversation goes on without it.")
            continue
        documents.append(doc)
    return Resumed(conversation, messages, documents, warnings)
