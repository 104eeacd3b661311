"""ContextMemory: a fixed device KV budget over an unbounded context (Locret eviction + InfLLM retrieval).

Per layer, the device holds the *resident* tokens, sorted by original index per KV head: the first
`n_sink` tokens, the newest `n_local` (the window) and the `n_retain` older tokens per KV head that the
eviction scorer ranks highest. Every token's pre-RoPE K and V also go to a host block store; once
anything has been evicted, each query chunk (or every `retrieve_every` decode steps) retrieves
`top_k_blocks` blocks into an LRU block cache: first, for every layer and KV head alike, the blocks that
hold the query's rare tokens (edgectx.memory.lexical; the token ids come with `begin`), then each KV
head's best by representative key. What the queries then attend to, per block, goes to the record
that citations read. Attention runs over
`resident + retrieved blocks + the chunk`, with keys rotated at their assigned positions
(`compact`: the selected context renumbered 0..N-1 in original order; `original`: true indices).
Until the context outgrows `budget_tokens` nothing is evicted or retrieved: exactly full attention.

The resident tiers and the block cache hold K and V in `kv_dtype` (float16 on a CPU, where the model
computes in float32: half their bytes). The assembled context, what attention reads every step, is kept in
`context_dtype`: float16 too where the fused decode step attends it in C (edgectx.kernels.cpu_attention:
half the bytes every step reads, which is what a step over a long context waits for), else the compute dtype
(PyTorch's CPU attention has no fast float16 path: a prefill chunk, or a step that runs eagerly, widens the
context first). K and V are rounded to `kv_dtype` before they enter the context, and rotated keys once more
(`as_stored`): every rotated key is the rotation of its stored pre-RoPE key and every value its stored value,
whatever dtype the context holds and however it was assembled (a rebuild or a restore), and within the budget
the memory is exactly full attention.

Plan, then commit: `attend` writes only scratch space (the assembled context past its committed
length) and records what `commit` will do; a failed or cancelled forward leaves the memory as it was.

Ahead of time: after a decode step's commit, a layer whose next step would retrieve (every `retrieve_every`th)
or rebuild its context (after an eviction) does it then, with the query of the step just taken (consecutive
queries are alike: the same premise as `retrieve_every`); a decode step that evicts (every `evict_every`th) retrieves
too, its context being rebuilt anyway. The next step then finds its context ready and runs
as a steady one: the fused ggml step on a CPU, a replayed CUDA graph on a GPU, instead of the eager model.
`EDGECTX_RETRIEVE_AHEAD=0` keeps retrieval at the step itself, with that step's own query.

Steady steps: after a fused step the memory counts how many of the next steps change nothing in any layer but
counts (LayerMemory.steady_steps: no buffer grows, no host block starts or completes, nothing evicts, no retrieval
is due). Those run the last step's graph again with every pointer one column on (`steady_key`,
edgectx.quant.ggml_decode's `again`), and `commit` only counts them (LayerMemory.counted): no slots, no records.

    memory = ContextMemory(spec, rope, device, dtype, MemoryConfig(budget_tokens=2048), kv_dtype=torch.float16)
    memory.begin(len(chunk)); logits = model(chunk, memory); memory.commit()
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from edgectx import kernels
from edgectx.kernels import cpu_attention
from edgectx.memory.block_store import HostBlockStore, upload
from edgectx.memory.device import cache_capacity_blocks
from edgectx.memory.graph_step import memory_graph_step
from edgectx.model.graph_step import GraphStep
from edgectx.model.kv import DecodeSlot, chunk_attention
from edgectx.memory.config import MemoryConfig
from edgectx.memory.lexical import UNKNOWN, TokenIndex
from edgectx.memory.tiers import REUSE_SLACK, Assembly, Resident
from edgectx.memory.retrieval import BlockCache, RetrievalRecord, select_blocks
from edgectx.model.rope import Rope
from edgectx.memory.recent import RecentQueries
from edgectx.memory.scoring import AttentionMassScorer, EvictionScorer
from edgectx.model.spec import ModelSpec


# Host store dtypes a fused decode step writes itself (edgectx.quant.ggml_decode: float16 and float32 convert as
# PyTorch does, round to nearest even)
_GRAPH_WRITES = (torch.float16, torch.float32)
_RETRIEVALS = itertools.count()  # names a retrieval on the device until its ids are read (LayerMemory._retrieve)
RECORD_QUERIES = 64  # a chunk's newest queries whose attention the record keeps (the question, in a chat turn)


def _ranks(idx: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's rank among the distinct values of `idx` (same shape), and their count (a 0-d long tensor):
    `searchsorted(unique(idx), idx)` and `len(unique(idx))` with static shapes, so nothing is read back.
    `bound`: every value is below it (known on the host). Where it is small next to `idx` (a context of a few
    thousand tokens), the ranks come from a presence map's running count instead of a sort: 36 against 133 µs
    for 3 x 2,600 indices among 4,096 tokens on 2 CPU threads."""
    flat = idx.flatten()
    if flat.numel() == 0:
        return idx.clone(), torch.tensor(0, device=idx.device)
    if bound is not None and bound <= 4 * flat.numel():
        count = torch.zeros(bound, dtype=torch.long, device=idx.device).index_fill_(0, flat, 1).cumsum(0)
        return count.index_select(0, flat).sub_(1).view(idx.shape), count[-1]
    values, order = flat.sort()
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    rank = first.cumsum(0) - 1
    return torch.empty_like(rank).scatter_(0, order, rank).view(idx.shape), rank[-1] + 1


