"""The SQLite file under the conversation store: opening it safely, its schema migrations, its transactions.

One file, `edgectx.db` in the data dir, in WAL mode so readers never block the writer. Several edgectx
processes may share it: every write is one `BEGIN IMMEDIATE` transaction (it takes the write lock up
front, so a second writer waits up to `BUSY_TIMEOUT_S` instead of failing half-way), and
`synchronous=FULL` makes a committed write survive a crash or a power cut, not only a killed process.

The schema is versioned with `PRAGMA user_version`: `MIGRATIONS[i]` (edgectx.store.schema) takes a database
from version `i` to `i + 1`, and all pending ones run in one transaction at open, so a failed upgrade leaves
the file as it was. A file from a newer edgectx, a file that is not SQLite, or another program's SQLite
database is refused with a `StoreError` sentence. `PRAGMA application_id` marks the file as edgectx's.
A file that cannot be written (a read-only data dir) is opened for reading only, and a failure reports the
first error SQLite gave (a full disk), not the one a clean-up after it ran into.

    db = Database(data_dir() / "edgectx.db")
    with db.write() as conn:
        conn.execute("UPDATE conversations SET title = ? WHERE id = ?", ("Notes", 1))
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgectx.errors import StoreError
from edgectx.store.schema import APPLICATION_ID, MIGRATIONS, Migration

BUSY_TIMEOUT_S = 15.0  # how long a write waits for another process's write to finish
FULL_BELOW_BYTES = 1 << 20  # an I/O error with less free space than this is the disk being full


def _no_space_left(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _sentence(e: sqlite3.Error, path: Path) -> str:
    text = str(e)
    kind = getattr(e, "sqlite_errorname", "") or ""
    if "locked" in text or "busy" in text:
        return f"The conversation database {path} stayed busy with another edgectx for {BUSY_TIMEOUT_S:.0f} s: close it and try again."
    # SQLite says SQLITE_FULL only when a write runs out of room; growing the -shm file on a full disk is an I/O error.
    if "is full" in text or (kind.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) and _no_space_left(path.parent)):
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


def _end(conn: sqlite3.Connection) -> None:
    """Roll back what a failure left open. SQLite may already have rolled back (after SQLITE_FULL, IOERR ...),
    and a failing ROLLBACK must not replace the error that matters: the first one."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """Every edgectx database carries APPLICATION_ID; only an empty one may lack it (it is about to get it)."""
    conn.execute("BEGIN")  # one consistent view: another edgectx may be creating the schema right now
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except BaseException:
        _end(conn)
        raise
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
        _end(conn)
        raise


def _denied(e: sqlite3.OperationalError) -> bool:
    """The file or its folder cannot be written (a read-only data dir): reading alone may still work."""
    kind = getattr(e, "sqlite_errorname", "") or ""
    return kind.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in str(e)


def _connect(target: str | Path, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    """One connection to the store's file, shared by threads (the TUI's workers) behind a lock.

    A file that cannot be written (a read-only data dir) is opened for reading (`read_only`): listing and
    exporting work, and every write is refused with the read-only sentence."""

    def __init__(self, path: Path, migrations: Sequence[Migration] | None = None):
        self.path = Path(path)
        self.read_only = False
        migrations = MIGRATIONS if migrations is None else migrations
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder: the conversation database must be a file path.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"Cannot create the data folder {self.path.parent}: {e.strerror}.") from None
        self._lock = threading.RLock()
        with _sentences(self.path):
            try:
                self.conn = self._open(migrations)
                # SQLite opens a file it may not write for reading without a word; say so before a write is tried.
                self.read_only = not os.access(self.path, os.W_OK)
            except sqlite3.OperationalError as e:
                if not (_denied(e) and self.path.is_file()):
                    raise
                self.conn = self._open_read_only(len(migrations), e)
                self.read_only = True

    def _open(self, migrations: Sequence[Migration]) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            # Before anything is changed: a file that is not SQLite fails here, and foreign or newer ones are left alone.
            _refuse_foreign(conn, self.path)
            _refuse_newer(conn.execute("PRAGMA user_version").fetchone()[0], len(migrations), self.path)
            self._set_up(conn, migrations)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self, known: int, denied: sqlite3.OperationalError) -> sqlite3.Connection:
        """`mode=ro` reads a WAL database whose -wal and -shm files exist or can be made. In a folder where they
        can be neither, `immutable=1` reads the file alone, which then holds everything: the last connection to
        close merges the WAL into the file and deletes it (a -wal left with content would be ignored: refused)."""
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal")
        modes = ["mode=ro"] + ([] if wal.exists() and wal.stat().st_size else ["immutable=1"])
        for mode in modes:
            conn = _connect(f"{uri}?{mode}", uri=True)
            try:
                _refuse_foreign(conn, self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError:
                conn.close()
                continue
            except BaseException:
                conn.close()
                raise
            if version != known:
                conn.close()
                _refuse_newer(version, known, self.path)
                raise StoreError(f"The conversation database {self.path} is read-only and from an older edgectx: make it "
                                 "and its folder writable once, so that it can be upgraded.")
            return conn
        raise denied

    def _set_up(self, conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
        """WAL mode and the schema. Connections racing to set up a new file can get SQLITE_BUSY at once, without
        the busy timeout (SQLite does not wait where waiting could deadlock), so the setup is retried until then."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                _migrate(conn, self.path, migrations)
                return
            except sqlite3.OperationalError as e:
                _end(conn)
                text = str(e).lower()
                if not ("locked" in text or "busy" in text) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        if self.read_only:
            raise StoreError(f"The conversation database {self.path} is read-only: make it and its folder writable.")
        with self._lock, _sentences(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                _end(self.conn)  # the error raised is the first one, never a failed ROLLBACK's
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
            except BaseException:
                _end(self.conn)
                raise
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
