"""The snapshot manifest: which compressed context snapshots lie on disk, for which model and token prefix.

A snapshot holds a ContextMemory for one exact token prefix; the prefix is named by the last link of the
token hash chain (hex) and the model by its weights fingerprint, so a conversation that starts with the
same document under the same model finds it whatever conversation wrote it. Files are named relative
to the store's folder (the data dir). `last_used_at` orders the LRU eviction of `cache gc --max-bytes`,
which is planned (`plan_gc`) before anything is removed. The manifest owns the files it lists: removing
an entry deletes its file, once `inside` has proved, at that moment, that the file lies in the data dir
(a row's name is checked when it is added, but the disk can change after): nothing outside is touched.

    snap = store.snapshots.add("snapshots/ab12.ectx", model_fingerprint=fp, codec="int8", n_tokens=131072,
                               chain_hash=links[-1], size_bytes=path.stat().st_size, document_id=doc.id)
    hit = store.snapshots.find_longest(fp, links)  # the longest stored prefix of this token chain
    store.snapshots.touch(hit.id)
"""

from __future__ import annotations

import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgectx.errors import StoreError
from edgectx.store.db import Database
from edgectx.store.values import integer, optional_int, seconds, text

_COLUMNS = ("id, file, model_fingerprint, codec, n_tokens, chain_hash, size_bytes, document_id, conversation_id, "
            "created_at, last_used_at")
_MAX_PARAMS = 500  # below SQLite's oldest limit on bound parameters (999)


@dataclass(frozen=True)
class SnapshotEntry:
    id: int
    file: str  # relative to the data dir, '/'-separated
    model_fingerprint: str
    codec: str
    n_tokens: int
    chain_hash: str
    size_bytes: int
    document_id: int | None
    conversation_id: int | None
    created_at: float
    last_used_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SnapshotEntry:
        """Every value checked (edgectx.store.values): a damaged one reads as absent."""
        return cls(id=integer(row["id"]), file=text(row["file"]), model_fingerprint=text(row["model_fingerprint"]),
                   codec=text(row["codec"]), n_tokens=max(integer(row["n_tokens"]), 0), chain_hash=text(row["chain_hash"]),
                   size_bytes=max(integer(row["size_bytes"]), 0), document_id=optional_int(row["document_id"]),
                   conversation_id=optional_int(row["conversation_id"]), created_at=seconds(row["created_at"]),
                   last_used_at=seconds(row["last_used_at"]))


def _relative_file(file: str | Path) -> str:
    """The manifest deletes what it lists, so a name must stay inside the data dir."""
    path = PurePosixPath(Path(file).as_posix())
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"snapshot files are named relative to the data dir, without '..': got {file!r}")
    return str(path)


def inside(root: Path, file: str | Path) -> Path | None:
    """`root / file` as it lies on disk now, if that is inside `root`; None when `..`, an absolute path or a
    symlinked folder leads out. The folders are resolved (their symlinks followed), the last component is not:
    unlinking or replacing a symlink acts on the link itself, never on its target."""
    path = root / file
    if path.name in ("", ".", "..") or "\x00" in str(path):  # NUL: no file has such a name (a damaged row)
        return None
    try:
        top, folder = root.resolve(), path.parent.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return None
    return folder / path.name if folder.is_relative_to(top) else None


def _report(on_problem: Callable[[str], None] | None, sentence: str) -> None:
    if on_problem is not None:
        on_problem(sentence)
    else:
        warnings.warn(sentence, RuntimeWarning, stacklevel=3)


def _hex(chain_hash: str) -> str:
    value = chain_hash.lower()
    if not re.fullmatch(r"[0-9a-f]+", value):
        raise ValueError(f"chain hashes are hex digits: got {chain_hash!r}")
    return value