def _step_mass(q_rot: torch.Tensor, asms: list[Assembly], end: int) -> torch.Tensor:
    """Attention mass (L, n_kv, end) that decode queries q_rot (L, n_heads, 1, d), rotated, put on each column of
    their contexts `asms` (L of them, columns [0, end) each), summed over each KV head's group of query heads; a
    query sees every valid column. One product a context, the rest once for all of them."""
    n_layers, n_heads, _, head_dim = q_rot.shape
    n_kv = asms[0].k.shape[0]
    qg = q_rot.reshape(n_layers, n_kv, n_heads // n_kv, head_dim) * head_dim**-0.5  # heads h*group.. share KV head h
    logits = qg.new_empty(n_layers, n_kv, n_heads // n_kv, end)
    for i, asm in enumerate(asms):
        torch.matmul(qg[i], asm.k[:, :end].to(qg.dtype).transpose(1, 2), out=logits[i])
    logits = logits.float()
    if any(asm.valid is not None for asm in asms):
        valid = torch.stack([asm.valid[:, :end] if asm.valid is not None
                             else torch.ones(n_kv, end, dtype=torch.bool, device=logits.device) for asm in asms])
        logits.masked_fill_(~valid[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits).sum(dim=2)


def _next_positions(memory: "ContextMemory", asms: list[Assembly]) -> torch.Tensor:
    """(L,) on the device: the position the next token takes in each context, whether the host holds it (an int) or
    the device (a count from a build on the device, not read yet); host ints uploaded without a stall."""
    nexts = [asm.next_position for asm in asms]
    if all(isinstance(p, int) for p in nexts):
        return upload(torch.tensor(nexts), memory.device)
    return torch.stack([p.view(()) if isinstance(p, torch.Tensor) else upload(torch.tensor(p), memory.device)
                        for p in nexts])


def _rotated_observers(memory: "ContextMemory", q_obs: torch.Tensor, asms: list[Assembly], back: torch.Tensor,
                       n_new: int) -> torch.Tensor:
    """The observed queries q_obs (L, n_heads, n_obs, d), pre-RoPE, picked `back` from the newest (n_sel,) and rotated
    at their positions in each layer's context `asms` (the newest of the forward's `n_new` tokens at its last)."""
    n_obs = q_obs.shape[2]
    # Counted back from the newest; in a context whose positions are fewer than the window (a small budget under
    # compact positions) the oldest queries stop at position 0 (indexing with a negative position took a row
    # from the end of the table)
    last = asms[0].next_position if len(asms) == 1 else _next_positions(memory, asms)[:, None]  # (one: as held)
    q_pos = (last + (n_new - 1) - back).clamp_(min=0).view(len(asms), -1)  # (L, n_sel)
    bound = max(asm.position_bound(n_new) for asm in asms)
    cos, sin = memory.rope.tables(q_pos, memory.dtype, n_positions=bound)
    return memory.rope.rotate(q_obs[:, :, n_obs - 1 - back], cos[:, None], sin[:, None])


def _observed_mass(memory: "ContextMemory", q_obs: torch.Tensor, asms: list[Assembly], n_keys: int,
                   n_new: int) -> torch.Tensor:
    """Attention mass (L, n_kv, n_keys) that every `observe_stride`th of the observed queries q_obs (L, n_heads,
    n_obs, d) puts on each of the first `n_keys` columns of its layer's context (`asms`), causally by original
    index and within the valid columns, summed over the queries and each KV head's group: LayerMemory._observe for
    L layers at once (a decode step's eviction, ContextMemory.observe_together), one product a layer."""
    c = memory.config
    n_layers, n_heads, n_obs, head_dim = q_obs.shape
    n_kv = asms[0].k.shape[0]
    back = torch.arange(0, n_obs, c.observe_stride, device=memory.device).flip(0)  # counted back from the newest
    q_rot = _rotated_observers(memory, q_obs, asms, back, n_new)
    qg = q_rot.reshape(n_layers, n_kv, -1, head_dim).float()
    # (L, n_kv, group * n_sel, n_keys), each step in place: this runs at every evicting chunk, and the copies of a
    # plain `softmax(logits.masked_fill(...))` cost more than the product (100 against 42 ms a layer for a 512-token
    # chunk over 2,560 keys on 2 CPU threads)
    logits = qg.new_empty(n_layers, n_kv, qg.shape[2], n_keys)
    for i, asm in enumerate(asms):
        torch.baddbmm(qg.new_empty(()), qg[i], asm.k[:, :n_keys].float().transpose(1, 2), beta=0.0,
                      alpha=head_dim**-0.5, out=logits[i])
    end_idx = memory.n_tokens + n_new
    q_idx = (end_idx - 1 - back).repeat(n_heads // n_kv)  # (group * n_sel,)
    idx = asms[0].idx[:, :n_keys][None] if n_layers == 1 else torch.stack([asm.idx[:, :n_keys] for asm in asms])
    blocked = idx[:, :, None, :] > q_idx[None, None, :, None]
    if any(asm.valid is not None for asm in asms):
        valid = torch.stack([asm.valid[:, :n_keys] if asm.valid is not None
                             else torch.ones(n_kv, n_keys, dtype=torch.bool, device=memory.device) for asm in asms])
        blocked |= ~valid[:, :, None, :]
    logits.masked_fill_(blocked, float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits).sum(dim=2)


def _mass_per_block(mass: torch.Tensor, idx: torch.Tensor, memory: "ContextMemory", n_rows: int) -> torch.Tensor:
    """Per completed block (..., n_blocks), the mass (..., n_kv, end) on columns of original indices `idx` (same
    shape), summed over KV heads, per query row of the `n_rows` that gave it. Completed blocks before this forward
    only: a passage of the context, not the query's own tokens. The sinks and everything newer go to bin n_blocks,
    which is dropped (attention parks its spare mass on the sinks whatever the question)."""
    c = memory.config
    n_blocks = memory.n_tokens // c.block_size
    bins = torch.div(idx, c.block_size, rounding_mode="floor").clamp_(max=n_blocks).masked_fill_(idx < c.n_sink, n_blocks)
    per_block = mass.new_zeros(*mass.shape[:-1], n_blocks + 1).scatter_add_(-1, bins, mass)
    return per_block[..., :n_blocks].sum(dim=-2).mul_(1.0 / n_rows)


def _ranks_layers(idx: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ranks` for each layer of idx (L, ...) on its own: (ranks (L, ...), counts (L,)). The layers' values are set
    apart (layer l's shifted by l * bound) and ranked together; a layer's lowest rank is then the count of the
    distinct values before it."""
    n_layers = idx.shape[0]
    shift = torch.arange(n_layers, device=idx.device).mul_(bound).view(n_layers, *[1] * (idx.dim() - 1))
    ranks, _ = _ranks(idx + shift, n_layers * bound)
    flat = ranks.view(n_layers, -1)
    flat.sub_(flat.amin(dim=1, keepdim=True))
    return ranks, flat.amax(dim=1) + 1


def _columns(blocks: torch.Tensor, resident_idx: torch.Tensor, n_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Original indices of the retrieved blocks' columns (..., n_kv, k * block_size) and, per resident column, whether
    it is a copy of a retrieved token (..., n_kv, n_resident), for block ids (..., n_kv, k) on the device, resident
    indices `resident_idx` (..., n_kv, n_resident) and `n_blocks` completed blocks."""
    offsets = torch.arange(block_size, device=blocks.device)
    bidx = (blocks[..., None] * block_size + offsets).flatten(-2)
    picked = torch.zeros(*blocks.shape[:-1], n_blocks + 1, dtype=torch.bool, device=blocks.device)
    picked.scatter_(-1, blocks, True)
    return bidx, picked.gather(-1, (resident_idx // block_size).clamp_(max=n_blocks))


@dataclass
class _Pending:
    k: torch.Tensor  # (n_kv, T, d) pre-RoPE
    v: torch.Tensor
    q: torch.Tensor  # (n_heads, T, d) pre-RoPE, kept for the next observation window
    scores: torch.Tensor | None  # (n_kv, T) the scorer's scores for the new tokens (None: until commit)
    observed: torch.Tensor | None  # (n_kv, assembled + T) attention mass from the observation window
    evict: bool
    features: torch.Tensor | None = None  # a decode step's scorer input, scored with every layer's at commit
    written: bool = False  # a fused step wrote K and V to the tiers and the store, Q to the recent queries


class LayerMemory:
    def __init__(self, memory: "ContextMemory", layer: int):
        self.memory, self.layer = memory, layer
        s, c = memory.spec, memory.config
        host_dtype = getattr(torch, c.host_dtype)
        if host_dtype == torch.float16 and memory.kv_dtype == torch.bfloat16:
            # Half precision in the tiers' own format (CUDA's bfloat16): no conversion on every retrieval, and no
            # float16 overflow of bfloat16 values (issue 21, defect 9). Same bytes.
            host_dtype = torch.bfloat16
        self.store = HostBlockStore(s.n_kv_heads, s.head_dim, c.block_size, memory.device, host_dtype=host_dtype,
                                    repr_dtype=torch.float16 if host_dtype != torch.bfloat16 else torch.bfloat16,
                                    copy_stream=memory.copy_stream,
                                    staged=memory.device_bookkeeping)
        self.resident = Resident(s.n_kv_heads, s.head_dim, memory.device, memory.kv_dtype)
        self.cache = BlockCache(memory.cache_blocks * s.n_kv_heads, memory.device, memory.kv_dtype, copy_stream=memory.copy_stream)
        self.evicted = False  # once True, the device no longer holds every token: retrieval is on
        self._selection_d: torch.Tensor | None = None  # a retrieval kept on the device, its ids not read yet
        self.selection = torch.empty(s.n_kv_heads, 0, dtype=torch.long)  # retrieved blocks per KV head (host)
        self._facts: tuple | None = None  # (selection key, any duplicate, next position): read with the block ids
        self.steps_since_retrieval = 0
        # in the tiers' dtype: float16 on the CPU (half the float32 window: 117 MB less for Qwen3-0.6B, 256 MB for an
        # 8B model), the compute dtype on CUDA; the scorer widens them where it rotates them
        self.recent = RecentQueries(s.n_heads, s.head_dim, c.n_observe, memory.device, memory.kv_dtype)
        self.asm: Assembly | None = None
        self._record_now = False  # this forward retrieved: record what its queries attend to
        self._last_q: torch.Tensor | None = None  # the last decode step's query (pre-RoPE), for `prepare_next`
        self._built_together = False  # ContextMemory._build_together built this step's context (read once)
        self.version = 0  # bumped whenever the resident set changes other than by appending
        self._pending: _Pending | None = None
        self._layout: tuple | None = None  # decode_slot's: (context K, V, mask, write rows, the slot's layout)
        self._slotted: tuple | None = None  # (the context, its column) of the last slot: what steady_steps goes on from

    @property
    def selection(self) -> torch.Tensor:
        """(n_kv, k) the blocks each KV head retrieved last, on the host; `_key` holds them as Python ints. A chunk's
        retrieval that gathers on the device keeps them there (`_retrieve`): they are read when first asked for
        here (a snapshot, a truncation), or for every layer at once (ContextMemory._read_device_state)."""
        if self._selection is None:
            self._resolve(self._selection_d.flatten().tolist())
        return self._selection

    @selection.setter
    def selection(self, blocks: torch.Tensor) -> None:
        self._selection, self._key, self._selection_d = blocks, tuple(blocks.flatten().tolist()), None

    def _resolve(self, ids: list[int]) -> None:
        """The device selection's ids, read: the host selection, and the key of the context built from it."""
        old, self._key = self._key, tuple(ids)
        self._selection = torch.tensor(ids, dtype=torch.long).reshape(self._selection_d.shape)
        self._selection_d = None
        if self.asm is not None and self.asm.key[1] is old:
            self.asm.key = (self.asm.key[0], self._key)

    @property
    def gathers_on_device(self) -> bool:
        """Whether retrieval keeps its block ids on the device (the device path, where the gather kernel runs); the
        block cache is then unused. Otherwise the host reads them and copies through the cache."""
        return self.memory.device_bookkeeping and self.store.device_gather

    @property
    def q_recent(self) -> torch.Tensor:
        """(n_heads, <= n_observe, d) the last queries, pre-RoPE, oldest first."""
        return self.recent.window

    @q_recent.setter
    def q_recent(self, q: torch.Tensor) -> None:
        self.recent.set(q)

    # -- plan ---------------------------------------------------------------------------------------

    def _selects(self, q: torch.Tensor) -> bool:
        """Whether a forward with queries `q` selects blocks anew (`_retrieve`); else it keeps the last selection, or
        retrieves nothing (before any eviction)."""
        c = self.memory.config
        if not self.evicted or c.top_k_blocks == 0:
            return False
        return not (q.shape[1] == 1 and self.asm is not None and self.steps_since_retrieval < c.retrieve_every)

    def _n_eligible(self) -> int:
        """The blocks a retrieval may pick: those wholly older than the window (newer tokens are resident in every
        head anyway)."""
        c = self.memory.config
        return min(self.store.n_blocks, max(0, self.memory.n_tokens - c.n_local) // c.block_size)

    def _retrieve(self, q: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks (n_kv, k) the forward with queries `q` attends to; `blocks`: selected for it already (with
        every layer's, ContextMemory._prepare_next)."""
        m, c = self.memory, self.memory.config
        if not self.evicted or c.top_k_blocks == 0:
            return self.selection[:, :0]
        if not self._selects(q):
            return self.selection
        if blocks is None:
            n_eligible = self._n_eligible()
            blocks, _ = select_blocks(q, self.store.representatives, n_eligible, c.top_k_blocks,
                                      m.lexical_blocks(n_eligible))
        if self.gathers_on_device:
            self._take_on_device(blocks)
            return blocks
        self.steps_since_retrieval, self._record_now = 0, True
        if m.device_bookkeeping:
            # The one read of a retrieval: the block ids (the host copies blocks by id) together with what a
            # rebuild would need to know on the host, computed on the device before knowing whether it will.
            n_kv, k = blocks.shape
            ids = torch.cat((blocks.flatten(), self._build_facts(blocks, self.resident.n))).tolist()
            self._selection, self._key = torch.tensor(ids[: n_kv * k], dtype=torch.long).reshape(n_kv, k), tuple(ids[: n_kv * k])
            self._selection_d = None
            self._facts = ((self.version, self._key, self.resident.n, m.n_tokens), bool(ids[-2]), ids[-1])
        else:
            self.selection = blocks.cpu()  # the host reads the ids anyway (to copy blocks)
        return self.selection

    def _take_on_device(self, blocks: torch.Tensor) -> None:
        """A retrieval that reads nothing back: the blocks (n_kv, k) are gathered from the host store by ids on the
        device (HostBlockStore.gather) and the context is built around them there (`_build`); ContextMemory reads every
        layer's ids and position count in one go where the host needs them (a decode step's end)."""
        self.steps_since_retrieval, self._record_now = 0, True
        self._selection, self._selection_d, self._facts = None, blocks, None
        self._key = ("device", next(_RETRIEVALS))  # names this retrieval until its ids are read (`_resolve`)

    def _decode_room(self) -> int:
        """Columns a context rebuilt for decode steps needs beyond its own (Assembly's `ahead`): the resident tokens
        those steps add until the next eviction."""
        c = self.memory.config
        return min(REUSE_SLACK, max(0, self._limit + c.evict_every - self.resident.n))

    def _kept(self, reuse: Assembly | None, asm: Assembly, key: tuple, n_resident: int) -> int:
        """The resident columns whose values and indices the context `reuse` that `asm` replaces holds in place
        already: its own resident prefix, in the same buffers, when the tier has not been compacted since (the same
        version)."""
        return reuse.n_resident if reuse is not None and asm.v is reuse.v and reuse.key[0] == key[0] \
            and reuse.n_resident <= n_resident else 0

    def _assemble(self, selection: torch.Tensor, decoding: bool = False) -> Assembly:
        """The context for `selection`, rebuilt if it is not the current one. `decoding`: decode steps read it: they
        grow the resident tokens until the next eviction, and each retrieval among them rebuilds the context, which
        then finds buffers with room for all of them (Assembly's `ahead`)."""
        on_device = selection is self._selection_d and selection is not None
        key = (self.version, self._key if on_device or selection is self._selection else tuple(selection.flatten().tolist()))
        if self.asm is None or self.asm.key != key:
            self.asm = self._build(selection, key, self.resident.n, self.memory.n_tokens, reuse=self.asm,
                                   ahead=self._decode_room() if decoding else 0, on_device=on_device)
        return self.asm

    def _columns(self, blocks_d: torch.Tensor, n_resident: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_columns` for this layer's resident columns [0, n_resident); blocks_d (n_kv, k) on the device."""
        return _columns(blocks_d, self.resident.idx[:, :n_resident], self.store.n_blocks, self.memory.config.block_size)

    def _build_facts(self, blocks_d: torch.Tensor, n_resident: int) -> torch.Tensor:
        """(2,) on the device: whether any resident token duplicates a retrieved one, and the position the next
        token takes (compact: the distinct indices in the context; original: the token count)."""
        bidx, duplicate = self._columns(blocks_d, n_resident)
        if self.memory.config.positions == "compact":
            _, n_present = _ranks(torch.cat((self.resident.idx[:, :n_resident], bidx), dim=1), self.memory.n_tokens)
        else:
            n_present = torch.tensor(self.memory.n_tokens, device=bidx.device)
        return torch.stack((duplicate.any().long(), n_present))

    def _build(self, selection: torch.Tensor, key: tuple, n_resident: int, n_tokens: int,
               reuse: Assembly | None = None, ahead: int = 0, on_device: bool = False) -> Assembly:
        """The attention context from resident columns [0, n_resident) and the retrieved blocks, with
        `n_tokens` tokens in memory (what `original` positions continue from), in `reuse`'s buffers if they fit
        (the context it replaces: see Assembly). Every column is written into the context's buffers directly: the
        keys before RoPE gathered into one scratch buffer, then rotated into the context; values and indices
        copied in (a decode retrieval rebuilds every layer's context, most of its cost). `on_device`: `selection`
        is a retrieval's ids on the device (`_retrieve`): the blocks come straight from the host store, the
        duplicates are always masked and compact positions go on from a count on the device (Assembly.next_pos)."""
        m, c = self.memory, self.memory.config
        if not on_device and selection.numel() and self.gathers_on_device:
            # Ids on the host (a restored snapshot, ids read since): where the store gathers on the device, every
            # context with retrieved blocks is built there, so a restored context is the live one, mask included,
            # and the block cache stays unallocated
            selection, on_device = upload(selection, m.device), True
        r = self.resident
        n_kv = r.n_kv
        n_keys = n_resident + selection.shape[1] * c.block_size
        headroom = max(c.chunk_tokens, c.evict_every) + 1
        asm = Assembly.empty(n_kv, n_keys, r.head_dim, headroom, m.context_dtype, m.device, reuse=reuse, ahead=ahead)
        k = m.scratch(n_kv, n_keys, r.head_dim, m.kv_dtype)  # keys before RoPE, as stored
        kept = self._kept(reuse, asm, key, n_resident)
        if not m.c_ops:  # (C rotates the resident keys where they are)
            k[:, :n_resident] = r.k[:, :n_resident]
        asm.v[:, kept:n_resident], asm.idx[:, kept:n_resident] = r.v[:, kept:n_resident], r.idx[:, kept:n_resident]
        valid = duplicate = None
        facts = self._facts if self._facts is not None and self._facts[0] == key + (n_resident, n_tokens) else None
        if on_device and selection.numel():
            asm.idx[:, n_resident:n_keys], duplicate = self._columns(selection, n_resident)
            self.store.gather(selection, k[:, n_resident:], asm.v[:, n_resident:n_keys])
            idx = asm.idx[:, :n_keys]
            positions, next_pos = _ranks(idx, m.n_tokens) if c.positions == "compact" else (idx, n_tokens)
            # compact: the count of distinct indices, each below the token count, at most every head's columns
            # distinct (heads retain tokens of their own): not the context's length
            bound = min(m.n_tokens, n_kv * n_keys) if c.positions == "compact" else n_tokens
            valid = torch.cat((~duplicate, torch.ones(n_kv, n_keys - n_resident, dtype=torch.bool, device=m.device)), dim=1)
            self._rotate_into(asm, k, positions, n_keys, bound, n_resident)
            asm.finish(n_keys, valid, next_pos, key, n_resident, always_valid=True, bound=bound)
            return asm
        if selection.numel():
            # Issue every copy of the retrieval at once; on CUDA they run beside the work below until `ready`.
            # Block ids live on the host as Python ints (they name host memory): the cache's bookkeeping is free.
            # Each head's own blocks only, (block, KV head) pairs: a block two heads chose is two pairs.
            ids = key[1]
            pairs = [block * n_kv + i // selection.shape[1] for i, block in enumerate(ids)]  # row-major (n_kv, k)
            slots = self.cache.fetch(pairs, self.store)
            blocks_d, slots_d = upload(torch.tensor([ids, slots]).reshape(2, *selection.shape), m.device).unbind(0)
            # duplicate: resident copies of retrieved tokens
            asm.idx[:, n_resident:n_keys], duplicate = self._columns(blocks_d, n_resident)
            self.cache.ready()
            self.cache.kv_into(slots_d, k[:, n_resident:], asm.v[:, n_resident:n_keys])
        idx = asm.idx[:, :n_keys]
        # Compact positions: duplicates need no exclusion (a resident copy's index is its retrieved twin's).
        positions, n_present = _ranks(idx, m.n_tokens) if c.positions == "compact" else (idx, None)
        _, any_duplicate, next_pos = facts or self._read_facts(duplicate, n_present, n_resident, n_tokens)
        if any_duplicate:
            valid = torch.cat((~duplicate, torch.ones(n_kv, n_keys - n_resident, dtype=torch.bool,
                                                      device=m.device)), dim=1)
        self._rotate_into(asm, k, positions, n_keys, next_pos, n_resident)
        # With the bookkeeping on the device (CUDA), the validity buffer is always there: with the buffers reused,
        # the CUDA-graph step's key then stays the same across rebuilds
        asm.finish(n_keys, valid, next_pos, key, n_resident, always_valid=m.device_bookkeeping)
        return asm

    def _rotate_into(self, asm: Assembly, k: torch.Tensor, positions: torch.Tensor, n_keys: int, bound: int,
                     n_resident: int = 0) -> None:
        """The context's keys [0, n_keys) rotated at `positions` (all below `bound`) from `k`, the keys before RoPE as
        stored: K rotated in the compute dtype, then rounded to kv_dtype (as_stored); V is as stored already, widened
        as it was copied. With C (`c_ops`), straight from the tier (its first `n_resident` columns) and `k` (the rest)
        into the float16 context."""
        m, r = self.memory, self.resident
        if m.c_ops:
            cos, sin = m.rope.signed_tables(bound)
            resident, retrieved = slice(0, n_resident), slice(n_resident, n_keys)
            cpu_attention.rotate_into(asm.k[:, resident], r.k[:, resident], positions[:, resident], cos, sin)
            cpu_attention.rotate_into(asm.k[:, retrieved], k[:, retrieved], positions[:, retrieved], cos, sin)
        elif m.context_dtype == m.dtype:
            tables = m.rope.tables(positions, m.dtype, n_positions=bound)
            k_rot = m.rope.rotate(k, *tables, out=asm.k[:, :n_keys])
            if m.kv_dtype != m.dtype:
                k_rot.copy_(k_rot.to(m.kv_dtype))
        else:  # a float16 context: rotated in float32 beside it, rounded as it is copied in
            tables = m.rope.tables(positions, m.dtype, n_positions=bound)
            rotated = m.scratch(r.n_kv, n_keys, r.head_dim, m.dtype, "rotated")
            asm.k[:, :n_keys].copy_(m.rope.rotate(k, *tables, out=rotated))

    def _read_facts(self, duplicate: torch.Tensor | None, n_present: torch.Tensor | None, n_resident: int,
                    n_tokens: int) -> tuple:
        """(None, any duplicate, next position) for a build the retrieval did not foresee (after an eviction, a
        restore): what the host cannot know, read back in one go; nothing when it knows it all."""
        next_pos = n_tokens if n_present is None else n_resident if not self.evicted else None  # before any
        # eviction every head holds every token, indices 0 .. n_resident - 1
        unknown = ([duplicate.any().long()] if duplicate is not None else []) + ([n_present] if next_pos is None else [])
        read = torch.stack(unknown).tolist() if unknown else []
        any_duplicate = bool(read.pop(0)) if duplicate is not None else False
        return None, any_duplicate, read.pop(0) if next_pos is None else next_pos

    def reassemble(self, selection: torch.Tensor, n_resident: int, capacity: int) -> Assembly:
        """Rebuild the attention context as `attend` left it (a restored snapshot): built from resident
        columns [0, n_resident) and the blocks `selection`, then the resident tokens appended since
        (every token committed since the build), rotated at the positions that followed. Same columns,
        order, positions and capacity as the live one, hence the same logits."""
        m, r = self.memory, self.resident
        n_new = r.n - n_resident
        key = (self.version, tuple(selection.flatten().tolist()))
        asm = self._build(selection, key, n_resident, m.n_tokens - n_new)
        asm.reserve(capacity)
        if n_new:
            positions = torch.arange(asm.next_pos, asm.next_pos + n_new, device=m.device)
            k_rot = m.as_stored(m.rope.rotate(r.k[:, n_resident : r.n].to(m.dtype), *m.rope.tables(positions, m.dtype)))
            asm.write(asm.length, k_rot, r.v[:, n_resident : r.n], r.idx[:, n_resident : r.n])
            asm.advance(n_new)
        self.asm = asm
        return asm

    def _attended(self, q_rot: torch.Tensor, asm: Assembly, start: int, n_new: int) -> torch.Tensor:
        """Attention mass per completed block (n_blocks,) that the newest `RECORD_QUERIES` queries of this forward
        put on the context's tokens, resident or retrieved, averaged over KV heads: what the answer attended to.
        The sinks are left out (attention parks its spare mass there whatever the question)."""
        m = self.memory
        n_heads, _, head_dim = q_rot.shape
        n_kv, end, t = asm.k.shape[0], start + n_new, min(n_new, RECORD_QUERIES)
        group = n_heads // n_kv
        if n_new == 1 and m.c_ops:  # a decode step's query sees every valid column
            mass = cpu_attention.attention_mass(q_rot.float().contiguous(), asm.k, end, self._mass_scratch(group * end),
                                                valid=asm.valid)
            return self._per_block(mass, asm, end, n_kv * group * t)
        if n_new == 1:
            return self._per_block(_step_mass(q_rot[None], [asm], end)[0], asm, end, n_kv * group)
        qg = q_rot[:, n_new - t :].reshape(n_kv, group * t, head_dim) * head_dim**-0.5  # heads h*group.. share KV head h
        logits = (qg @ asm.k[:, :end].to(qg.dtype).transpose(1, 2)).float()  # (n_kv, group * t, end)
        mask = asm.mask(start, n_new)
        if mask is not None:  # in place, the mask broadcast over each KV head's group of query heads
            rows = mask[..., n_new - t :, :]
            logits.view(n_kv, group, t, end).masked_fill_(~(rows[:, None] if rows.dim() == 3 else rows), float("-inf"))
        mass = torch.softmax(logits, dim=-1, out=logits).sum(dim=1)  # (n_kv, end)
        return self._per_block(mass, asm, end, n_kv * group * t)

    def _mass_scratch(self, n: int) -> torch.Tensor:
        return self.memory.scratch(1, n, 1, torch.float32, "mass").view(-1)

    def _per_block(self, mass: torch.Tensor, asm: Assembly, end: int, n_rows: int) -> torch.Tensor:
        """`_attended`'s per-block mass from the per-column mass (n_kv, end) of `n_rows` query rows."""
        return _mass_per_block(mass, asm.idx[:, :end], self.memory, n_rows)

    def _observe(self, q: torch.Tensor, asm: Assembly, n_keys: int) -> torch.Tensor:
        """Attention mass (n_kv, n_keys) that every `observe_stride`th of the last `n_observe` queries puts on
        each assembled key; for a decode step, of the last `evict_every` (the steps since the last decode step's
        eviction): each query is observed once, as a prefill chunk observes its own queries, and the scores keep
        their maximum anyway. Observing the whole window again at every 64th step cost a quarter of the steps'
        time at 4096 tokens (0.47 s for 128 queries x 30 layers, against 1.4 s for the 64 steps)."""
        m = self.memory
        q_obs = self._observed_queries(q)  # (n_heads, n_obs, d) pre-RoPE
        if not m.c_ops:
            return _observed_mass(m, q_obs[None], [asm], n_keys, q.shape[1])[0]
        # from the float16 context in C, no widened copy (cpu_attention.attention_mass)
        c, n_heads, n_obs = m.config, q_obs.shape[0], q_obs.shape[1]
        back = torch.arange(0, n_obs, c.observe_stride, device=m.device).flip(0)  # counted back from the newest
        q_rot = _rotated_observers(m, q_obs[None], [asm], back, q.shape[1])[0]
        end_idx = m.n_tokens + q.shape[1]
        scratch = self._mass_scratch(n_heads // asm.k.shape[0] * len(back) * n_keys)
        return cpu_attention.attention_mass(q_rot.contiguous(), asm.k, n_keys, scratch, valid=asm.valid,
                                            idx=asm.idx, q_idx=end_idx - 1 - back)

    def _observed_queries(self, q: torch.Tensor) -> torch.Tensor:
        """The queries an eviction observes, pre-RoPE (n_heads, n_obs, d), oldest first: the last `n_observe` with
        those of the forward `q`, for a decode step the last `evict_every` (see `_observe`)."""
        c = self.memory.config
        window = c.n_observe if q.shape[1] > 1 else min(c.n_observe, c.evict_every)
        return torch.cat((self.q_recent[:, -window:], q), dim=1)[:, -window:]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.memory
        n_heads, n_new = q.shape[0], q.shape[1]
        asm = self._assemble(self._retrieve(q), decoding=n_new == 1)
        start = asm.length
        k, v = m.as_stored(k), m.as_stored(v)  # as the tiers will hold them
        qk = m.rope.rotate(torch.cat((q, k)), *self._tables(asm, n_new))
        chunk_idx = torch.arange(m.n_tokens, m.n_tokens + n_new, device=m.device)
        asm.write(start, m.as_stored(qk[n_heads:]), v, chunk_idx)  # scratch past the committed length
        end = start + n_new
        if n_new == 1 and kernels.available(m.device):  # Triton flash-decoding on the GPU; CPU keeps SDPA
            valid = None if asm.valid is None else asm.valid[:, :end]
            out = kernels.decode(qk[:n_heads], asm.k[:, :end], asm.v[:, :end], valid=valid)
        else:
            k_all, v_all = asm.k[:, :end], asm.v[:, :end]
            if k_all.dtype != m.dtype:  # a float16 context (for the fused step), widened for PyTorch's attention
                k_all, v_all = k_all.to(m.dtype), v_all.to(m.dtype)
            out = chunk_attention(qk[:n_heads], k_all, v_all, start, asm.valid)
        if self._record_now:
            self._record_now = False
            m.record.add(self._attended(qk[:n_heads], asm, start, n_new))
        self._plan_commit(q, k, v, asm, start)
        return out

    def _tables(self, asm: Assembly, n_new: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for `n_new` positions from `asm`'s next one + `offset`: a slice where the host knows it, a
        gather by the device's count where it does not (a context built from a retrieval on the device)."""
        m, start = self.memory, asm.next_position
        if not isinstance(start, torch.Tensor):
            return m.rope.range_tables(start + offset, n_new, m.dtype)
        positions = torch.arange(offset, offset + n_new, device=m.device) + start
        return m.rope.tables(positions, m.dtype, n_positions=asm.position_bound(n_new))

    def decode_slot(self) -> DecodeSlot | None:
        """Where a one-token step may attend outside PyTorch (edgectx.quant.ggml_decode): the assembled context
        as the last step left it, on the CPU in float32. None on a retrieval step, when the context must be
        rebuilt (after an eviction), or before the first chunk: those go through `attend`."""
        m, asm = self.memory, self.asm
        if asm is None or asm.key[0] != self.version or not m.fusable:
            return None
        if self._retrieval_due:
            return None
        if asm.length >= asm.capacity:
            asm.reserve(asm.length + 1 + asm.capacity // 2)  # as `write` grows it
        cos, sin = m.rope.signed_tables(asm.next_pos + 1)
        row = asm.next_pos * cos.stride(0) * cos.element_size()  # the position's row of each table
        mask = asm.head_mask(m.spec.n_heads)
        writes, rows = None, ()
        if m.write_dtypes:
            r_at, r_rows = self.resident.next_column()
            s_at, s_rows = self.store.next_column()
            if m.scorer.observes:
                q_at, q_rows = self.recent.next_column()
                writes, rows = (r_at, s_at, q_at), (r_rows, s_rows, q_rows)
            else:
                writes, rows = (r_at, s_at), (r_rows, s_rows)
        # One layout tuple while the buffers stay (each part the same object): the step re-points nothing then
        last = self._layout
        if last is None or last[0] is not asm.k or last[1] is not asm.v or last[2] is not mask or last[3] != rows:
            layout = (asm.k.data_ptr(), asm.v.data_ptr(), asm.capacity,
                      None if mask is None else (mask.data_ptr(), mask.shape[1]), rows, cos.stride(0) * cos.element_size())
            self._layout = last = (asm.k, asm.v, mask, rows, layout)
        self._slotted = (asm, asm.length)
        return DecodeSlot(asm.k, asm.v, asm.length, cos.data_ptr() + row, sin.data_ptr() + row,
                          m.kv_dtype == torch.float16, mask, last[4], writes, m.write_dtypes if writes else ())

    def decoded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor,
                written: bool = False) -> None:
        """The step `decode_slot` planned ran: its key and value are in the context's new column; plan the
        commit as `attend` does. q (n_heads, 1, d), k and v (n_kv, 1, d) pre-RoPE, k and v as stored; qkv: the
        three as one row (what the projection emitted, the heads scorer's input). `written`: the step also wrote
        them where the slot's `writes` said (the commit then only counts them)."""
        m, asm = self.memory, self.asm
        asm.index_column(m.n_tokens)
        self._plan_commit(q, k, v, asm, asm.length, features=qkv)
        self._pending.written = written

    def evicts(self, n_new: int) -> bool:
        """Whether a forward of `n_new` tokens evicts at its commit: a chunk whenever the resident tier outgrows its
        limit, a decode step every `evict_every`th (when the tier reaches its limit + `evict_every` tokens), so that
        with `retrieve_every` dividing `evict_every` the retrieval an eviction does (`commit`) is one that was due."""
        c = self.memory.config
        return self.resident.n + n_new > self._limit + (c.evict_every - 1 if n_new == 1 else 0)

    @property
    def _limit(self) -> int:
        """The resident tokens a layer holds after an eviction (before any: the budget), decode's overflow aside."""
        c = self.memory.config
        return c.resident_tokens if self.evicted else c.budget_tokens

    @property
    def _retrieval_due(self) -> bool:
        """Whether the next decode step retrieves (every `retrieve_every`th, once anything is evicted)."""
        c = self.memory.config
        return self.evicted and c.top_k_blocks > 0 and self.steps_since_retrieval >= c.retrieve_every

    def _plan_commit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, asm: Assembly, start: int,
                     features: torch.Tensor | None = None, observed: torch.Tensor | None = None) -> None:
        """What `commit` will do after a forward whose `n_new` tokens sit at columns [start, start + n_new).
        `observed`: what an evicting forward's observation gave (`_observe`), computed already with every layer's
        (ContextMemory.observe_together)."""
        m = self.memory
        n_new = q.shape[1]
        evict = self.evicts(n_new)
        if not evict or not m.scorer.observes:
            observed = None
        elif observed is None:
            observed = self._observe(q, asm, start + n_new)
        if n_new == 1 and m.scorer.scores_steps_together:  # every layer's at once, in ContextMemory.commit
            features = m.scorer.step_features(q, k, v) if features is None else features[None]
            self._pending = _Pending(k, v, q, None, observed, evict, features=features)
        else:
            self._pending = _Pending(k, v, q, m.scorer.new_token_scores(self.layer, q, k, v, m.n_tokens), observed, evict)

    # -- commit -------------------------------------------------------------------------------------

    def commit(self) -> None:
        p, self._pending = self._pending, None
        m, c = self.memory, self.memory.config
        asm, r = self.asm, self.resident
        n_new = p.k.shape[1]
        if p.written:
            self.store.advance()
        else:
            self.store.append(p.k, p.v)
        scores = p.scores
        if p.observed is not None:
            observed_resident = asm.resident_columns(p.observed[:, : asm.length])
            r.score[:, : r.n] = m.scorer.update(r.score[:, : r.n], observed_resident)
            scores = m.scorer.update(scores, p.observed[:, asm.length :])
        if p.written:  # K, V and Q are in place: the fused step wrote them (decode_slot's `writes`)
            r.advance(m.n_tokens, None if m.scorer.zero_steps and p.observed is None else scores)
            if m.scorer.observes:
                self.recent.advance(1)
        else:
            idx = torch.arange(m.n_tokens, m.n_tokens + n_new, device=m.device).expand(r.n_kv, -1)
            r.append(p.k, p.v, idx, scores)
            if m.scorer.observes:
                self.recent.append(p.q)
        if n_new == 1:
            self.steps_since_retrieval += 1
        self._last_q = p.q if n_new == 1 else None  # what `prepare_next` retrieves with
        if p.evict:
            self._evict(m.n_tokens + n_new)
            if n_new == 1:  # the context is rebuilt anyway: retrieve for it now, and count the next retrieval from here
                self.steps_since_retrieval = c.retrieve_every
        else:
            asm.advance(n_new)
            if n_new > 1:  # room for the decode steps that may follow a chunk: no growth (a copy) in the first of them
                r.reserve(r.n + c.evict_every + 1)
                asm.reserve(asm.length + c.evict_every + 1)

    def next_query(self) -> torch.Tensor | None:
        """After a decode step's commit (ContextMemory.commit, once the token count is updated): the step's query
        (n_heads, 1, d) pre-RoPE if the next step would retrieve or rebuild its context, which `prepare_next` then
        does now (see the module's "Ahead of time"); else None. Asked once a step."""
        q, self._last_q = self._last_q, None
        self._built_together = False
        if q is None or self.asm is None:
            return None
        if not self._retrieval_due and self.asm.key[0] == self.version:
            return None
        return q

    def prepare_next(self, q: torch.Tensor, blocks: torch.Tensor | None = None) -> bool:
        """Retrieve with `next_query`'s `q` (`blocks`: selected for it already) and rebuild the context for the next
        step. True where this retrieved: what `q` attends to in the new context is then to be recorded, as `attend`
        records it (`record_query`, or ContextMemory._record_together for every layer at once)."""
        self._assemble(self._retrieve(q, blocks), decoding=True)
        record, self._record_now = self._record_now, False
        return record

    def record_query(self, q: torch.Tensor) -> None:
        """Record what the last decode step's query `q` attends to in the context `prepare_next` built: the query as
        its newest token (its last resident column, the last position)."""
        m, asm = self.memory, self.asm
        q_rot = m.rope.rotate(q, *self._tables(asm, 1, offset=-1))
        m.record.add(self._attended(q_rot, asm, asm.length - 1, 1))

    def ready(self) -> None:
        """The next forward is a decode step (a prefill ended): rebuild now the context that the last chunk's eviction
        left stale, as that step's `attend` would (the same blocks: it retrieves none), so that it runs fused."""
        if self.asm is None or self.asm.key[0] == self.version or self._retrieval_due:
            return  # (a step that retrieves rebuilds for what it retrieves)
        retrieving = self.evicted and self.memory.config.top_k_blocks > 0
        if retrieving and self._selection is None:  # the last retrieval's ids, still on the device: built there
            self._assemble(self._selection_d, decoding=True)
            return
        self._assemble(self.selection if retrieving else self.selection[:, :0], decoding=True)

    def steady_steps(self) -> int:
        """How many of the next decode steps may run as the last one did with every pointer one column on
        (GgmlDecoder.again; after a fused step's commit): none of them grows a buffer, starts or completes a host
        block, evicts, or leaves a retrieval due after it, and the context's and the resident tier's next columns
        hold their indices already. 0: the next step is planned (`decode_slot`)."""
        m, c, asm, r = self.memory, self.memory.config, self.asm, self.resident
        offset = self.store.n_tokens % c.block_size
        # the context the last slot pointed at, its next column (not rebuilt since); offset 0: a new block (segment)
        if self._slotted is None or self._slotted[0] is not asm or self._slotted[1] + 1 != asm.length or offset == 0 \
                or asm.key[0] != self.version:
            return 0
        n = min(asm.capacity - asm.length, r.room(), c.block_size - 1 - offset, self._limit + c.evict_every - 1 - r.n,
                m.rope.n_positions - asm.next_pos, asm.index_column(m.n_tokens), r.indexed_ahead(m.n_tokens))
        if m.scorer.observes:
            n = min(n, self.recent.room())
        if self.evicted and c.top_k_blocks:
            n = min(n, c.retrieve_every - 1 - self.steps_since_retrieval)
        return max(n, 0)

    def counted(self) -> None:
        """A steady step (ContextMemory.steady_key) ran: the fused step wrote the context's column, K and V and Q where
        the last step's slot said, one column on, and nothing is due: count it. Plain counts, as `steady_steps`
        measured: no host block completes (no representative is due), the resident tier's next index and zero score
        are written ahead, no buffer grows."""
        self.store.n_tokens += 1
        self.resident.n += 1
        if self.memory.scorer.observes:
            self.recent.advance(1)
        self.steps_since_retrieval += 1
        self.asm.advance(1)

    def _evict(self, n_total: int) -> None:
        """Keep sinks, the window and the top `n_retain` older tokens per KV head; the rest live on in the host store."""
        c, r = self.memory.config, self.resident
        idx = r.idx[:, : r.n]
        protected = (idx < c.n_sink) | (idx >= n_total - c.n_local)
        # Every sink and every window token is resident in every head (the window is always the newest tokens),
        # so the host counts them without reading the device.
        n_sinks = min(c.n_sink, n_total)
        n_keep = n_sinks + max(0, n_total - max(n_sinks, n_total - c.n_local)) + c.n_retain
        if r.n > n_keep:
            ranked = torch.where(protected, torch.inf, r.score[:, : r.n])
            keep = torch.topk(ranked, n_keep, dim=1).indices.sort(dim=1).values  # (n_kv, n_keep) in original order
            r.keep(keep, headroom=max(c.chunk_tokens, c.evict_every) + 1)
            self.evicted = True
        self.version += 1

    def truncate(self, n_tokens: int) -> None:
        c, r = self.memory.config, self.resident
        self._pending = None
        self.store.truncate(n_tokens)
        self.cache.clear()
        self.q_recent = self.q_recent[:, :0]
        self.selection, self.asm = self.selection[:, :0], None
        self.version += 1
        counts = (r.idx[:, : r.n] < n_tokens).sum(dim=1)
        if bool((counts == counts[0]).all()):
            r.truncate(int(counts[0]))  # the same prefix of every head: a plain cut, exact
            return
        # The cut falls among per-head retained tokens: rebuild sinks and window from the host store and keep
        # each head's best surviving retained tokens (as many as every head has).
        window_start = max(min(c.n_sink, n_tokens), n_tokens - c.n_local)
        idx = r.idx[:, : r.n]
        middle = (idx >= c.n_sink) & (idx < window_start)
        n_mid = int(middle.sum(dim=1).min())
        keep = torch.topk(torch.where(middle, r.score[:, : r.n], -torch.inf), n_mid, dim=1).indices.sort(dim=1).values
        retained = r.gather(keep)
        sink_k, sink_v = self.store.tokens(0, min(c.n_sink, n_tokens))
        win_k, win_v = self.store.tokens(window_start, n_tokens)
        r.rebuild([(sink_k, sink_v, 0), retained, (win_k, win_v, window_start)], headroom=c.chunk_tokens + 1)


RETRIEVE_AHEAD = os.environ.get("EDGECTX_RETRIEVE_AHEAD", "1") != "0"
# Working memory of the layers' contexts built together (ContextMemory._build_together), a group of layers at a time:
# about 18 MB a layer for an 8B model (8 KV heads x ~2,100 columns, whatever the context's length), 3 groups of 14
TOGETHER_BYTES = 256 << 20


class ContextMemory:
    """The KVMemory of a long conversation: one LayerMemory per layer, plus the retrieval record."""

    def __init__(self, spec: ModelSpec, rope: Rope, device: torch.device, dtype: torch.dtype,
                 config: MemoryConfig | None = None, scorer: EvictionScorer | None = None,
                 kv_dtype: torch.dtype | None = None, device_bookkeeping: bool | None = None,
                 context_dtype: torch.dtype | None = None):
        self.spec, self.rope, self.device, self.dtype = spec, rope, device, dtype
        self.kv_dtype = kv_dtype or dtype  # the device tiers' K and V; `dtype` is what the model computes in
        # The assembled context's: the compute dtype, or float16 where the fused CPU step attends it so
        # (Engine.context_dtype: the model's GgmlDecoder reads_half), half the bytes every decode step reads
        self.context_dtype = context_dtype or dtype
        if self.context_dtype != dtype and (device.type != "cpu" or self.context_dtype != self.kv_dtype):
            raise ValueError("a context in another dtype than the compute dtype must hold K and V as stored, on a CPU")
        # Over a float16 context, C does what PyTorch would do in float32 from a widened copy of it: rebuilds rotate
        # keys straight into it (cpu_attention.rotate_into: the same bits as Rope.rotate, rounded), and the eviction's
        # observation and a decode retrieval's record take their attention mass from it (attention_mass)
        self.c_ops = self.context_dtype == torch.float16 and dtype == torch.float32 and rope.rope_dim == spec.head_dim \
            and spec.head_dim % 16 == 0 and cpu_attention.ops() is not None
        self.config = config or MemoryConfig()
        self.scorer = scorer or AttentionMassScorer()
        self.record = RetrievalRecord(self.config.block_size)
        # On CUDA, block copies from the pinned host store run on their own stream, beside the compute.
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Decided once per device (issue 21): on CUDA the step's bookkeeping stays on the device and the host
        # reads nothing but a retrieval's block ids; on the CPU, where reading is free, the plain path does
        # less work. Tests turn it on for a CPU memory to count the syncs the CUDA path would make.
        self.device_bookkeeping = device.type == "cuda" if device_bookkeeping is None else device_bookkeeping
        # The layers' retrievals ahead of a decode step done together where they can be (`_prepare_next`): on the
        # device path, where every operation is a launch the host pays for. Each layer gets what it alone would.
        self.together = self.device_bookkeeping
        # Whether a one-token step may run as one ggml graph (LayerMemory.decode_slot): a float32 model on the CPU
        # with K and V in 16 or 32 bits and RoPE over whole heads
        self.fusable = device.type == "cpu" and dtype == torch.float32 and self.kv_dtype in (torch.float32, torch.float16) \
            and rope.rope_dim == spec.head_dim
        # Blocks' worth of (block, KV head) pairs per layer: one retrieval may need top_k pairs for each KV head at
        # once, top_k blocks' worth, which every layer's pool must hold. (The floor was top_k x n_kv blocks while a
        # slot held a block for every KV head: 6 GiB of cache for Phi-3-mini's 32 KV heads at 128K, whatever "auto"
        # chose.)
        self.cache_blocks = max(cache_capacity_blocks(self.config, spec, device, self.kv_dtype), self.config.top_k_blocks)
        self._n_tokens = 0
        self._pending = 0
        self._steps = 0  # forwards committed (one a step), what `steady_key` names a step by
        self._steady = 0  # the next decode steps that may run as the last one did, one column on (`steady_key`)
        self._steady_now = False  # the forward under way is one of them
        self.token_index = TokenIndex(self.config.block_size)  # every token's id, for lexical retrieval
        self.query_start = 0  # the lexical query: tokens from the last multi-token chunk's first on
        self._pending_ids: list[int] | None = None
        self._lexical: tuple[int, torch.Tensor] | None = None  # (n_eligible, blocks) of the forward under way
        self.layers = [LayerMemory(self, i) for i in range(spec.n_layers)]
        # What a fused step writes besides the context (DecodeSlot.writes), in these dtypes: the resident K and V, the
        # host store's, the recent queries (for a scorer that observes); () where the memory copies them itself
        store = self.layers[0].store
        self.write_dtypes = (self.kv_dtype, store.host_dtype) + \
            ((self.kv_dtype,) if self.scorer.observes else ()) if store.host_dtype in _GRAPH_WRITES and not store.staged else ()
        self._scratch: dict[str, torch.Tensor] = {}  # see `scratch`
        self.graph_scalars: torch.Tensor | None = None  # (n_layers, graph_step.ROW) a captured decode step's inputs
        self.stage_offsets: torch.Tensor | None = None  # HostBlockStore.stage_offsets, for the captured step

    def scratch(self, n_kv: int, n: int, head_dim: int, dtype: torch.dtype, name: str = "keys") -> torch.Tensor:
        """(n_kv, n, head_dim) of working memory named `name` that every layer's rebuild shares (one at a time),
        grown as needed; its contents are the last user's."""
        buf = self._scratch.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] != n_kv or buf.shape[1] < n or buf.shape[2] != head_dim:
            grown = n + REUSE_SLACK if buf is not None and buf.shape[1] < n else n  # as an outgrown context grows
            width = max(grown, 0 if buf is None else buf.shape[1])
            buf = self._scratch[name] = torch.empty(n_kv, width, head_dim, dtype=dtype, device=self.device)
        return buf[:, :n]

    def graph_step(self) -> GraphStep | None:
        """This one-token step as a CUDA graph may capture it, or None: it runs eagerly (edgectx.memory.graph_step)."""
        return memory_graph_step(self)

    def as_stored(self, t: torch.Tensor) -> torch.Tensor:
        """`t` rounded to `kv_dtype`, in the compute dtype. K and V are rounded as the tiers hold them before
        they enter the context, and rotated keys once more, as full attention's float16 cache holds them: a
        rebuilt (or restored) context has the same bits, and a context within the budget is exactly full
        attention's."""
        return t if self.kv_dtype == self.dtype else t.to(self.kv_dtype).to(self.dtype)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def step_key(self) -> tuple:
        """(this memory, its step count): what a fused decode step is recorded under (GgmlDecoder)."""
        return self, self._steps

    def steady_key(self) -> tuple | None:
        """The step key when the one-token step under way may run as the last fused one did with every pointer one
        column on (GgmlDecoder.again; the last commit measured how many may, LayerMemory.steady_steps), else None.
        Such a step skips the 30 layers' slots and records: `stepped_steady` says it ran so, `commit` counts it."""
        return (self, self._steps) if self._steady > 0 and self._pending == 1 else None

    def stepped_steady(self) -> None:
        self._steady_now = True

    def begin(self, n_new: int, token_ids: list[int] | None = None) -> None:
        """A forward of `n_new` tokens starts; `token_ids` (their ids) let retrieval match them lexically."""
        self._steady_now = False
        self._pending = n_new
        self._pending_ids = list(token_ids) if token_ids is not None else [UNKNOWN] * n_new
        self._lexical = None

    def lexical_query(self) -> torch.Tensor:
        """Token ids the forward under way retrieves for: a chunk's own, or for a decode step the last chunk
        (the question) and the answer so far; at most a chunk's worth, the newest."""
        new = torch.tensor(self._pending_ids or [], dtype=torch.int32)
        start = self._n_tokens if len(new) > 1 else self.query_start
        start = max(start, self._n_tokens + len(new) - self.config.chunk_tokens)
        return torch.cat((self.token_index.tokens(min(start, self._n_tokens), self._n_tokens), new))

    def lexical_blocks(self, n_eligible: int) -> torch.Tensor:
        """The blocks every layer and KV head retrieves for this forward (edgectx.memory.lexical), on the device,
        computed once per forward by the first layer that retrieves."""
        if self._lexical is None or self._lexical[0] != n_eligible:
            blocks = self.token_index.match(self.lexical_query(), n_eligible,
                                            min(self.config.lexical_blocks, self.config.top_k_blocks))
            self._lexical = (n_eligible, upload(blocks, self.device))  # once for every layer, without a host stall
        return self._lexical[1]

    def commit(self) -> None:
        steady, self._steady_now = self._steady_now, False
        decoding = self._pending == 1
        fused = False  # a one-token step that the fused graph ran and recorded itself (what may arm steady steps)
        if steady:
            for layer in self.layers:
                layer.counted()
        else:
            pending = [layer._pending for layer in self.layers]
            fused = self._pending == 1 and all(p is not None and p.written for p in pending)
            if pending[0] is not None and pending[0].features is not None:
                scores = self.scorer.step_scores(torch.cat([p.features for p in pending]))  # (n_layers, n_kv, 1)
                for p, s in zip(pending, scores):
                    p.scores = s
            for layer in self.layers:
                layer.commit()
        self.token_index.append(self._pending_ids if self._pending_ids is not None else [UNKNOWN] * self._pending)
        if self._pending > 1:
            self.query_start = self._n_tokens
        self._n_tokens += self._pending
        self._pending, self._pending_ids, self._lexical = 0, None, None
        self._steps += 1
        if steady:  # nothing is due after a steady step (steady_steps)
            self._steady -= 1
            return
        if RETRIEVE_AHEAD:
            self._prepare_next()
            self._lexical = None  # the next forward matches its own tokens
        if decoding:
            self._read_device_state()
        # After a fused step that recorded itself, the steps that may follow as it ran (a scorer that gives new tokens
        # zero scores: the resident tier writes them ahead)
        together = fused and self.scorer.zero_steps and not self.scorer.scores_steps_together
        self._steady = min(layer.steady_steps() for layer in self.layers) if together else 0

    def _prepare_next(self) -> None:
        """Every layer's retrieval and rebuild ahead of the next decode step (LayerMemory.prepare_next). On the device
        path (CUDA), where each operation is a launch that the host pays for (a retrieval step issued ~2,800 of them
        for 32 layers one layer at a time: docs/gpu-host-ops.md), what every layer does alike is done once for all of
        them (`together`): the block selection, the contexts' columns, positions and rotation, and the record of what
        the queries attend to."""
        due = [(layer, q) for layer in self.layers if (q := layer.next_query()) is not None]
        together = self.together and len(due) > 1
        selecting = [(layer, q) for layer, q in due if layer._selects(q)] if together else []
        recording, chosen = [], {}
        if len(selecting) > 1:
            layers = [layer for layer, _ in selecting]
            blocks = self._select_together(selecting)  # (L, n_kv, k)
            if self._build_together(layers, blocks):
                recording, due = selecting, [(layer, q) for layer, q in due if not layer._built_together]
            else:
                chosen = dict(zip(layers, blocks.unbind(0)))
        recording += [(layer, q) for layer, q in due if layer.prepare_next(q, chosen.get(layer))]
        if together:
            self._record_together(sorted(recording, key=lambda item: item[0].layer))
        else:
            for layer, q in recording:
                layer.record_query(q)

    def observe_together(self, queries: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """For a decode step whose every layer wrote its column (a captured step: edgectx.memory.graph_step), given
        each layer's query (n_heads, 1, d) pre-RoPE: what each layer that evicts at its commit observes
        (LayerMemory._observe), for all of them at once (`together`: one product a layer, the rest stacked); None
        for a layer that does not evict, or where the layers do not allow it (they then observe for themselves)."""
        out: list[torch.Tensor | None] = [None] * len(self.layers)
        evicting = [layer for layer in self.layers if layer.evicts(1)] if self.scorer.observes else []
        if not self.together or self.c_ops or len(evicting) < 2:
            return out
        asms = [layer.asm for layer in evicting]
        n_keys = asms[0].length + 1  # the step's own column included
        windows = {layer.q_recent.shape[1] for layer in evicting}
        if any(asm.length + 1 != n_keys for asm in asms) or len(windows) != 1:
            return out
        window = min(self.config.n_observe, self.config.evict_every)  # LayerMemory._observed_queries, stacked
        q_obs = torch.cat((torch.stack([layer.q_recent[:, -window:] for layer in evicting]),
                           torch.stack([queries[layer.layer] for layer in evicting])), dim=2)[:, :, -window:]
        for layer, observed in zip(evicting, _observed_mass(self, q_obs, asms, n_keys, 1).unbind(0)):
            out[layer.layer] = observed
        return out

    def _select_together(self, selecting: list[tuple[LayerMemory, torch.Tensor]]) -> torch.Tensor:
        """The blocks (L, n_kv, k) of each layer's query, each layer's own selection (select_blocks) made for all of
        them in one scoring: the layers see the same tokens, so the same eligible blocks and lexical matches."""
        n_eligible = selecting[0][0]._n_eligible()
        reps = torch.stack([layer.store.representatives[:n_eligible] for layer, _ in selecting])  # (L, blocks, n_kv, d)
        q = torch.stack([q for _, q in selecting])
        return select_blocks(q, reps, n_eligible, self.config.top_k_blocks, self.lexical_blocks(n_eligible))[0]

    def _build_together(self, layers: list[LayerMemory], blocks: torch.Tensor) -> bool:
        """Each layer's retrieval of `blocks` (L, n_kv, k) taken and its context built, as `_retrieve` and `_build`
        would on the device path (ids kept on the device, blocks gathered from the host store there), exactly, in
        each layer's own buffers: the columns, duplicates, positions and rotation computed for the layers stacked (a
        group at a time, `TOGETHER_BYTES` of working memory), then written a few operations a layer. False, with
        nothing done, where the layers are not on that path or differ (resident counts after a truncation): they
        then build one at a time."""
        c, first = self.config, layers[0]
        n_resident = first.resident.n
        if self.c_ops or blocks.shape[2] == 0 or any(not layer.gathers_on_device or layer.resident.n != n_resident
                                                     for layer in layers):
            return False
        n_kv, k = blocks.shape[1:]
        n_keys = n_resident + k * c.block_size
        head_dim = first.resident.head_dim
        # per layer: keys as stored, rotated in the compute dtype, their cos and sin tables and the index tensors
        per_layer = n_kv * n_keys * (head_dim * (torch.empty(0, dtype=self.kv_dtype).element_size()
                                                 + 3 * torch.empty(0, dtype=self.dtype).element_size()) + 4 * 8)
        group = max(1, min(len(layers), TOGETHER_BYTES // per_layer))
        for start in range(0, len(layers), group):
            self._build_group(layers[start : start + group], blocks[start : start + group], n_resident, n_keys)
        return True

    def _build_group(self, layers: list[LayerMemory], blocks: torch.Tensor, n_resident: int, n_keys: int) -> None:
        c, first = self.config, layers[0]
        n_layers, n_kv, _ = blocks.shape
        head_dim = first.resident.head_dim
        resident_idx = torch.stack([layer.resident.idx[:, :n_resident] for layer in layers])  # (L, n_kv, n_resident)
        bidx, duplicate = _columns(blocks, resident_idx, first.store.n_blocks, c.block_size)
        idx = torch.cat((resident_idx, bidx), dim=2)  # (L, n_kv, n_keys): each context's original indices
        if c.positions == "compact":  # as `_build`: a count on the device, its bound on the host
            positions, counts = _ranks_layers(idx, self.n_tokens)
            bound, next_pos = min(self.n_tokens, n_kv * n_keys), counts.unbind(0)
        else:
            positions, bound, next_pos = idx, self.n_tokens, [self.n_tokens] * n_layers
        valid = torch.cat((~duplicate, torch.ones_like(bidx, dtype=torch.bool)), dim=2)
        # working memory of this build only (on CUDA the caching allocator's; kept, it would sit beside the next prefill)
        keys = torch.empty(n_layers, n_kv, n_keys, head_dim, dtype=self.kv_dtype, device=self.device)
        headroom = max(c.chunk_tokens, c.evict_every) + 1
        asms, copies = [], ([], [], [], [], [], [])  # (destinations, sources) of the keys, values and indices
        for i, (layer, b) in enumerate(zip(layers, blocks.unbind(0))):
            layer._take_on_device(b)
            key = (layer.version, layer._key)
            asm = Assembly.empty(n_kv, n_keys, head_dim, headroom, self.context_dtype, self.device, reuse=layer.asm,
                                 ahead=layer._decode_room())
            kept, r = layer._kept(layer.asm, asm, key, n_resident), layer.resident
            for part, (dst, src) in enumerate(((keys[i, :, :n_resident], r.k[:, :n_resident]),
                                               (asm.v[:, kept:n_resident], r.v[:, kept:n_resident]),
                                               (asm.idx[:, kept:n_keys], idx[i, :, kept:]))):
                copies[2 * part].append(dst)
                copies[2 * part + 1].append(src)
            layer.store.gather(b, keys[i, :, n_resident:], asm.v[:, n_resident:n_keys])
            asms.append((layer, asm, key))
        for part in range(3):  # one dispatch each: on CUDA copied without a Python call a layer
            torch._foreach_copy_(copies[2 * part], copies[2 * part + 1])
        rotated = self.rope.rotate(keys, *self.rope.tables(positions, self.dtype, n_positions=bound))
        if self.kv_dtype != self.dtype:  # as stored (`_rotate_into`)
            rotated.copy_(rotated.to(self.kv_dtype))
        torch._foreach_copy_([asm.k[:, :n_keys] for _, asm, _ in asms], list(rotated.unbind(0)))
        for (layer, asm, key), v, pos in zip(asms, valid.unbind(0), next_pos):
            asm.finish(n_keys, v, pos, key, n_resident, always_valid=True, bound=bound)
            layer.asm, layer._built_together, layer._record_now = asm, True, False  # recorded by the caller

    def _record_together(self, recording: list[tuple[LayerMemory, torch.Tensor]]) -> None:
        """LayerMemory.record_query for every layer at once: one product a layer with its context's keys, the rest
        (rotation, softmax, the sums per block) stacked. Layers whose contexts differ in length (after a truncation)
        or that attend in C record one at a time."""
        asms = [layer.asm for layer, _ in recording]
        end = asms[0].length if asms else 0
        if len(recording) < 2 or self.c_ops or any(a.length != end for a in asms):
            for layer, q in recording:
                layer.record_query(q)
            return
        bound = max(a.position_bound(1) for a in asms)
        cos, sin = self.rope.tables(_next_positions(self, asms).sub(1).view(-1, 1), self.dtype, n_positions=bound)
        q_rot = self.rope.rotate(torch.stack([q for _, q in recording]), cos[:, None], sin[:, None])
        mass = _step_mass(q_rot, asms, end)  # (L, n_kv, end)
        idx = torch.stack([a.idx[:, :end] for a in asms])
        self.record.add(_mass_per_block(mass, idx, self, q_rot.shape[1]))

    def ready(self) -> None:
        """A prefill ended (Engine.prefill): every layer's context ready for the first decode step
        (LayerMemory.ready). What the chunks' retrievals left on the device (block ids, compact position counts),
        decode steps need on the host: all layers' are read here in one go, the prefill's one wait for the device."""
        for layer in self.layers:
            layer.ready()
        self._read_device_state()

    def _read_device_state(self) -> None:
        """Read every layer's block ids and position count that retrievals on the device left there, in one go (one
        wait for the device): at a prefill's end (`ready`) and after a decode step that retrieved (`commit`), so
        that decode steps, their CUDA graphs' inputs and snapshots find them on the host."""
        parts, unread = [], []
        for layer in self.layers:
            if layer._selection is None:
                parts.append(layer._selection_d.flatten())
                unread.append((layer, "ids", layer._selection_d.numel()))
            if layer.asm is not None and isinstance(layer.asm.next_position, torch.Tensor):
                parts.append(layer.asm.next_position.view(1))
                unread.append((layer, "pos", 1))
        if parts:
            values, at = torch.cat(parts).tolist(), 0
            for layer, what, n in unread:
                if what == "ids":
                    layer._resolve(values[at : at + n])
                else:
                    layer.asm.next_pos = values[at]
                at += n

    def release(self) -> None:
        """Give back host and device buffers now (the conversation is reset): the block store's (pinned) segments,
        the block pools and their pinned staging. The memory is empty afterwards and not to be used again."""
        self._steady = 0
        for layer in self.layers:
            layer.cache.synchronize()
            layer.cache.slots = layer.cache._pinned = None
            layer.cache.where.clear()
            layer.store.release()
            layer.asm = None

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from `n_tokens` on (a regenerated or edited turn)."""
        if n_tokens >= self._n_tokens:
            return
        self._steady, self._steps = 0, self._steps + 1
        for layer in self.layers:
            layer.truncate(n_tokens)
        self.token_index.truncate(n_tokens)
        self.query_start = min(self.query_start, n_tokens)
        self._n_tokens = n_tokens

    def stats(self) -> dict:
        c, n = self.config, self._n_tokens
        first = self.layers[0].resident
        idx = first.idx[0, : first.n]
        window = int((idx >= max(min(c.n_sink, n), n - c.n_local)).sum())
        sinks = min(c.n_sink, n)
        resident_bytes = sum(l.resident.device_bytes for l in self.layers)
        cache_bytes = sum(l.cache.device_bytes for l in self.layers)
        work_bytes = sum(l.asm.device_bytes for l in self.layers if l.asm is not None)
        repr_bytes = sum(l.store.repr_bytes for l in self.layers)
        retained = first.n - sinks - window
        token_bytes = self.spec.kv_bytes_per_token(first.k.element_size())  # K and V, all layers
        return {
            "tokens": n,
            "budget_tokens": c.budget_tokens,
            "scorer": self.scorer.name,
            "sink_tokens": sinks,
            "window_tokens": window,
            "retained_tokens": retained,
            "sink_bytes": sinks * token_bytes,
            "window_bytes": window * token_bytes,
            "retained_bytes": retained * token_bytes,
            "cached_blocks": len(self.layers[0].cache.blocks(self.spec.n_kv_heads)),
            "cache_capacity_blocks": self.cache_blocks,  # per layer; "auto" sizes it from free device memory
            "evicted_tokens": n - first.n,
            "host_tokens": self.layers[0].store.n_tokens,
            "device_resident_bytes": resident_bytes,
            "device_block_cache_bytes": cache_bytes,
            "device_work_bytes": work_bytes,
            "device_repr_bytes": repr_bytes,
            "device_kv_bytes": resident_bytes + cache_bytes + work_bytes + repr_bytes,
            "host_kv_bytes": sum(l.store.used_bytes for l in self.layers),
            "host_reserved_bytes": sum(l.store.host_bytes for l in self.layers),  # whole 4096-token segments
        }
