"""Model fingerprints: what ties retaining heads and snapshots to the exact weights they were made for.

Hashing a whole multi-GB GGUF on every load would take longer than loading it. Instead the digest
covers every tensor's name, type and shape, plus evenly spaced samples of its bytes (a fine-tune or a
re-quantization changes bytes everywhere, so samples catch it), plus the model's shape metadata.
Reads a few MB however large the file is.

    weights_fingerprint(open_gguf(path))  # 'a3f9...' (64 hex digits)
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from edgectx.gguf_loader import GGUFFile, read_spec

SAMPLES_PER_TENSOR = 16
SAMPLE_BYTES = 4096


def _tensor_samples(data: np.ndarray) -> bytes:
    flat = data.reshape(-1).view(np.uint8)
    n = flat.size
    if n <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
        return flat.tobytes()
    starts = np.linspace(0, n - SAMPLE_BYTES, SAMPLES_PER_TENSOR).astype(np.int64)
    return b"".join(flat[s : s + SAMPLE_BYTES].tobytes() for s in starts)


def weights_fingerprint(g: GGUFFile) -> str:
    """SHA-256 over the model's shape and sampled tensor bytes: equal for the same weights in any path."""
    h = hashlib.sha256(b"edgectx-weights-v1\0")
    spec = read_spec(g)
    h.update(json.dumps(spec.__dict__, default=str, sort_keys=True).encode())
    for name in sorted(g.tensors):
        t = g.tensors[name]
        h.update(f"{name}\0{int(t.tensor_type)}\0{tuple(int(x) for x in t.shape)}\0".encode())
        h.update(_tensor_samples(np.asarray(t.data)))
    return h.hexdigest()
