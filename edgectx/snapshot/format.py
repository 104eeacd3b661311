"""The snapshot format's constants and header, and the checks a reader applies to an untrusted header.

docs/snapshot-format.md is the reference. `parse_header` turns the header JSON into a SnapshotHeader
or raises ValueError naming the bad field; `check_table` verifies that the sections tile the data
area exactly and that their sizes are believable, before any section byte is read.

    header = parse_header(json.loads(body), version, data_offset)
    check_table(path, header, file_size)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from edgectx.errors import SnapshotError
from edgectx.snapshot.sections import SectionInfo, parse_entry
from edgectx.snapshot.token_chain import common_prefix_chunks

MAGIC = b"EDGECTXS"
FORMAT = "edgectx-snapshot"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sHI")  # magic, format version, header length
HASH_BYTES = 32
MAX_HEADER_BYTES = 64 << 20  # a 1M-token chain is ~270 KB; anything near this is damage
MAX_ZSTD_RATIO = 32768  # zstd's densest block (RLE) turns 4 bytes into 128 KiB: no honest section expands more
TOKENS = "tokens"  # the reserved section holding the token ids (int64), written by write_snapshot itself


@dataclass(frozen=True)
class SnapshotHeader:
    format_version: int
    created: str  # ISO 8601, UTC
    model_fingerprint: str  # edgectx.model.fingerprint.weights_fingerprint of the model that made it
    model_name: str
    memory_config: dict  # MemoryConfig.to_dict() of the memory it holds
    n_tokens: int
    chunk_tokens: int  # the token chain's chunk size
    token_chain: tuple[str, ...]  # one hex SHA-256 link per chunk (edgectx.snapshot.token_chain)
    sections: tuple[SectionInfo, ...]
    meta: dict
    data_offset: int  # file offset of the data area (not stored: derived from the header length)

    def reusable_tokens(self, token_ids) -> int:
        """How many leading tokens of `token_ids` this snapshot holds, in whole chain chunks."""
        n = common_prefix_chunks(self.token_chain, token_ids, self.chunk_tokens) * self.chunk_tokens
        return min(n, self.n_tokens)


def parse_header(h, version: int, data_offset: int) -> SnapshotHeader:
    """The header JSON `h` as a SnapshotHeader; ValueError naming what is wrong. Unknown fields are ignored."""
    if not isinstance(h, dict) or h.get("format") != FORMAT or h.get("format_version") != version:
        raise ValueError("not an edgectx snapshot header of the version in its prefix")
    strings = {k: h.get(k) for k in ("created", "model_fingerprint", "model_name")}
    bad = [k for k, v in strings.items() if not isinstance(v, str)]
    bad += [k for k in ("memory_config", "chain", "meta") if not isinstance(h.get(k), dict)]
    bad += [k for k in ("sections",) if not isinstance(h.get(k), list)]
    n_tokens = h.get("n_tokens")
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        bad.append("n_tokens")
    if bad:
        raise ValueError(f"bad field(s) {', '.join(bad)}")
    chunk, links = h["chain"].get("chunk_tokens"), h["chain"].get("links")
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 and isinstance(links, list)
            and len(links) == -(-n_tokens // chunk) and all(isinstance(x, str) and len(x) == 64 for x in links)):
        raise ValueError("the token chain does not fit the token count")
    sections = tuple(parse_entry(s) for s in h["sections"])
    return SnapshotHeader(version, strings["created"], strings["model_fingerprint"], strings["model_name"],
                          h["memory_config"], n_tokens, chunk, tuple(links), sections, h["meta"], data_offset)


def check_table(path: Path, header: SnapshotHeader, size: int) -> None:
    """Sections must tile the data area exactly, in table order, with believable sizes; the token ids
    section must be there with the header's token count."""
    names = [s.name for s in header.sections]
    if len(set(names)) != len(names):
        raise SnapshotError(f"{path} is corrupt: its section table names a section twice.")
    tokens = next((s for s in header.sections if s.name == TOKENS), None)
    if tokens is None or tokens.codec != {"codec": "raw"} or tokens.dtype != "int64" or tokens.shape != (header.n_tokens,):
        raise SnapshotError(f"{path} is corrupt: its token ids section is missing or malformed.")
    end = 0
    for s in header.sections:
        if s.offset != end:
            raise SnapshotError(f"{path} is corrupt: section {s.name!r} starts at {s.offset}, its predecessor ends at {end} "
                                "(the section table is inconsistent).")
        if s.raw_length > MAX_ZSTD_RATIO * s.stored_length:
            raise SnapshotError(f"{path} is corrupt: section {s.name!r} claims {s.raw_length} bytes from {s.stored_length} stored.")
        end += s.stored_length
        if header.data_offset + end > size:
            raise SnapshotError(f"{path} is truncated: section {s.name!r} ends at byte {header.data_offset + end}, "
                                f"the file has {size}.")
    if header.data_offset + end != size:
        raise SnapshotError(f"{path} is corrupt: it has {size - header.data_offset - end} unexpected bytes after its last section.")
