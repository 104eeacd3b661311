"""ConversationStore: conversations, their messages, documents and snapshot links, kept in SQLite.

The file is `edgectx.db` in the data dir (`$EDGECTX_HOME`, else platformdirs' user data dir); see
edgectx.store.db for how it is opened, migrated and shared between processes. Every method that writes is
one transaction. Documents live in `store.documents` (edgectx.store.documents), the snapshot manifest in
`store.snapshots` (edgectx.store.snapshots), Markdown and JSON export in edgectx.store.export.

    with ConversationStore() as store:
        chat = store.create_conversation("Reading the report", model_name="qwen2.5-1.5b")
        store.add_message(chat.id, "user", "What does chapter 3 claim?", n_tokens=9)
        store.search("chapter")  # [SearchHit(conversation=..., snippet='What does **chapter** 3 claim?')]
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from edgectx.config import data_dir
from edgectx.errors import StoreError
from edgectx.store.db import Database
from edgectx.store.documents import Documents
from edgectx.store.snapshots import SnapshotManifest
from edgectx.store.values import integer, json_object, optional_int, optional_text, seconds, text

ROLES = ("system", "user", "assistant")
DB_NAME = "edgectx.db"

_CONVERSATION = ("SELECT c.id, c.title, c.created_at, c.updated_at, c.model_name, c.model_fingerprint, c.system_prompt, "
                 "c.settings_json, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages "
                 "FROM conversations c")
_MESSAGE = "SELECT id, conversation_id, position, role, content, n_tokens, timings_json, created_at FROM messages"


@dataclass(frozen=True)
class StoredConversation:
    id: int
    title: str
    created_at: float  # Unix seconds
    updated_at: float
    model_name: str | None
    model_fingerprint: str | None
    system_prompt: str | None
    settings: dict
    n_messages: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredConversation:
        """Every value checked (edgectx.store.values): a damaged one reads as absent."""
        return cls(id=integer(row["id"]), title=text(row["title"]), created_at=seconds(row["created_at"]),
                   updated_at=seconds(row["updated_at"]), model_name=optional_text(row["model_name"]),
                   model_fingerprint=optional_text(row["model_fingerprint"]),
                   system_prompt=optional_text(row["system_prompt"]), settings=json_object(row["settings_json"]),
                   n_messages=integer(row["n_messages"]))


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    position: int  # 0, 1, 2 ... within the conversation
    role: str  # system | user | assistant
    content: str
    n_tokens: int | None
    timings: dict  # e.g. prefill_s, decode_s, tokens_per_s
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Message:
        """Every value checked (edgectx.store.values): a damaged one reads as absent."""
        return cls(id=integer(row["id"]), conversation_id=integer(row["conversation_id"]), position=integer(row["position"]),
                   role=text(row["role"]), content=text(row["content"]), n_tokens=optional_int(row["n_tokens"]),
                   timings=json_object(row["timings_json"]), created_at=seconds(row["created_at"]))


@dataclass(frozen=True)
class SearchHit:
    conversation: StoredConversation
    snippet: str  # matched words in **bold**
    message_id: int | None  # the best-matching message; None when only the title matched


def _json_object(value: dict | None, what: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict")
    return json.dumps(value, sort_keys=True)


def fts_query(text: str) -> str | None:
    """The user's words as an FTS5 query that cannot be malformed: each word a quoted phrase, all required.

    A trailing `*` keeps its prefix meaning (`summar*`); FTS5 operators and punctuation are plain text.
    None when no word is left to search for.
    """
    phrases = []
    for word in text.split():
        core = word.rstrip("*")
        if not re.search(r"\w", core):
            continue
        phrases.append('"' + core.replace('"', '""') + '"' + ("*" if core != word else ""))
    return " ".join(phrases) or None


class ConversationStore:
    """Conversations and their messages; `documents` and `snapshots` share the same file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path is not None else data_dir() / DB_NAME
        self._db = Database(self.path)
        self.documents = Documents(self._db)
        self.snapshots = SnapshotManifest(self._db, self.path.parent)

    @property
    def read_only(self) -> bool:
        """The file can only be read (a read-only data dir): listing and exporting work, every write raises StoreError."""
        return self._db.read_only

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reading(self) -> AbstractContextManager[sqlite3.Connection]:
        """A context in which several reads see one consistent state (exports use it)."""
        return self._db.reading()

    # Conversations

    def create_conversation(self, title: str = "", *, model_name: str | None = None, model_fingerprint: str | None = None,
                            system_prompt: str | None = None, settings: dict | None = None) -> StoredConversation:
        now = time.time()
        with self._db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO conversations (title, created_at, updated_at, model_name, model_fingerprint, system_prompt, "
                "settings_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, now, now, model_name, model_fingerprint, system_prompt, _json_object(settings, "settings")))
            return self._conversation(conn, cursor.lastrowid)

    def get_conversation(self, conversation_id: int) -> StoredConversation:
        with self._db.reading() as conn:
            return self._conversation(conn, conversation_id)

    def list_conversations(self, limit: int | None = None) -> list[StoredConversation]:
        """Most recently updated first."""
        rows = self._db.rows(_CONVERSATION + " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?", (-1 if limit is None else limit,))
        return [StoredConversation.from_row(r) for r in rows]

    def rename_conversation(self, conversation_id: int, title: str) -> StoredConversation:
        return self.update_conversation(conversation_id, title=title)

    def update_conversation(self, conversation_id: int, *, title: str | None = None, model_name: str | None = None,
                            model_fingerprint: str | None = None, system_prompt: str | None = None,
                            settings: dict | None = None) -> StoredConversation:
        """Change the fields given (None leaves a field as it is)."""
        changes = {"title": title, "model_name": model_name, "model_fingerprint": model_fingerprint, "system_prompt": system_prompt,
                   "settings_json": None if settings is None else _json_object(settings, "settings")}
        changes = {k: v for k, v in changes.items() if v is not None}
        with self._db.write() as conn:
            self._require(conn, conversation_id)
            assignments = ", ".join(f"{k} = ?" for k in changes)
            conn.execute(f"UPDATE conversations SET {assignments}{', ' if changes else ''}updated_at = ? WHERE id = ?",
                         (*changes.values(), time.time(), conversation_id))
            return self._conversation(conn, conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete it with its messages and document links; documents and snapshots stay for other conversations."""
        with self._db.write() as conn:
            if conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise self._unknown(conversation_id)

    # Messages

    def add_message(self, conversation_id: int, role: str, content: str, *, n_tokens: int | None = None,
                    timings: dict | None = None) -> Message:
        """Append a message at the conversation's end; it is on disk when this returns."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        now = time.time()
        with self._db.write() as conn:
            self._require(conn, conversation_id)
            position = conn.execute("SELECT coalesce(max(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                                    (conversation_id,)).fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO messages (conversation_id, position, role, content, n_tokens, timings_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, position, role, content, n_tokens, _json_object(timings, "timings"), now))
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            return Message.from_row(conn.execute(_MESSAGE + " WHERE id = ?", (cursor.lastrowid,)).fetchone())

    def messages(self, conversation_id: int) -> list[Message]:
        """The conversation's messages in order."""
        rows = self._db.rows(_MESSAGE + " WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        return [Message.from_row(r) for r in rows]

    def update_message(self, message_id: int, content: str, *, n_tokens: int | None = None,
                       timings: dict | None = None) -> Message:
        """Replace a message's content (edit and resend); its token count and timings are replaced too."""
        with self._db.write() as conn:
            row = conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise StoreError(f"No message with id {message_id} in the conversation store.")
            conn.execute("UPDATE messages SET content = ?, n_tokens = ?, timings_json = ? WHERE id = ?",
                         (content, n_tokens, _json_object(timings, "timings"), message_id))
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), row["conversation_id"]))
            return Message.from_row(conn.execute(_MESSAGE + " WHERE id = ?", (message_id,)).fetchone())

    def delete_last(self, conversation_id: int, count: int = 1) -> int:
        """Delete the conversation's last `count` messages (regenerate, or resend after an edit); returns how many."""
        if count < 0:
            raise ValueError("count must be zero or more")
        with self._db.write() as conn:
            self._require(conn, conversation_id)
            deleted = conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE conversation_id = ? ORDER BY position DESC LIMIT ?)",
                (conversation_id, count)).rowcount
            if deleted:
                conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))
            return deleted

    # Search

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Conversations whose messages or title contain every word of `query`, most recently updated first.

        Words are matched as words, after stemming ('answers' finds 'answer'); `word*` matches a prefix.
        Any text is a valid query: operators and quotes are searched for as plain words.
        """
        match = fts_query(query)
        if match is None:
            return []
        with self._db.reading() as conn:
            best: dict[int, tuple[str, int | None]] = {}
            for row in conn.execute(
                    "SELECT m.conversation_id, m.id, snippet(messages_fts, 0, '**', '**', '…', 12) AS snippet "
                    "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                    "WHERE messages_fts MATCH ? ORDER BY bm25(messages_fts)", (match,)):
                best.setdefault(row["conversation_id"], (row["snippet"], row["id"]))
            for row in conn.execute("SELECT rowid, snippet(conversations_fts, 0, '**', '**', '…', 12) AS snippet "
                                    "FROM conversations_fts WHERE conversations_fts MATCH ?", (match,)):
                best.setdefault(row["rowid"], (row["snippet"], None))
            ids = list(best)
            rows = [row for i in range(0, len(ids), 500) for row in conn.execute(
                _CONVERSATION + f" WHERE c.id IN ({', '.join('?' * len(ids[i : i + 500]))})", ids[i : i + 500])]
        found = sorted(map(StoredConversation.from_row, rows), key=lambda c: (c.updated_at, c.id), reverse=True)
        return [SearchHit(c, *best[c.id]) for c in found[:limit]]

    # Helpers

    def _conversation(self, conn: sqlite3.Connection, conversation_id: int) -> StoredConversation:
        row = conn.execute(_CONVERSATION + " WHERE c.id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise self._unknown(conversation_id)
        return StoredConversation.from_row(row)

    def _require(self, conn: sqlite3.Connection, conversation_id: int) -> None:
        if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
            raise self._unknown(conversation_id)

    @staticmethod
    def _unknown(conversation_id: int) -> StoreError:
        return StoreError(f"No conversation with id {conversation_id}: `edgectx history` lists them.")
