"""Documents in the conversation store: long files a conversation reads, deduplicated by content.

A document row is one file's content (its SHA-256) as one tokenizer cuts it: the same bytes read by two
models are two rows, because token counts and offsets differ. `token_char_offsets` holds, per token, the
character (code point of the decoded text) where the token starts, as little-endian uint32: 4 bytes a
token, so a 128K-token document costs 512 KiB, and a token range the memory retrieved maps back to a span
of the file for citations.

    doc = store.documents.add("notes.md", data, text, tokenizer=fingerprint, token_offsets=starts)
    store.documents.attach(conversation.id, doc.id)
    store.documents.token_offsets(doc.id).char_span(1200, 1328)  # (5810, 6342)
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgectx.errors import StoreError
from edgectx.store.db import Database
from edgectx.store.values import integer, optional_int, seconds, text

_COLUMNS = "id, path, sha256, tokenizer, size_bytes, n_chars, n_tokens, created_at"


@dataclass(frozen=True)
class StoredDocument:
    id: int
    path: str
    sha256: str
    tokenizer: str  # '' when never tokenized
    size_bytes: int
    n_chars: int
    n_tokens: int | None
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredDocument:
        """Every value checked (edgectx.store.values): a damaged one reads as absent."""
        return cls(id=integer(row["id"]), path=text(row["path"]), sha256=text(row["sha256"]), tokenizer=text(row["tokenizer"]),
                   size_bytes=integer(row["size_bytes"]), n_chars=integer(row["n_chars"]),
                   n_tokens=optional_int(row["n_tokens"]), created_at=seconds(row["created_at"]))


@dataclass(frozen=True)
class TokenOffsets:
    """Where each token of a document starts in its text; maps token ranges to character spans."""

    starts: np.ndarray  # (n_tokens,) uint32, non-decreasing
    n_chars: int

    def char_span(self, first_token: int, end_token: int) -> tuple[int, int]:
        """The characters of tokens [first_token, end_token): (start, end) for `text[start:end]`."""
        n = len(self.starts)
        if not 0 <= first_token <= end_token <= n:
            raise IndexError(f"token range [{first_token}, {end_token}) is outside 0..{n}")
        start = int(self.starts[first_token]) if first_token < n else self.n_chars
        end = int(self.starts[end_token]) if end_token < n else self.n_chars
        return start, end


def encode_offsets(starts: Sequence[int], n_chars: int) -> bytes:
    if n_chars >= 2**32:
        raise ValueError("token offsets are uint32: the text must be shorter than 2**32 characters")
    array = np.asarray(starts, dtype=np.int64)
    if array.ndim != 1 or (array.size and (array[0] < 0 or array[-1] > n_chars or np.any(np.diff(array) < 0))):
        raise ValueError("token offsets must be non-decreasing character positions within the text")
    return array.astype("<u4").tobytes()


def decode_offsets(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<u4").astype(np.uint32)


def _offsets_read_back(blob: object, n_chars: object) -> TokenOffsets | None:
    """The offsets as stored, or None (no citations) when the value is not what `encode_offsets` writes."""
    if not isinstance(blob, bytes) or len(blob) % 4 or not isinstance(n_chars, int) or n_chars < 0:
        return None
    starts = decode_offsets(blob)
    if starts.size and (starts[-1] > n_chars or np.any(np.diff(starts.astype(np.int64)) < 0)):
        return None
    return TokenOffsets(starts, n_chars)


class Documents:
    """The documents table and the conversation -> documents links (`store.documents`)."""

    def __init__(self, db: Database):
        self._db = db

    def add(self, path: str | Path, data: bytes, text: str, *, tokenizer: str = "",
            token_offsets: Sequence[int] | None = None) -> StoredDocument:
        """Record a file's content (bytes as read, text as decoded); the same content and tokenizer give the same row,
        which keeps the path it was first added from.

        A row first added without offsets gets them when the same content is added again with them.
        """
        return self._add(path, hashlib.sha256(data).hexdigest(), len(data), text, tokenizer, token_offsets)

    def add_read(self, document, *, tokenizer: str = "", token_offsets: Sequence[int] | None = None) -> StoredDocument:
        """`add` for an edgectx.chat.documents.Document, whose digest and size were taken when the file was read."""
        return self._add(document.path, document.sha256, document.size_bytes, document.text, tokenizer, token_offsets)

    def _add(self, path: str | Path, sha256: str, size_bytes: int, text: str, tokenizer: str,
             token_offsets: Sequence[int] | None) -> StoredDocument:
        if token_offsets is not None and not tokenizer:
            raise ValueError("token offsets need the tokenizer that made them")
        blob = None if token_offsets is None else encode_offsets(token_offsets, len(text))
        n_tokens = None if token_offsets is None else len(token_offsets)
        with self._db.write() as conn:
            existing = conn.execute("SELECT id, token_char_offsets FROM documents WHERE sha256 = ? AND tokenizer = ?",
                                    (sha256, tokenizer)).fetchone()
            if existing is None:
                cursor = conn.execute(
                    "INSERT INTO documents (path, sha256, tokenizer, size_bytes, n_chars, n_tokens, token_char_offsets, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (str(path), sha256, tokenizer, size_bytes, len(text), n_tokens, blob, time.time()))
                doc_id = cursor.lastrowid
            else:
                doc_id = existing["id"]
                if existing["token_char_offsets"] is None and blob is not None:
                    conn.execute("UPDATE documents SET n_tokens = ?, token_char_offsets = ? WHERE id = ?", (n_tokens, blob, doc_id))
            return StoredDocument.from_row(conn.execute(f"SELECT {_COLUMNS} FROM documents WHERE id = ?", (doc_id,)).fetchone())

    def get(self, document_id: int) -> StoredDocument:
        row = self._db.row(f"SELECT {_COLUMNS} FROM documents WHERE id = ?", (document_id,))
        if row is None:
            raise StoreError(f"No document with id {document_id} in the conversation store.")
        return StoredDocument.from_row(row)

    def find(self, sha256: str, tokenizer: str = "") -> StoredDocument | None:
        row = self._db.row(f"SELECT {_COLUMNS} FROM documents WHERE sha256 = ? AND tokenizer = ?", (sha256, tokenizer))
        return None if row is None else StoredDocument.from_row(row)

    def for_path(self, path: str | Path, tokenizer: str | None = None) -> StoredDocument | None:
        """The newest document added from `path` (for `tokenizer`, when given); hash the file to see if it changed."""
        sql = f"SELECT {_COLUMNS} FROM documents WHERE path = ?" + (" AND tokenizer = ?" if tokenizer is not None else "")
        params = (str(path),) + ((tokenizer,) if tokenizer is not None else ())
        row = self._db.row(sql + " ORDER BY id DESC LIMIT 1", params)
        return None if row is None else StoredDocument.from_row(row)

    def token_offsets(self, document_id: int) -> TokenOffsets | None:
        row = self._db.row("SELECT n_chars, token_char_offsets FROM documents WHERE id = ?", (document_id,))
        if row is None:
            raise StoreError(f"No document with id {document_id} in the conversation store.")
        return _offsets_read_back(row["token_char_offsets"], row["n_chars"])

    def attach(self, conversation_id: int, document_id: int) -> int:
        """Add the document to the conversation's list, after those already there; returns its position."""
        with self._db.write() as conn:
            if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise StoreError(f"No conversation with id {conversation_id}: `edgectx history` lists them.")
            if conn.execute("SELECT 1 FROM documents WHERE id = ?", (document_id,)).fetchone() is None:
                raise StoreError(f"No document with id {document_id} in the conversation store.")
            row = conn.execute("SELECT position FROM conversation_documents WHERE conversation_id = ? AND document_id = ?",
                               (conversation_id, document_id)).fetchone()
            if row is not None:
                return row["position"]
            now = time.time()
            position = conn.execute("SELECT coalesce(max(position) + 1, 0) FROM conversation_documents WHERE conversation_id = ?",
                                    (conversation_id,)).fetchone()[0]
            conn.execute("INSERT INTO conversation_documents (conversation_id, document_id, position, attached_at) VALUES (?, ?, ?, ?)",
                         (conversation_id, document_id, position, now))
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            return position

    def detach(self, conversation_id: int, document_id: int) -> bool:
        """Take the document off the conversation's list (the document itself stays); False if it was not there."""
        with self._db.write() as conn:
            cursor = conn.execute("DELETE FROM conversation_documents WHERE conversation_id = ? AND document_id = ?",
                                  (conversation_id, document_id))
            if cursor.rowcount:
                conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))
            return cursor.rowcount > 0

    def attached(self, conversation_id: int) -> list[StoredDocument]:
        """The conversation's documents in the order they were attached."""
        columns = ", ".join(f"d.{c.strip()}" for c in _COLUMNS.split(","))
        rows = self._db.rows(f"SELECT {columns} FROM conversation_documents l JOIN documents d ON d.id = l.document_id "
                             "WHERE l.conversation_id = ? ORDER BY l.position", (conversation_id,))
        return [StoredDocument.from_row(r) for r in rows]