class SnapshotManifest:
    """The snapshots table (`store.snapshots`); `root` is the folder file names are relative to."""

    def __init__(self, db: Database, root: Path):
        self._db = db
        self.root = root

    def path_of(self, snapshot: SnapshotEntry) -> Path:
        """Where the row says the file is, to show, and to read once `present` vetted it; nothing is written or
        deleted there before `inside` has checked it."""
        return self.root / snapshot.file

    def inside(self, file: str | Path) -> Path | None:
        """The path of `file` if it lies inside the data dir now (see `inside` above) and is not the database
        itself (nor its -wal, -shm or -journal), else None."""
        path = inside(self.root, file)
        database = inside(self._db.path.parent, self._db.path.name)
        if path is None or (database is not None and path.parent == database.parent and path.name.startswith(database.name)):
            return None
        return path

    def present(self, snapshot: SnapshotEntry) -> bool:
        """Its file is there, inside the data dir (a row leading outside never counts)."""
        path = self.inside(snapshot.file)
        return path is not None and path.is_file()

    def add(self, file: str | Path, *, model_fingerprint: str, codec: str, n_tokens: int, chain_hash: str,
            size_bytes: int, document_id: int | None = None, conversation_id: int | None = None) -> SnapshotEntry:
        """Record a snapshot file written under the data dir; writing the same file again replaces its entry."""
        file = _relative_file(file)
        if not codec or n_tokens < 0 or size_bytes < 0:
            raise ValueError("a snapshot needs a codec and non-negative token and byte counts")
        now = time.time()
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO snapshots (file, model_fingerprint, codec, n_tokens, chain_hash, size_bytes, document_id, "
                "conversation_id, created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (file) DO UPDATE SET model_fingerprint = excluded.model_fingerprint, codec = excluded.codec, "
                "n_tokens = excluded.n_tokens, chain_hash = excluded.chain_hash, size_bytes = excluded.size_bytes, "
                "document_id = excluded.document_id, conversation_id = excluded.conversation_id, "
                "created_at = excluded.created_at, last_used_at = excluded.last_used_at",
                (file, model_fingerprint, codec, n_tokens, _hex(chain_hash), size_bytes, document_id, conversation_id, now, now))
            return SnapshotEntry.from_row(conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE file = ?", (file,)).fetchone())

    def get(self, snapshot_id: int) -> SnapshotEntry:
        row = self._db.row(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,))
        if row is None:
            raise StoreError(f"No snapshot with id {snapshot_id}: `edgectx cache ls` lists them.")
        return SnapshotEntry.from_row(row)

    def find(self, model_fingerprint: str, chain_hash: str, codec: str | None = None) -> SnapshotEntry | None:
        """The most recently used snapshot of exactly this prefix for this model (and codec, when given)."""
        sql = f"SELECT {_COLUMNS} FROM snapshots WHERE model_fingerprint = ? AND chain_hash = ?"
        params: tuple = (model_fingerprint, _hex(chain_hash))
        if codec is not None:
            sql, params = sql + " AND codec = ?", params + (codec,)
        row = self._db.row(sql + " ORDER BY last_used_at DESC, id DESC LIMIT 1", params)
        return None if row is None else SnapshotEntry.from_row(row)

    def find_longest(self, model_fingerprint: str, chain_hashes: Sequence[str]) -> SnapshotEntry | None:
        """Of the snapshots whose prefix is one of `chain_hashes` (a token sequence's links), the one holding most tokens."""
        best = None
        hashes = [_hex(h) for h in chain_hashes]
        with self._db.reading() as conn:
            for i in range(0, len(hashes), _MAX_PARAMS):
                part = hashes[i : i + _MAX_PARAMS]
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM snapshots WHERE model_fingerprint = ? AND chain_hash IN "
                    f"({', '.join('?' * len(part))}) ORDER BY n_tokens DESC, last_used_at DESC LIMIT 1",
                    (model_fingerprint, *part)).fetchone()
                if row is not None and (best is None or row["n_tokens"] > best.n_tokens):
                    best = SnapshotEntry.from_row(row)
        return best

    def touch(self, snapshot_id: int, when: float | None = None) -> None:
        """Mark the snapshot used now (or at `when`): it moves to the back of the LRU queue."""
        with self._db.write() as conn:
            cursor = conn.execute("UPDATE snapshots SET last_used_at = ? WHERE id = ?", (time.time() if when is None else when, snapshot_id))
            if cursor.rowcount == 0:
                raise StoreError(f"No snapshot with id {snapshot_id}: `edgectx cache ls` lists them.")

    def list(self) -> list[SnapshotEntry]:
        """Every snapshot, most recently used first."""
        return [SnapshotEntry.from_row(r) for r in self._db.rows(f"SELECT {_COLUMNS} FROM snapshots ORDER BY last_used_at DESC, id DESC")]

    def total_bytes(self) -> int:
        return sum(s.size_bytes for s in self.list())  # in Python: SQL's sum() fails on a damaged, huge value

    def remove(self, snapshot_id: int, on_problem: Callable[[str], None] | None = None) -> SnapshotEntry:
        """Forget the snapshot and delete its file (a file already gone is fine); returns what was removed.
        A file that cannot be deleted, or lies outside the data dir (a damaged or hostile row), is left alone and
        reported in one sentence (`on_problem`, else a RuntimeWarning); the entry is forgotten either way."""
        snapshot = self._remove(snapshot_id, on_problem)
        if snapshot is None:
            raise StoreError(f"No snapshot with id {snapshot_id}: `edgectx cache ls` lists them.")
        return snapshot

    def _remove(self, snapshot_id: int, on_problem: Callable[[str], None] | None) -> SnapshotEntry | None:
        with self._db.write() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
        snapshot = SnapshotEntry.from_row(row)
        # After the commit: a crash in between leaves an unlisted file (harmless), never an entry without its file.
        path = self.inside(snapshot.file)  # checked now, not when the row was added: the disk may have changed since
        if path is None:
            _report(on_problem, f"Snapshot {snapshot.id} names {snapshot.file!r}, which is no snapshot file inside the data "
                                f"dir {self.root}: its entry was forgotten and that file left alone.")
            return snapshot
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            _report(on_problem, f"Snapshot {snapshot.id} was forgotten, but its file {path} could not be deleted: "
                                f"{e.strerror or e}.")
        return snapshot

    def plan_gc(self, max_bytes: int) -> list[SnapshotEntry]:
        """The least recently used snapshots to remove so that the rest fit in `max_bytes`; removes nothing."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be zero or more")
        snapshots = self.list()
        total = sum(s.size_bytes for s in snapshots)
        victims = []
        for snapshot in reversed(snapshots):  # least recently used first
            if total <= max_bytes:
                break
            victims.append(snapshot)
            total -= snapshot.size_bytes
        return victims

    def gc(self, max_bytes: int, on_problem: Callable[[str], None] | None = None) -> list[SnapshotEntry]:
        """Remove the least recently used snapshots until the rest fit in `max_bytes`; returns those removed
        (files left alone are reported as `remove` does)."""
        removed = (self._remove(s.id, on_problem) for s in self.plan_gc(max_bytes))
        return [s for s in removed if s is not None]  # None: another process removed it first
