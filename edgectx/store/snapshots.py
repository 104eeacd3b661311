"""The snapshot manifest: which compressed context snapshots lie on disk, for which model and token prefix.

A snapshot holds a ContextMemory for one exact token prefix; the prefix is named by the last link of the
token hash chain (hex) and the model by its weights fingerprint, so a conversation that starts with the
same document under the same model finds it whatever conversation wrote it. Files are named relative
to the store's folder (the data dir). `last_used_at` orders the LRU eviction of `cache gc --max-bytes`,
which is planned (`plan_gc`) before anything is removed. The manifest owns the files it lists: removing
an entry deletes its file.

    snap = store.snapshots.add("snapshots/ab12.ectx", model_fingerprint=fp, codec="int8", n_tokens=131072,
                               chain_hash=links[-1], size_bytes=path.stat().st_size, document_id=doc.id)
    hit = store.snapshots.find_longest(fp, links)  # the longest stored prefix of this token chain
    store.snapshots.touch(hit.id)
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgectx.errors import StoreError
from edgectx.store.db import Database

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
        return cls(**{k: row[k] for k in row.keys()})


def _relative_file(file: str | Path) -> str:
    """The manifest deletes what it lists, so a name must stay inside the data dir."""
    path = PurePosixPath(Path(file).as_posix())
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"snapshot files are named relative to the data dir, without '..': got {file!r}")
    return str(path)


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
        return self.root / snapshot.file

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
        return self._db.row("SELECT coalesce(sum(size_bytes), 0) FROM snapshots")[0]

    def remove(self, snapshot_id: int) -> SnapshotEntry:
        """Forget the snapshot and delete its file (a file already gone is fine); returns what was removed."""
        snapshot = self._remove(snapshot_id)
        if snapshot is None:
            raise StoreError(f"No snapshot with id {snapshot_id}: `edgectx cache ls` lists them.")
        return snapshot

    def _remove(self, snapshot_id: int) -> SnapshotEntry | None:
        with self._db.write() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
        snapshot = SnapshotEntry.from_row(row)
        # After the commit: a crash in between leaves an unlisted file (harmless), never an entry without its file.
        self.path_of(snapshot).unlink(missing_ok=True)
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

    def gc(self, max_bytes: int) -> list[SnapshotEntry]:
        """Remove the least recently used snapshots until the rest fit in `max_bytes`; returns those removed."""
        removed = (self._remove(s.id) for s in self.plan_gc(max_bytes))
        return [s for s in removed if s is not None]  # None: another process removed it first
