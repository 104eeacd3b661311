"""The conversation store's tables, as numbered migrations: `MIGRATIONS[i]` takes a database from schema
version `i` to `i + 1` (`PRAGMA user_version`); edgectx.store.db applies the pending ones in one transaction.

Append a migration for every change; never edit a released one. `APPLICATION_ID` marks a file as edgectx's.

    MIGRATIONS = (_v1, _v2)  # _v2(conn) runs ALTER TABLE ... on a version-1 file
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

APPLICATION_ID = 0x65637478  # b"ectx": marks the file as edgectx's own

_FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"  # 'answers' finds 'answer', 'cafe' finds 'café'

_SCHEMA_V1 = (
    """CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so an exported id names one conversation
        title TEXT NOT NULL,
        created_at REAL NOT NULL,  -- Unix seconds, UTC
        updated_at REAL NOT NULL,
        model_name TEXT,
        model_fingerprint TEXT,  -- edgectx.model.fingerprint of the weights last used
        system_prompt TEXT,
        settings_json TEXT NOT NULL DEFAULT '{}'  -- sampling and memory settings, a JSON object
    )""",
    "CREATE INDEX conversations_updated ON conversations (updated_at DESC, id DESC)",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,  -- 0, 1, 2 ... within the conversation
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        n_tokens INTEGER,
        timings_json TEXT NOT NULL DEFAULT '{}',  -- e.g. {"prefill_s": .., "decode_s": .., "tokens_per_s": ..}
        created_at REAL NOT NULL,
        UNIQUE (conversation_id, position)
    )""",
    """CREATE TABLE documents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL,  -- where the content was first added from
        sha256 TEXT NOT NULL,  -- of the file's bytes
        tokenizer TEXT NOT NULL DEFAULT '',  -- whose tokens n_tokens and the offsets count ('' = not tokenized)
        size_bytes INTEGER NOT NULL,
        n_chars INTEGER NOT NULL,  -- code points of the decoded text
        n_tokens INTEGER,
        token_char_offsets BLOB,  -- little-endian uint32 per token: the char where it starts
        created_at REAL NOT NULL,
        UNIQUE (sha256, tokenizer)
    )""",
    "CREATE INDEX documents_path ON documents (path)",
    """CREATE TABLE conversation_documents (
        conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        document_id INTEGER NOT NULL REFERENCES documents (id) ON DELETE RESTRICT,
        position INTEGER NOT NULL,  -- attachment order
        attached_at REAL NOT NULL,
        PRIMARY KEY (conversation_id, document_id),
        UNIQUE (conversation_id, position)
    )""",
    "CREATE INDEX conversation_documents_document ON conversation_documents (document_id)",
    # Snapshots are keyed by content (model + token chain), so they outlive the conversation that made them:
    # deleting it only unlinks them, and `cache gc` reclaims them by last use.
    """CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        file TEXT NOT NULL UNIQUE,  -- relative to the data dir
        model_fingerprint TEXT NOT NULL,
        codec TEXT NOT NULL,  -- fp16, int8, int4 ...
        n_tokens INTEGER NOT NULL,
        chain_hash TEXT NOT NULL,  -- hex of the token hash chain's last link: the prefix it holds
        size_bytes INTEGER NOT NULL,
        document_id INTEGER REFERENCES documents (id) ON DELETE SET NULL,
        conversation_id INTEGER REFERENCES conversations (id) ON DELETE SET NULL,
        created_at REAL NOT NULL,
        last_used_at REAL NOT NULL
    )""",
    "CREATE INDEX snapshots_key ON snapshots (model_fingerprint, chain_hash)",
    "CREATE INDEX snapshots_lru ON snapshots (last_used_at)",
    "CREATE INDEX snapshots_document ON snapshots (document_id)",
    "CREATE INDEX snapshots_conversation ON snapshots (conversation_id)",
)


def _fts_statements(table: str, column: str) -> tuple[str, ...]:
    """An external-content FTS5 index over `table.column`, kept in step by triggers (deletes need the old text)."""
    fts = f"{table}_fts"
    delete = f"INSERT INTO {fts} ({fts}, rowid, {column}) VALUES ('delete', old.id, old.{column});"
    insert = f"INSERT INTO {fts} (rowid, {column}) VALUES (new.id, new.{column});"
    return (
        f"CREATE VIRTUAL TABLE {fts} USING fts5 ({column}, content='{table}', content_rowid='id', tokenize='{_FTS_TOKENIZER}')",
        f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN {insert} END",
        f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN {delete} END",
        f"CREATE TRIGGER {fts}_update AFTER UPDATE OF {column} ON {table} BEGIN {delete} {insert} END",
    )


def _v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1 + _fts_statements("messages", "content") + _fts_statements("conversations", "title"):
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (_v1,)  # append only; never edit a released one
