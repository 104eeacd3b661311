"""Block retrieval (InfLLM): score host blocks against the query, keep an LRU cache of fetched blocks.

A block's score, per KV head, is the dot product of the query chunk's mean pre-RoPE query (summed over
the head's query group) with the block's representative key for that head. Pre-RoPE dot products are what rotated q and k
give at equal positions, so the score carries no distance penalty: a passage 100K tokens back is as
reachable as one 1K back. At each retrieval, the attention mass its queries put on every block of the
context (retrieved or resident) is recorded, so the UI can cite the passages the model looked at.

    blocks, probs = select_blocks(q, store.representatives, n_eligible=40, top_k=4)  # (n_kv, 4) each
    slots = cache.fetch([3, 7], store); cache.ready()  # on the device, in the compute dtype
    k, v = cache.kv(torch.tensor(slots))   # (2, n_kv, block_size, d) each
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from edgectx.memory.block_store import HostBlockStore


def select_blocks(q: torch.Tensor, representatives: torch.Tensor, n_eligible: int, top_k: int,
                  chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the first `n_eligible` blocks per KV head, for pre-RoPE queries q (n_heads, T, d).

    Each KV head picks its own blocks (heads attend to different things, as their retained tokens
    show), after the blocks `chosen` for every head (the lexical matches, edgectx.memory.lexical).
    Returns block ids (n_kv, k), ascending per head, and their softmax relevance (n_kv, k).
    """
    n_heads, _, head_dim = q.shape
    n_kv = representatives.shape[1]
    if n_eligible <= 0 or top_k <= 0:
        device = representatives.device
        return torch.empty(n_kv, 0, dtype=torch.long, device=device), torch.empty(n_kv, 0, device=device)
    reps = representatives[:n_eligible].to(q.dtype)  # (n_blocks, n_kv, d)
    group = n_heads // n_kv
    q_group = q.mean(dim=1).reshape(n_kv, group, head_dim).sum(dim=1)  # (n_kv, d)
    scores = torch.einsum("kd,bkd->kb", q_group, reps) / (head_dim**0.5 * group)  # (n_kv, n_blocks)
    probs = torch.softmax(scores.float(), dim=1)
    if chosen is not None and chosen.numel():
        scores = scores.index_fill(1, chosen, torch.inf)
    top = torch.topk(scores, min(top_k, n_eligible), dim=1).indices.sort(dim=1).values
    return top, probs.gather(1, top)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, without stalling the host on CUDA: a copy from pageable memory waits
    for its stream to drain, one from pinned memory does not. On the CPU it is `t` itself."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class BlockCache:
    """A fixed pool of device slots holding host blocks, least recently used reused first.

    The pool is allocated whole on the first fetch (the first retrieval, i.e. once anything has been
    evicted), so device memory is flat from then on however long the context grows. Plan, then copy:
    `fetch` picks the slots of a whole retrieval first, then copies every missing block. On CUDA the
    copies run on `copy_stream` (one per ContextMemory) from pinned host memory, asynchronously, and
    `ready()` makes the compute stream wait for them (an event) just before the blocks are gathered into
    the attention context: the retrieval's bookkeeping on the compute stream and the host's own work run
    beside the copies, and no step waits on the host for a copy. On the CPU the copies are plain.
    """

    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype,
                 copy_stream: "torch.cuda.Stream | None" = None):
        self.capacity, self.device, self.dtype = capacity, device, dtype
        self.copy_stream = copy_stream
        self.slots: torch.Tensor | None = None  # (capacity, 2, n_kv, block_size, d): K then V
        self.where: OrderedDict[int, int] = OrderedDict()  # block id -> slot, oldest use first
        self.hits = self.misses = 0
        self._copied: torch.cuda.Event | None = None  # the last batch of copies has landed (CUDA)

    def _plan(self, blocks: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Slots for `blocks` (distinct): hits are touched first, so a miss never takes a slot this batch uses."""
        if len(blocks) > self.capacity:
            raise ValueError(f"one retrieval needs {len(blocks)} blocks but the cache holds {self.capacity}")
        for block in blocks:
            if block in self.where:
                self.where.move_to_end(block)
        copies = []
        for block in blocks:
            if block not in self.where:
                slot = len(self.where) if len(self.where) < self.capacity else self.where.popitem(last=False)[1]
                self.where[block] = slot
                copies.append((block, slot))
        self.misses += len(copies)
        self.hits += len(blocks) - len(copies)
        return [self.where[b] for b in blocks], copies

    def fetch(self, blocks: list[int], store: HostBlockStore) -> list[int]:
        """Bring `blocks` (distinct ids) to the device; returns their slots.

        Slot contents are valid after `ready()` and until `capacity` more blocks are fetched."""
        slots, copies = self._plan(blocks)
        if copies:
            if self.slots is None:
                shape = (self.capacity, 2, store.n_kv_heads, store.block_size, store.head_dim)
                self.slots = torch.empty(shape, device=self.device, dtype=self.dtype)
                if self.copy_stream is not None:
                    self.slots.record_stream(self.copy_stream)  # written there: freeing must wait for it
            if self.copy_stream is None:
                for block, slot in copies:
                    self.slots[slot].copy_(store.slab(block))
            else:
                self._copy_async(copies, store)
        return slots

    def _copy_async(self, copies: list[tuple[int, int]], store: HostBlockStore) -> None:
        stream = self.copy_stream
        # Everything queued on the compute stream so far (reads of the slots about to be overwritten, the
        # pool's allocation) happens before the copies. The CPU has just read the retrieval's block ids
        # back from the device, so that stream is drained up to here and waiting costs nothing.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if store.host_dtype == self.dtype:  # one async DMA per block from pinned memory, straight to its slot
                for block, slot in copies:
                    self.slots[slot].copy_(store.slab(block), non_blocking=True)
            else:  # the DMAs land in a staging buffer; one kernel converts them and scatters them to their slots
                staged = torch.empty((len(copies),) + self.slots.shape[1:], device=self.device, dtype=store.host_dtype)
                for i, (block, _) in enumerate(copies):
                    staged[i].copy_(store.slab(block), non_blocking=True)
                index = upload(torch.tensor([slot for _, slot in copies]), self.device)
                self.slots.index_copy_(0, index, staged.to(self.dtype))
            self._copied = torch.cuda.Event()
            self._copied.record(stream)

    def ready(self) -> None:
        """Make the current (compute) stream wait until the fetched blocks have landed; no-op on the CPU."""
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)

    def kv(self, slots: torch.Tensor, heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V held in `slots`; with `heads` (n_kv, 1) and slots (n_kv, k): each head's own blocks,
        (n_kv, k * block_size, d) each. Reads the pool: call `ready()` first."""
        if heads is None:
            return self.slots[slots, 0], self.slots[slots, 1]
        n_kv, k = slots.shape
        picked = self.slots[slots, :, heads]  # (n_kv, k, 2, block_size, d)
        picked = picked.transpose(1, 2).reshape(n_kv, 2, -1, picked.shape[-1])  # (n_kv, 2, k * block_size, d)
        return picked[:, 0], picked[:, 1]

    def synchronize(self) -> None:
        """Wait on the host until every copy issued has landed (before host memory they read is rewritten)."""
        if self._copied is not None:
            self._copied.synchronize()

    def clear(self) -> None:
        """Forget every cached block (the store was truncated); the pool stays allocated."""
        self.synchronize()  # the store is about to overwrite host memory that copies may still be reading
        self.where.clear()

    @property
    def blocks(self) -> list[int]:
        return list(self.where)

    @property
    def device_bytes(self) -> int:
        return 0 if self.slots is None else self.slots.numel() * self.slots.element_size()


class RetrievalRecord:
    """What the queries attended to at each retrieval since the last `clear`: attention mass per block of the
    context (resident tokens and retrieved blocks alike, the sinks left out), summed over layers and steps.

    The sums stay on the device (float64, as Python floats would sum them) until someone reads `relevance`:
    recording a retrieval reads nothing back (issue 21)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.n_retrievals = 0
        self._relevance: dict[int, float] = {}  # what has been read back, oldest first
        self._sum: torch.Tensor | None = None  # (n_blocks,) float64: added since the last read

    def add(self, mass: torch.Tensor) -> None:
        """One layer's retrieval: the mean attention mass of its queries per block (n_blocks,)."""
        self.n_retrievals += 1
        mass = mass.double()
        if self._sum is None:
            self._sum = mass.clone()
            return
        if mass.shape[0] > self._sum.shape[0]:
            self._sum = torch.nn.functional.pad(self._sum, (0, mass.shape[0] - self._sum.shape[0]))
        self._sum[: mass.shape[0]] += mass

    @property
    def relevance(self) -> dict[int, float]:
        """Summed mass per block that received any, {block: mass}."""
        if self._sum is not None:
            total, self._sum = self._sum, None
            blocks = torch.nonzero(total > 0).flatten()
            for block, p in zip(blocks.tolist(), total[blocks].tolist()):
                self._relevance[block] = self._relevance.get(block, 0.0) + p
        return self._relevance

    @relevance.setter
    def relevance(self, value: dict[int, float]) -> None:
        self._relevance, self._sum = value, None

    def clear(self) -> None:
        self._relevance, self._sum = {}, None
        self.n_retrievals = 0

    def top(self, n: int = 8) -> list[dict]:
        """The `n` most relevant blocks: token range and relevance averaged over retrievals."""
        ranked = sorted(self.relevance.items(), key=lambda item: -item[1])[:n]
        scale = 1.0 / max(1, self.n_retrievals)
        return [{"block": b, "start_token": b * self.block_size, "end_token": (b + 1) * self.block_size,
                 "score": s * scale} for b, s in ranked]
