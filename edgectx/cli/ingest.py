"""`edgectx ingest` and `edgectx cache`: read long files once into reusable snapshots, and manage those snapshots.

    edgectx ingest report.pdf notes.md             # progress bar; prints each snapshot's path and size
    edgectx cache ls --json
    edgectx cache rm 3 4
    edgectx cache gc --max-bytes 2G                # least recently used first; also sweeps leftovers

Ingest reads and checks every file before loading the model, so a refused file (binary, too large, an
unreadable PDF) costs nothing. A document already ingested for this model is not read again. Ctrl-C leaves
nothing half-written: a snapshot appears only complete (edgectx.snapshot.file writes a temp file and renames it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import time
from datetime import datetime
from pathlib import Path

from edgectx.chat.documents import DEFAULT_MAX_BYTES
from edgectx.cli.options import MAX_ID, add_memory_args, add_model_args, file_mib, int_range
from edgectx.quant.formats import SNAPSHOT_CODECS

LEFTOVER_AGE_S = 3600  # a temp or unlisted file this old belongs to no writer still running
MAX_BYTES = 2**62  # 4 EiB: past any disk, and within SQLite's integers
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def byte_count(text: str) -> int:
    """'2G', '500M', '1.5GiB', '4096' -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 500M or 2G, got {text!r}")
    value = float(match[1]) * 1024 ** "_kmgt".index(match[2].lower() or "_")  # inf for a few hundred digits
    if not value <= MAX_BYTES:
        raise argparse.ArgumentTypeError(f"the size must be at most 4 EiB, got {text!r}")
    return int(value)


def add_parsers(sub) -> None:
    ingest = sub.add_parser("ingest", help="read long files once and keep their context as reusable snapshots")
    add_model_args(ingest)
    add_memory_args(ingest, allow_full=False)
    ingest.add_argument("files", nargs="+", metavar="FILE", help="text, Markdown, source code or PDF files")
    ingest.add_argument("--codec", choices=SNAPSHOT_CODECS, help="snapshot codec (default int4; fp16 is lossless)")
    ingest.add_argument("--max-file-mib", type=file_mib, default=DEFAULT_MAX_BYTES / 2**20,
                        help=f"largest file to read, in MiB (default {DEFAULT_MAX_BYTES // 2**20})")
    ingest.add_argument("--json", action="store_true", help="print a JSON list of what was ingested")
    cache = sub.add_parser("cache", help="list, remove or garbage-collect context snapshots")
    cache_sub = cache.add_subparsers(dest="cache", required=True)
    ls = cache_sub.add_parser("ls", help="every snapshot, most recently used first")
    ls.add_argument("--json", action="store_true")
    rm = cache_sub.add_parser("rm", help="delete snapshots by id")
    rm.add_argument("ids", nargs="+", type=int_range(1, MAX_ID), metavar="ID")
    gc = cache_sub.add_parser("gc", help="delete the least recently used snapshots beyond --max-bytes, and leftovers")
    gc.add_argument("--max-bytes", type=byte_count, help="keep at most this many bytes of snapshots (e.g. 2G)")
    gc.add_argument("--json", action="store_true")


def run_ingest(args: argparse.Namespace, config) -> int:
    from rich.console import Console

    from edgectx.chat.documents import read_document
    from edgectx.cli.options import load_engine
    from edgectx.errors import StoreError
    from edgectx.store.conversations import ConversationStore

    docs = [read_document(f, max_bytes=int(args.max_file_mib * 2**20)) for f in args.files]
    status = Console(stderr=True)
    codec = args.codec or config.snapshot_codec or "int4"
    results = []
    with ConversationStore() as store:  # before the model: a database that cannot take the snapshots costs nothing
        if store.read_only:
            raise StoreError(f"The conversation database {store.path} is read-only, so nothing can be ingested: "
                             "make it and its folder writable.")
        engine = load_engine(args, config, status)
        for doc in docs:
            results.append(_ingest_one(engine, store, doc, codec, status))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _ingest_one(engine, store, doc, codec: str, status) -> dict:
    from edgectx.chat.opening import build_opening, find_snapshot, open_documents
    from edgectx.cli.console import reading_progress, warn

    opening = build_opening(engine, [doc])
    done = find_snapshot(engine, store, opening.ids)
    if done is not None:
        doc_id = store.documents.add_read(doc, tokenizer=engine.fingerprint, token_offsets=opening.offsets[0]).id
        path = store.snapshots.path_of(done)
        status.print(f"{doc.path.name}: already ingested ({done.n_tokens:,} tokens); snapshot {path} "
                     f"({done.size_bytes / 2**20:,.1f} MiB)", highlight=False, markup=False, soft_wrap=True)
        return _entry(doc, doc_id, done.n_tokens, 0.0, path, done.size_bytes, done.codec, already=True)
    with reading_progress(status, doc.path.name, len(opening.ids)) as update:
        opened = open_documents(engine, store, opening, codec=codec, progress=update, must_save=True,
                                on_problem=lambda sentence: warn(status, sentence))
    path, size = opened.snapshots[-1]
    rate = opened.prefilled_tokens / max(opened.elapsed_s, 1e-9)
    status.print(f"{doc.path.name}: {opened.n_tokens:,} tokens in {opened.elapsed_s:,.1f} s ({rate:,.0f} tok/s); "
                 f"snapshot {path} ({size / 2**20:,.1f} MiB, {codec})", highlight=False, markup=False, soft_wrap=True)
    return _entry(doc, opened.document_ids[0], opened.n_tokens, opened.elapsed_s, path, size, codec, already=False)


