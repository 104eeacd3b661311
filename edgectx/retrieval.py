"""Block retrieval (InfLLM): score host blocks against the query, keep an LRU cache of fetched blocks.

A block's score, per KV head, is the dot product of the query chunk's mean pre-RoPE query (summed over
the head's query group) with the block's representative key for that head. Pre-RoPE dot products are what rotated q and k
give at equal positions, so the score carries no distance penalty: a passage 100K tokens back is as
reachable as one 1K back. What was retrieved is recorded (per block, softmax relevance summed over
layers and steps) so the UI can cite the passages the model looked at.

    blocks, probs = select_blocks(q, store.representatives, n_eligible=40, top_k=4)  # (n_kv, 4) each
    k, v = cache.fetch(block, store)   # on the device, in the compute dtype
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from edgectx.block_store import HostBlockStore


def select_blocks(q: torch.Tensor, representatives: torch.Tensor, n_eligible: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the first `n_eligible` blocks per KV head, for pre-RoPE queries q (n_heads, T, d).

    Each KV head picks its own blocks (heads attend to different things, as their retained tokens
    show). Returns block ids (n_kv, k), ascending per head, and their softmax relevance (n_kv, k).
    """
    n_heads, _, head_dim = q.shape
    n_kv = representatives.shape[1]
    if n_eligible <= 0 or top_k <= 0:
        return torch.empty(n_kv, 0, dtype=torch.long), torch.empty(n_kv, 0)
    reps = representatives[:n_eligible].to(q.dtype)  # (n_blocks, n_kv, d)
    group = n_heads // n_kv
    q_group = q.mean(dim=1).reshape(n_kv, group, head_dim).sum(dim=1)  # (n_kv, d)
    scores = torch.einsum("kd,bkd->kb", q_group, reps) / (head_dim**0.5 * group)  # (n_kv, n_blocks)
    probs = torch.softmax(scores.float(), dim=1)
    top = torch.topk(scores, min(top_k, n_eligible), dim=1).indices.sort(dim=1).values
    return top, probs.gather(1, top)


class BlockCache:
    """A fixed pool of device slots holding host blocks, least recently used reused first.

    The pool is allocated whole on the first fetch (the first retrieval, i.e. once anything has been
    evicted), so device memory is flat from then on however long the context grows.
    """

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity, self.device, self.dtype = capacity, device, dtype
        self.slots: torch.Tensor | None = None  # (capacity, 2, n_kv, block_size, d): K then V
        self.where: OrderedDict[int, int] = OrderedDict()  # block id -> slot, oldest use first
        self.hits = self.misses = 0

    def fetch(self, block: int, store: HostBlockStore) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of `block`, each (n_kv, block_size, d), views of a slot valid until `capacity` more fetches."""
        if block in self.where:
            self.where.move_to_end(block)
            self.hits += 1
            slot = self.where[block]
        else:
            self.misses += 1
            if self.slots is None:
                shape = (self.capacity, 2, store.n_kv_heads, store.block_size, store.head_dim)
                self.slots = torch.empty(shape, device=self.device, dtype=self.dtype)
            slot = len(self.where) if len(self.where) < self.capacity else self.where.popitem(last=False)[1]
            k, v = store.block(block)
            self.slots[slot, 0].copy_(k, non_blocking=True)
            self.slots[slot, 1].copy_(v, non_blocking=True)
            self.where[block] = slot
        return self.slots[slot, 0], self.slots[slot, 1]

    def clear(self) -> None:
        """Forget every cached block (the store was truncated); the pool stays allocated."""
        self.where.clear()

    @property
    def blocks(self) -> list[int]:
        return list(self.where)

    @property
    def device_bytes(self) -> int:
        return 0 if self.slots is None else self.slots.numel() * self.slots.element_size()


@dataclass
class RetrievalRecord:
    """Relevance per retrieved block, summed over layers and steps since the last `clear`."""

    block_size: int
    relevance: dict[int, float] = field(default_factory=dict)
    n_retrievals: int = 0

    def add(self, blocks: torch.Tensor, probs: torch.Tensor) -> None:
        """One layer's retrieval: blocks and relevance (n_kv, k), averaged over the KV heads."""
        self.n_retrievals += 1
        n_kv = blocks.shape[0]
        for block, p in zip(blocks.flatten().tolist(), probs.flatten().tolist()):
            self.relevance[block] = self.relevance.get(block, 0.0) + p / n_kv

    def clear(self) -> None:
        self.relevance.clear()
        self.n_retrievals = 0

    def top(self, n: int = 8) -> list[dict]:
        """The `n` most relevant blocks: token range and relevance averaged over retrievals."""
        ranked = sorted(self.relevance.items(), key=lambda item: -item[1])[:n]
        scale = 1.0 / max(1, self.n_retrievals)
        return [{"block": b, "start_token": b * self.block_size, "end_token": (b + 1) * self.block_size,
                 "score": s * scale} for b, s in ranked]
