"""Token hash chains: what lets a new conversation find a snapshot of the document it starts with.

Token ids are cut into chunks of `chunk_tokens` (the last chunk may be shorter) and chained:
`link_i = sha256(link_{i-1} || ids of chunk i as little-endian uint32)`, with `link_{-1}` 32 zero
bytes. Link i thus stands for the whole prefix up to the end of chunk i, so a stored chain and new
token ids share k leading links exactly when their first k chunks are equal (CacheGen and vLLM's
prefix caching key reusable KV the same way).

    chain = token_chain(ids)                       # ['9f1c...', ...], one hex link per chunk
    common_prefix_chunks(chain, new_ids)           # 3: the first 3 * 256 tokens can be reused
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

CHUNK_TOKENS = 256


def _ids_array(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids.cpu() if hasattr(token_ids, "cpu") else token_ids).reshape(-1)
    if ids.size and (ids.dtype.kind not in "iu" or int(ids.min()) < 0 or int(ids.max()) >= 1 << 32):
        raise ValueError("token ids must be integers in [0, 2**32)")
    return ids.astype("<u4", copy=False)


def _links(ids: np.ndarray, chunk_tokens: int) -> Iterator[str]:
    link = bytes(32)
    for start in range(0, len(ids), chunk_tokens):
        link = hashlib.sha256(link + ids[start : start + chunk_tokens].tobytes()).digest()
        yield link.hex()


def token_chain(token_ids, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """One hex SHA-256 link per chunk of `token_ids` (a sequence, numpy array or tensor of ints)."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    return list(_links(_ids_array(token_ids), chunk_tokens))


def common_prefix_chunks(chain: Sequence[str], token_ids, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """How many leading chunks of `token_ids` equal the chunks `chain` was built from.

    Hashes only as far as the first mismatch. A stored partial last chunk matches only the same ids
    of the same length, so the reusable tokens are min(count * chunk_tokens, tokens stored)."""
    matched = 0
    for stored, new in zip(chain, _links(_ids_array(token_ids), chunk_tokens)):
        if stored != new:
            break
        matched += 1
    return matched