def _sweep(store, on_problem) -> list[tuple[str, int]]:
    """Delete the snapshot folder's old files that no row lists (a killed writer's temp file, a file the manifest
    lost). Only regular files inside the data dir go: symlinked folders are not entered, symlinks not followed."""
    from edgectx.chat.opening import SNAPSHOT_DIR

    root = store.snapshots.root
    folder = root.resolve() / SNAPSHOT_DIR
    if folder.is_symlink():  # it may lead anywhere, the data dir itself included: only its own folder is swept
        on_problem(f"{root / SNAPSHOT_DIR} is a symlink: leftover files were not swept.")
        return []
    if not folder.is_dir():
        return []
    listed = {p for s in store.snapshots.list() if (p := store.snapshots.inside(s.file)) is not None}
    swept, now = [], time.time()
    for dirpath, _, names in os.walk(folder):  # os.walk does not enter symlinked folders
        for name in names:
            path = store.snapshots.inside(Path(dirpath) / name)  # checked again at the moment of use
            try:
                info = path.lstat() if path is not None else None
                if info is None or not stat.S_ISREG(info.st_mode) or path in listed or now - info.st_mtime <= LEFTOVER_AGE_S:
                    continue
                path.unlink(missing_ok=True)
            except OSError as e:
                on_problem(f"Cannot delete the leftover file {Path(dirpath) / name}: {e.strerror or e}.")
                continue
            swept.append((str(root / path.relative_to(root.resolve())), info.st_size))  # named as `cache ls` names files
    return swept


def _entry(doc, doc_id: int, n_tokens: int, elapsed_s: float, path: Path, size: int, codec: str, already: bool) -> dict:
    return {"path": str(doc.path), "document_id": doc_id, "kind": doc.kind, "n_tokens": n_tokens, "elapsed_s": elapsed_s,
            "snapshot": str(path), "snapshot_bytes": size, "codec": codec, "already_ingested": already}


def run_cache(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgectx.cli.console import warn
    from edgectx.store.conversations import ConversationStore

    status = Console(stderr=True)
    with ConversationStore() as store:
        if args.cache == "ls":
            return _ls(store, args.json)
        if args.cache == "rm":
            for snapshot_id in args.ids:
                problems: list[str] = []  # a file left alone (outside the data dir, undeletable): said instead
                removed = store.snapshots.remove(snapshot_id, on_problem=problems.append)
                for sentence in problems:
                    warn(status, sentence)
                if not problems:
                    print(f"Removed snapshot {removed.id} ({removed.size_bytes / 2**20:,.1f} MiB).")
            return 0
        return _gc(store, args.max_bytes, args.json, lambda sentence: warn(status, sentence))


def _document_path(store, document_id: int | None) -> str | None:
    """The path a snapshot's document was read from; None when the row names none, or one that is gone."""
    from edgectx.errors import StoreError

    try:
        return store.documents.get(document_id).path if document_id is not None else None
    except StoreError:
        return None


def _ls(store, as_json: bool) -> int:
    rows = []
    for s in store.snapshots.list():
        rows.append({"id": s.id, "n_tokens": s.n_tokens, "codec": s.codec, "size_bytes": s.size_bytes,
                     "last_used": datetime.fromtimestamp(s.last_used_at).isoformat(timespec="seconds"),
                     "document": _document_path(store, s.document_id), "conversation_id": s.conversation_id,
                     "file": str(store.snapshots.path_of(s)), "present": store.snapshots.present(s)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No snapshots yet: `edgectx ingest FILE` makes one.")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("id", "tokens", "codec", "size", "last used", "document")
    for r in rows:
        table.add_row(str(r["id"]), f"{r['n_tokens']:,}", r["codec"], f"{r['size_bytes'] / 2**20:,.1f} MiB",
                      r["last_used"].replace("T", " "), Text(r["document"] or "-"))
    Console().print(table)
    print(f"{sum(r['size_bytes'] for r in rows) / 2**20:,.1f} MiB in {len(rows)} snapshots under {store.snapshots.root / 'snapshots'}")
    return 0


def _gc(store, max_bytes: int | None, as_json: bool, on_problem) -> int:
    removed = store.snapshots.gc(max_bytes, on_problem) if max_bytes is not None else []
    for s in store.snapshots.list():
        if not store.snapshots.present(s):  # deleted by hand, or a row leading out of the data dir: forget it
            removed.append(store.snapshots.remove(s.id, on_problem))
    swept = _sweep(store, on_problem)
    freed = sum(s.size_bytes for s in removed) + sum(size for _, size in swept)
    if as_json:
        print(json.dumps({"removed": [s.id for s in removed], "swept_files": [p for p, _ in swept], "freed_bytes": freed,
                          "remaining_bytes": store.snapshots.total_bytes()}, indent=2))
        return 0
    print(f"Removed {len(removed)} snapshots and {len(swept)} leftover files, freeing {freed / 2**20:,.1f} MiB; "
          f"{store.snapshots.total_bytes() / 2**20:,.1f} MiB remain.")
    return 0
