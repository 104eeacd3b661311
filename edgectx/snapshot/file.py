"""The snapshot file: a long-context memory's KV state and token ids, compressed, checksummed, on disk.

Layout (docs/snapshot-format.md is the exact reference): magic `EDGECTXS`, a u16 format version, a
u32-length-prefixed UTF-8 JSON header (model fingerprint, memory config, token count, token hash
chain, section table, free-form meta), the SHA-256 of everything before it, then the sections'
zstd-compressed bytes. No pickle and no torch.load: every byte is parsed by edgectx's own code (here
and in snapshot_format), and a reader refuses anything it cannot verify with one `SnapshotError`
sentence naming the file.

Writes are atomic: sections are compressed into an anonymous spool file, then the whole snapshot is
written to a temp file beside the target, fsynced and renamed over it; an error, Ctrl-C or a kill
leaves either no file or the previous complete one.

    write_snapshot(path, sections, token_ids=ids, model_fingerprint=fp, memory_config=config.to_dict())
    with open_snapshot(path, expect_fingerprint=fp) as snap:
        k = snap.read("layer.0.host.k")  # verified, decompressed, decoded on demand
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import secrets
import shutil
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import torch
import zstandard

from edgectx.errors import SnapshotError
from edgectx.snapshot.format import (FORMAT, FORMAT_VERSION, HASH_BYTES, MAGIC, MAX_HEADER_BYTES, PREFIX, TOKENS,
                                     SnapshotHeader, check_table, parse_header)
from edgectx.snapshot.sections import Section, SectionInfo, check_name, decode_section, table_entry, tensor_section
from edgectx.snapshot.token_chain import CHUNK_TOKENS, token_chain

__all__ = ["FORMAT_VERSION", "MAGIC", "Snapshot", "SnapshotHeader", "open_snapshot", "read_header", "write_snapshot"]

# -- writing ----------------------------------------------------------------------------------------


def write_snapshot(path: Path | str, sections: Iterable[Section], *, token_ids, model_fingerprint: str,
                   model_name: str = "", memory_config: dict | None = None, meta: dict | None = None,
                   level: int = 3, chunk_tokens: int = CHUNK_TOKENS) -> Path:
    """Write a snapshot atomically; `sections` may be a generator (each is compressed as it comes)."""
    path = Path(path).expanduser()
    if not isinstance(model_fingerprint, str) or not isinstance(model_name, str):
        raise TypeError("model_fingerprint and model_name must be strings")
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model_fingerprint": model_fingerprint, "model_name": model_name, "memory_config": memory_config or {},
              "n_tokens": len(ids), "chain": {"chunk_tokens": chunk_tokens, "links": token_chain(ids, chunk_tokens)},
              "sections": [], "meta": meta or {}}
    json.dumps(header, allow_nan=False)  # refuse what cannot be stored before touching the disk
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent) as spool:  # anonymous: vanishes even if killed
            _spool_sections(spool, [tensor_section(TOKENS, ids)], sections, header["sections"], level)
            body = json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            with open(tmp, "xb") as f:
                f.write(prefix)
                f.write(hashlib.sha256(prefix).digest())
                spool.seek(0)
                shutil.copyfileobj(spool, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SnapshotError(f"Cannot write the snapshot {path}: the disk is full; free some space and try again.") from None
        raise SnapshotError(f"Cannot write the snapshot {path}: {e.strerror or e}.") from None
    finally:  # also on KeyboardInterrupt: never leave a partial file behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def _spool_sections(spool, first: list[Section], sections: Iterable[Section], table: list, level: int) -> None:
    cctx = zstandard.ZstdCompressor(level=level)  # writes the content size, which readers require
    names, offset = set(), 0
    for section in itertools.chain(first, sections):
        check_name(section.name)
        if section.name in names:
            raise ValueError(f"section name {section.name!r} is used twice (or is the reserved {TOKENS!r})")
        names.add(section.name)
        stored = cctx.compress(section.payload)
        spool.write(stored)
        table.append(table_entry(section, offset, stored, hashlib.sha256(stored).hexdigest()))
        offset += len(stored)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some platforms and filesystems cannot open or sync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------------------------------


def read_header(path: Path | str) -> SnapshotHeader:
    """The header alone: checks magic, version and the header checksum; reads no section."""
    path = Path(path).expanduser()
    with _open(path) as f:
        return _guard(path, lambda: _read_header(f, path, os.fstat(f.fileno()).st_size))


def open_snapshot(path: Path | str, expect_fingerprint: str | None = None) -> "Snapshot":
    """Open and verify a snapshot's header and section table; sections are read lazily by name."""
    path = Path(path).expanduser()
    f = _open(path)
    try:
        size = os.fstat(f.fileno()).st_size
        header = _guard(path, lambda: _read_header(f, path, size))
        if expect_fingerprint is not None and header.model_fingerprint != expect_fingerprint:
            raise SnapshotError(f"{path} was made for another model ({header.model_name or 'unnamed'}, fingerprint "
                                f"{header.model_fingerprint[:12]}): open it with that model, or read the document again.")
        _guard(path, lambda: check_table(path, header, size))
        return Snapshot(path, header, f)
    except BaseException:
        f.close()
        raise


