"""The SQLite file under the conversation store: opening it safely, its schema migrations, its transactions.

One file, `edgectx.db` in the data dir, in WAL mode so readers never block the writer. Several edgectx
processes may share it: every write is one `BEGIN IMMEDIATE` transaction (it takes the write lock up
front, so a second writer waits up to `BUSY_TIMEOUT_S` instead of failing half-way), and
`synchronous=FULL` makes a committed write survive a crash or a power cut, not only a killed process.

The schema is versioned with `PRAGMA user_version`: `MIGRATIONS[i]` takes a database from version `i` to
`i + 1`, and all pending ones run in one transaction at open, so a failed upgrade leaves the file as it
was. A file from a newer edgectx, a file that is not SQLite, or another program's SQLite database is
refused with a `StoreError` sentence. `PRAGMA application_id` marks the file as edgectx's.

    db = Database(data_dir() / "edgectx.db")
    with db.write() as conn:
        conn.execute("UPDATE conversations SET title = ? WHERE id = ?", ("Notes", 1))
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgectx.errors import StoreError

APPLICATION_ID = 0x65637478  # b"ectx": marks the file as edgectx's own
BUSY_TIMEOUT_S = 15.0  # how long a write waits for another process's write to finish

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


def _sentence(e: sqlite3.Error, path: Path) -> str:
    text = str(e)
    if "locked" in text or "busy" in text:
        return f"The conversation database {path} stayed busy with another edgectx for {BUSY_TIMEOUT_S:.0f} s: close it and try again."
    if "is full" in text:
        return f"The disk holding {path} is full: free some space and try again."
    if "readonly" in text or "read-only" in text:
        return f"The conversation database {path} is read-only: make it and its folder writable."
    if "not a database" in text:
        return f"{path} is not an edgectx database (not SQLite at all): move it away or point EDGECTX_HOME elsewhere."
    if "malformed" in text or "corrupt" in text:
        return f"The conversation database {path} is damaged ({text}): move it away to start a new one."
    if "unable to open" in text:
        return f"Cannot open the conversation database {path}: check that its folder exists and is writable."
    if "fts5" in text:
        return "This Python's SQLite lacks FTS5 full-text search, which edgectx needs: use a python.org or distribution build."
    return f"The conversation database {path} failed: {text}."


@contextmanager
def _sentences(path: Path) -> Iterator[None]:
    """Turn SQLite's environment failures into one sentence; constraint and programming errors stay bugs."""
    try:
        yield
    except sqlite3.OperationalError as e:
        raise StoreError(_sentence(e, path)) from None
    except sqlite3.DatabaseError as e:
        if type(e) is not sqlite3.DatabaseError:  # IntegrityError, ProgrammingError ...: a bug, keep the traceback
            raise
        raise StoreError(_sentence(e, path)) from None


def _refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """Every edgectx database carries APPLICATION_ID; only an empty one may lack it (it is about to get it)."""
    conn.execute("BEGIN")  # one consistent view: another edgectx may be creating the schema right now
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    if app_id == APPLICATION_ID or (app_id == 0 and version == 0 and n_objects == 0):
        return
    raise StoreError(f"{path} is another program's SQLite database, not edgectx's: move it away or point EDGECTX_HOME elsewhere.")


def _refuse_newer(version: int, known: int, path: Path) -> None:
    if version > known:
        raise StoreError(
            f"The conversation database {path} was written by a newer edgectx (schema version {version}; this one "
            f"reads up to {known}): upgrade edgectx, or point EDGECTX_HOME at another folder."
        )


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> None:
    known = len(migrations)
    if conn.execute("PRAGMA user_version").fetchone()[0] == known:
        return
    conn.execute("BEGIN IMMEDIATE")  # another process may be migrating too: read the version again under the lock
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _refuse_newer(version, known, path)
        for migration in migrations[version:]:
            migration(conn)
        conn.execute(f"PRAGMA user_version = {known}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Database:
    """One connection to the store's file, shared by threads (the TUI's workers) behind a lock."""

    def __init__(self, path: Path, migrations: Sequence[Migration] | None = None):
        self.path = Path(path)
        migrations = MIGRATIONS if migrations is None else migrations
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder: the conversation database must be a file path.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"Cannot create the data folder {self.path.parent}: {e.strerror}.") from None
        self._lock = threading.RLock()
        with _sentences(self.path):
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                self.conn.row_factory = sqlite3.Row
                self.conn.execute("PRAGMA foreign_keys = ON")
                # Before anything is changed: a file that is not SQLite fails here, and foreign or newer ones are left alone.
                _refuse_foreign(self.conn, self.path)
                _refuse_newer(self.conn.execute("PRAGMA user_version").fetchone()[0], len(migrations), self.path)
                self._set_up(migrations)
            except BaseException:
                self.conn.close()
                raise

    def _set_up(self, migrations: Sequence[Migration]) -> None:
        """WAL mode and the schema. Connections racing to set up a new file can get SQLITE_BUSY at once, without
        the busy timeout (SQLite does not wait where waiting could deadlock), so the setup is retried until then."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
                _migrate(self.conn, self.path, migrations)
                return
            except sqlite3.OperationalError as e:
                if self.conn.in_transaction:
                    self.conn.rollback()
                text = str(e).lower()
                if not ("locked" in text or "busy" in text) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._lock, _sentences(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # a failed COMMIT may already have ended it
                    self.conn.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """Several reads that see one consistent state, even while another process writes."""
        with self._lock, _sentences(self.path):
            if self.conn.in_transaction:
                yield self.conn
                return
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                if self.conn.in_transaction:
                    self.conn.execute("COMMIT")  # ends the read; nothing was written

    def rows(self, sql: str, params: Sequence | dict = ()) -> list[sqlite3.Row]:
        with self._lock, _sentences(self.path):
            return self.conn.execute(sql, params).fetchall()

    def row(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Row | None:
        with self._lock, _sentences(self.path):
            return self.conn.execute(sql, params).fetchone()

    def close(self) -> None:
        with self._lock:
            self.conn.close()
