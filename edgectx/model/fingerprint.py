"""Model fingerprints: what ties retaining heads and snapshots to the exact weights they were made for.

Hashing a whole multi-GB GGUF on every load would take longer than loading it. Instead the digest
covers every tensor's name, type and shape, plus evenly spaced samples of its bytes (a fine-tune or a
re-quantization changes bytes everywhere, so samples catch it), plus the model's shape metadata.
Reads a few MB however large the file is. A Hugging Face directory is hashed the same way over its
config.json and safetensors tensors (a different digest from the same weights as GGUF: the bytes differ).

    weights_fingerprint(open_gguf(path))  # 'a3f9...' (64 hex digits)
    dir_fingerprint(open_hf_dir(path))
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from edgectx.errors import ModelFileError
from edgectx.model.gguf import GGUFFile, read_spec
from edgectx.model.hf import HFDir
from edgectx.model.hf import read_spec as read_hf_spec

SAMPLES_PER_TENSOR = 16
SAMPLE_BYTES = 4096


def _tensor_samples(data: np.ndarray) -> bytes:
    flat = data.reshape(-1).view(np.uint8)
    n = flat.size
    if n <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
        return flat.tobytes()
    starts = np.linspace(0, n - SAMPLE_BYTES, SAMPLES_PER_TENSOR).astype(np.int64)
    return b"".join(flat[s : s + SAMPLE_BYTES].tobytes() for s in starts)


# ModelSpec fields added after fingerprints were first written, with the value every older model has: left out
# of the digest at that value, so a new field does not change the fingerprints of the models that were already
# supported (their shipped heads, snapshots and conversations are keyed by it)
_LATER_FIELDS = {"qk_norm": False}


def _spec_json(spec) -> bytes:
    fields = {k: v for k, v in spec.__dict__.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    return json.dumps(fields, default=str, sort_keys=True).encode()


def weights_fingerprint(g: GGUFFile) -> str:
    """SHA-256 over the model's shape and sampled tensor bytes: equal for the same weights in any path."""
    h = hashlib.sha256(b"edgectx-weights-v1\0")
    spec = read_spec(g)
    h.update(_spec_json(spec))
    for name in sorted(g.tensors):
        t = g.tensors[name]
        h.update(f"{name}\0{int(t.tensor_type)}\0{tuple(int(x) for x in t.shape)}\0".encode())
        h.update(_tensor_samples(np.asarray(t.data)))
    return h.hexdigest()


def _safetensors_tensors(file: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (dtype, shape, raw bytes, memory-mapped), from the format's header: 8-byte length, then JSON."""
    try:
        with file.open("rb") as f:
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_bytes))
        empty = file.stat().st_size == 8 + header_bytes  # np.memmap refuses an empty map
        data = np.zeros(0, np.uint8) if empty else np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_bytes)
    except (OSError, ValueError, struct.error) as e:
        raise ModelFileError(f"{file} is truncated or corrupt ({e}): download it again.") from None
    header.pop("__metadata__", None)
    return {name: (t["dtype"], t["shape"], data[t["data_offsets"][0] : t["data_offsets"][1]]) for name, t in header.items()}


def dir_fingerprint(hf: HFDir) -> str:
    """SHA-256 over config.json's shapes and sampled tensor bytes of a Hugging Face checkpoint directory."""
    h = hashlib.sha256(b"edgectx-weights-hf-v1\0")
    h.update(_spec_json(read_hf_spec(hf)))
    tensors = {}
    for file in sorted(set(hf.files.values())):  # sharding does not change the digest
        tensors.update(_safetensors_tensors(file))
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        h.update(f"{name}\0{dtype}\0{tuple(shape)}\0".encode())
        h.update(_tensor_samples(data))
    return h.hexdigest()