class Snapshot:
    """An open, verified snapshot; `read(name)` checks a section's SHA-256 before decompressing it."""

    def __init__(self, path: Path, header: SnapshotHeader, f):
        self.path, self.header, self._f = path, header, f
        self._by_name = {s.name: s for s in header.sections}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.header.sections if s.name != TOKENS]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def info(self, name: str) -> SectionInfo | None:
        """What the (verified) table declares about a section: its kind, dtype and shape, before any byte is read."""
        return self._by_name.get(name)

    def read(self, name: str) -> torch.Tensor | bytes:
        """A section's tensor (fp16 for KV codecs) or bytes."""
        info = self._by_name.get(name)
        if info is None:
            raise SnapshotError(f"{self.path} lacks the section {name!r} that this edgectx needs.")
        return _guard(self.path, lambda: self._read(info))

    def tokens(self) -> torch.Tensor:
        """The token ids (int64), checked against the header's token chain."""
        ids = self.read(TOKENS)
        try:
            chain = tuple(token_chain(ids, self.header.chunk_tokens))
        except ValueError:  # ids outside uint32
            chain = None
        if chain != self.header.token_chain:
            raise SnapshotError(f"{self.path} is corrupt: its token ids do not match its token chain.")
        return ids

    def _read(self, info: SectionInfo) -> torch.Tensor | bytes:
        self._f.seek(self.header.data_offset + info.offset)
        stored = self._f.read(info.stored_length)
        if len(stored) != info.stored_length:
            raise SnapshotError(f"{self.path} is truncated: section {info.name!r} was cut short (the file changed after it was opened).")
        if hashlib.sha256(stored).hexdigest() != info.sha256:
            raise SnapshotError(f"{self.path} is corrupt: section {info.name!r} fails its SHA-256 check.")
        if zstandard.frame_content_size(stored) != info.raw_length:
            raise SnapshotError(f"{self.path} is corrupt: section {info.name!r} does not decompress to its recorded size.")
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=info.raw_length)
        if len(raw) != info.raw_length:
            raise SnapshotError(f"{self.path} is corrupt: section {info.name!r} does not decompress to its recorded size.")
        return decode_section(info, raw)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path):
    """Open for reading without blocking: a FIFO or a device at the path is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SnapshotError(f"Snapshot not found: {path}.") from None
    except IsADirectoryError:
        raise SnapshotError(f"{path} is a folder, not a snapshot file.") from None
    except OSError as e:
        raise SnapshotError(f"Cannot read the snapshot {path}: {e.strerror or e}.") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SnapshotError(f"{path} is a folder, not a snapshot file.")
        if not stat.S_ISREG(mode):
            raise SnapshotError(f"{path} is not a regular file (a pipe or a device), so it is not a snapshot.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _guard(path: Path, step):
    """Run a reading step; anything but SnapshotError escaping it (a bug, or a damaged file that got past
    the checks) still ends in one sentence."""
    try:
        return step()
    except SnapshotError:
        raise
    except OSError as e:
        raise SnapshotError(f"Cannot read the snapshot {path}: {e.strerror or e}.") from None
    except MemoryError:
        raise SnapshotError(f"{path} is corrupt: it claims more data than this machine can hold.") from None
    except Exception as e:
        raise SnapshotError(f"{path} is corrupt: it cannot be decoded ({type(e).__name__}: {_detail(e)}).") from None


def _detail(e: Exception) -> str:
    """An exception's text fit for the middle of a one-line sentence (a hostile header can make it huge)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _read_header(f, path: Path, size: int) -> SnapshotHeader:
    start = f.read(PREFIX.size)
    if not start:
        raise SnapshotError(f"{path} is empty (0 bytes): it is not a snapshot, or its writing never began.")
    if not start.startswith(MAGIC[: len(start)]):
        raise SnapshotError(f"{path} is not an edgectx snapshot (wrong magic bytes).")
    if len(start) < PREFIX.size:
        raise SnapshotError(f"{path} is truncated: it ends after {len(start)} bytes, inside the file prefix.")
    _, version, n_header = PREFIX.unpack(start)
    if version > FORMAT_VERSION:
        raise SnapshotError(f"{path} was written by a newer edgectx (snapshot format version {version}; this edgectx "
                            f"reads up to {FORMAT_VERSION}): upgrade edgectx to use it.")
    if version < 1:
        raise SnapshotError(f"{path} is corrupt: it has format version {version}, which no edgectx writes.")
    if n_header > MAX_HEADER_BYTES:
        raise SnapshotError(f"{path} is corrupt: its header length ({n_header} bytes) is not plausible.")
    data_offset = PREFIX.size + n_header + HASH_BYTES
    if size < data_offset:
        raise SnapshotError(f"{path} is truncated: it has {size} bytes, its header alone needs {data_offset}.")
    body = f.read(n_header)
    digest = f.read(HASH_BYTES)
    if hashlib.sha256(start + body).digest() != digest:
        raise SnapshotError(f"{path} is corrupt: its header fails its SHA-256 check.")
    try:
        return parse_header(json.loads(body.decode("utf-8")), version, data_offset)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise SnapshotError(f"{path} is corrupt: its header is malformed ({_detail(e)}).") from None
