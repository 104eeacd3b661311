"""Snapshot sections: a named payload (a tensor or plain bytes), its section-table entry, and its decoding.

A tensor section is either a KV tensor under one of edgectx.quant.kv_codec's codecs (fp16, int8,
int4) or any tensor stored `raw` (its little-endian bytes, for indices, scores, token ids, ...).
Table entries come from an untrusted file: `parse_entry` checks every field, and `raw_length`
must equal the size that the dtype, shape and codec imply, so a lying table is refused before any
byte is decompressed. The format is docs/snapshot-format.md.

    section = tensor_section("layer.0.host.k", k, codec="int4", kv_kind="key")
    section = tensor_section("layer.0.scores", scores)           # raw float32
    section = bytes_section("retrieval.json", b"{...}")
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from edgectx.quant import kv_codec

KINDS = ("tensor", "bytes")
RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
              "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
MAX_NAME_CHARS = 200
MAX_DIMS = 8
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Section:
    """A section to write: its uncompressed payload and what the table records about it."""

    name: str
    kind: str  # "tensor" | "bytes"
    payload: bytes
    codec: dict | None = None  # tensor: kv_codec meta, or {"codec": "raw"}; bytes: None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SectionInfo:
    """A section as the file's table describes it (validated by `parse_entry`)."""

    name: str
    kind: str
    codec: dict | None
    dtype: str | None
    shape: tuple[int, ...] | None
    offset: int  # from the start of the data area
    stored_length: int  # zstd-compressed bytes in the file
    raw_length: int  # bytes after decompression: the most a reader will ever allocate for it
    sha256: str  # of the stored bytes


def tensor_section(name: str, tensor: torch.Tensor, codec: str = "raw", kv_kind: str | None = None,
                   **kv_options) -> Section:
    """A tensor section: `codec` "raw" keeps any tensor exactly; "fp16", "int8", "int4" encode a KV
    tensor (n_kv_heads, n_tokens, head_dim) as `kv_kind` "key" or "value" (kv_options: group, keep_*)."""
    if codec == "raw":
        dtype = next((n for n, d in RAW_DTYPES.items() if d == tensor.dtype), None)
        if dtype is None:
            raise ValueError(f"section {name!r}: dtype {tensor.dtype} cannot be stored raw")
        t = tensor.detach().to("cpu").contiguous()
        t = t.to(torch.uint8) if t.dtype == torch.bool else t
        payload = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # reshape: 0-d too
        return Section(name, "tensor", payload, {"codec": "raw"}, dtype, tuple(tensor.shape))
    enc = kv_codec.encode_kv(tensor, kv_kind, codec, **kv_options)
    return Section(name, "tensor", enc.payload, enc.meta, "float16", tuple(enc.meta["shape"]))


def bytes_section(name: str, data: bytes) -> Section:
    return Section(name, "bytes", bytes(data))


def table_entry(section: Section, offset: int, stored: bytes, sha256: str) -> dict:
    return {"name": section.name, "kind": section.kind, "codec": section.codec, "dtype": section.dtype,
            "shape": list(section.shape) if section.shape is not None else None, "compression": "zstd",
            "offset": offset, "stored_length": len(stored), "raw_length": len(section.payload), "sha256": sha256}


def check_name(name) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"section name {name!r} is not 1 to {MAX_NAME_CHARS} printable characters")


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 48


def expected_raw_length(kind: str, codec: dict | None, dtype: str | None, shape: tuple[int, ...] | None) -> int | None:
    """The payload size a tensor section's codec, dtype and shape imply (None for bytes sections)."""
    if kind == "bytes":
        return None
    if codec == {"codec": "raw"}:
        return math.prod(shape) * RAW_DTYPES[dtype].itemsize
    if dtype != "float16" or list(shape) != codec.get("shape"):
        raise ValueError("KV section dtype or shape disagree with its codec")
    return kv_codec.payload_nbytes(codec)


def parse_entry(obj) -> SectionInfo:
    """A table entry from the file, or ValueError saying which field is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("a section entry is not an object")
    check_name(obj.get("name"))
    kind, codec, dtype, shape = obj.get("kind"), obj.get("codec"), obj.get("dtype"), obj.get("shape")
    if kind not in KINDS or obj.get("compression") != "zstd":
        raise ValueError(f"section {obj['name']!r} has unknown kind {kind!r} or compression {obj.get('compression')!r}")
    if kind == "bytes" and not (codec is None and dtype is None and shape is None):
        raise ValueError(f"bytes section {obj['name']!r} has a codec, dtype or shape")
    if kind == "tensor":
        if not (isinstance(codec, dict) and dtype in RAW_DTYPES and isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(_is_count(n) for n in shape)):
            raise ValueError(f"tensor section {obj['name']!r} has an invalid codec, dtype or shape")
        shape = tuple(shape)
    for field in ("offset", "stored_length", "raw_length"):
        if not _is_count(obj.get(field)):
            raise ValueError(f"section {obj['name']!r} has an invalid {field}")
    if not (isinstance(obj.get("sha256"), str) and _HEX64.fullmatch(obj["sha256"])):
        raise ValueError(f"section {obj['name']!r} has an invalid sha256")
    try:
        expected = expected_raw_length(kind, codec, dtype, shape)
    except (ValueError, KeyError) as e:
        raise ValueError(f"section {obj['name']!r}: {e}") from None
    if expected is not None and expected != obj["raw_length"]:
        raise ValueError(f"section {obj['name']!r} claims {obj['raw_length']} bytes, its shape and codec imply {expected}")
    return SectionInfo(obj["name"], kind, codec, dtype, shape, obj["offset"], obj["stored_length"], obj["raw_length"], obj["sha256"])


def decode_section(info: SectionInfo, raw: bytes) -> torch.Tensor | bytes:
    """The section's value from its decompressed payload (whose length the caller has checked)."""
    if info.kind == "bytes":
        return raw
    if info.codec == {"codec": "raw"}:
        stored = torch.uint8 if info.dtype == "bool" else RAW_DTYPES[info.dtype]
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        t = buf.view(stored).reshape(info.shape)
        return t != 0 if info.dtype == "bool" else t
    return kv_codec.decode_kv(info.codec, raw)
