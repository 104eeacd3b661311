"""ContextMemory: a fixed device KV budget over an unbounded context (Locret eviction + InfLLM retrieval).

Per layer, the device holds the *resident* tokens, sorted by original index per KV head: the first
`n_sink` tokens, the newest `n_local` (the window) and the `n_retain` older tokens per KV head that the
eviction scorer ranks highest. Every token's pre-RoPE K and V also go to a host block store; once
anything has been evicted, each query chunk (or every `retrieve_every` decode steps) retrieves
`top_k_blocks` blocks (gathered from the host store straight into the context on a CPU and on the device path,
else copied through an LRU block cache): first, for every layer and KV head alike, the blocks that
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
from edgectx.memory import together
from edgectx.memory.columns import block_columns, kept_columns, ranks
from edgectx.memory.mass import mass_per_block, observed_mass, rotated_observers, step_mass
from edgectx.model.rope import Rope
from edgectx.memory.recent import RecentQueries
from edgectx.memory.scoring import AttentionMassScorer, EvictionScorer
from edgectx.model.spec import ModelSpec


# Host store dtypes a fused decode step writes itself (edgectx.quant.ggml_decode: float16 and float32 convert as
# PyTorch does, round to nearest even)
_GRAPH_WRITES = (torch.float16, torch.float32)
_RETRIEVALS = itertools.count()  # names a retrieval on the device until its ids are read (LayerMemory._retrieve)
RECORD_QUERIES = 64  # a chunk's newest queries whose attention the record keeps (the question, in a chat turn)


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
        self._built_together = False  # edgectx.memory.together built this step's context (read once)
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
        every layer's, edgectx.memory.together)."""
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
        """`block_columns` for this layer's resident columns [0, n_resident); blocks_d (n_kv, k) on the device."""
        return block_columns(blocks_d, self.resident.idx[:, :n_resident], self.store.n_blocks, self.memory.config.block_size)

    def _build_facts(self, blocks_d: torch.Tensor, n_resident: int) -> torch.Tensor:
        """(2,) on the device: whether any resident token duplicates a retrieved one, and the position the next
        token takes (compact: the distinct indices in the context; original: the token count)."""
        bidx, duplicate = self._columns(blocks_d, n_resident)
        if self.memory.config.positions == "compact":
            _, n_present = ranks(torch.cat((self.resident.idx[:, :n_resident], bidx), dim=1), self.memory.n_tokens)
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
            positions, next_pos = ranks(idx, m.n_tokens) if c.positions == "compact" else (idx, n_tokens)
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
            if not m.cache_blocks:  # no cache (a CPU's "auto"): the store is in the memory the context is in
                asm.idx[:, n_resident:n_keys], duplicate = self._columns(selection, n_resident)  # ids, on the CPU
                self.store.gather_ids(ids, n_kv, k[:, n_resident:], asm.v[:, n_resident:n_keys])
            else:
                pairs = [block * n_kv + i // selection.shape[1] for i, block in enumerate(ids)]  # row-major (n_kv, k)
                slots = self.cache.fetch(pairs, self.store)
                blocks_d, slots_d = upload(torch.tensor([ids, slots]).reshape(2, *selection.shape), m.device).unbind(0)
                # duplicate: resident copies of retrieved tokens
                asm.idx[:, n_resident:n_keys], duplicate = self._columns(blocks_d, n_resident)
                self.cache.ready()
                self.cache.kv_into(slots_d, k[:, n_resident:], asm.v[:, n_resident:n_keys])
        idx = asm.idx[:, :n_keys]
        # Compact positions: duplicates need no exclusion (a resident copy's index is its retrieved twin's).
        positions, n_present = ranks(idx, m.n_tokens) if c.positions == "compact" else (idx, None)
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
            return self._per_block(step_mass(q_rot[None], [asm], end)[0], asm, end, n_kv * group)
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
        return mass_per_block(mass, asm.idx[:, :end], self.memory, n_rows)

    def _observe(self, q: torch.Tensor, asm: Assembly, n_keys: int) -> torch.Tensor:
        """Attention mass (n_kv, n_keys) that every `observe_stride`th of the last `n_observe` queries puts on
        each assembled key; for a decode step, of the last `evict_every` (the steps since the last decode step's
        eviction): each query is observed once, as a prefill chunk observes its own queries, and the scores keep
        their maximum anyway. Observing the whole window again at every 64th step cost a quarter of the steps'
        time at 4096 tokens (0.47 s for 128 queries x 30 layers, against 1.4 s for the 64 steps)."""
        m = self.memory
        q_obs = self._observed_queries(q)  # (n_heads, n_obs, d) pre-RoPE
        if not m.c_ops:
            return observed_mass(m, q_obs[None], [asm], n_keys, q.shape[1])[0]
        # from the float16 context in C, no widened copy (cpu_attention.attention_mass)
        c, n_heads, n_obs = m.config, q_obs.shape[0], q_obs.shape[1]
        back = torch.arange(0, n_obs, c.observe_stride, device=m.device).flip(0)  # counted back from the newest
        q_rot = rotated_observers(m, q_obs[None], [asm], back, q.shape[1])[0]
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
        (edgectx.memory.together.observe)."""
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

    def commit(self, defer_eviction: bool = False) -> bool:
        """Carry out what the forward planned. `defer_eviction`: a decode step's eviction is left to the caller, which
        evicts for every layer at once (edgectx.memory.together.evict); True where one was left."""
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
        deferred = p.evict and n_new == 1 and defer_eviction
        if p.evict:
            if not deferred:
                self._evict(m.n_tokens + n_new)
            if n_new == 1:  # the context is rebuilt anyway: retrieve for it now, and count the next retrieval from here
                self.steps_since_retrieval = c.retrieve_every
        else:
            asm.advance(n_new)
            if n_new > 1:  # room for the decode steps that may follow a chunk: no growth (a copy) in the first of them
                r.reserve(r.n + c.evict_every + 1)
                asm.reserve(asm.length + c.evict_every + 1)
        return deferred

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
        records it (`record_query`, or edgectx.memory.together.record for every layer at once)."""
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
        n_keep = self._n_keep(n_total)
        if r.n > n_keep:
            keep = kept_columns(r.idx[:, : r.n], r.score[:, : r.n], n_total, n_keep, c)
            r.keep(keep, headroom=max(c.chunk_tokens, c.evict_every) + 1)
            self.evicted = True
        self.version += 1

    def _n_keep(self, n_total: int) -> int:
        """The resident tokens an eviction keeps with `n_total` tokens in memory. Every sink and every window token
        is resident in every head (the window is always the newest tokens), so the host counts them without reading
        the device."""
        c = self.memory.config
        n_sinks = min(c.n_sink, n_total)
        return n_sinks + max(0, n_total - max(n_sinks, n_total - c.n_local)) + c.n_retain

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
        # The layers' retrievals ahead of a decode step done together where they can be (edgectx.memory.together): on the
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
        # None at all (0) for "auto" on a CPU, whose host store is in the memory a context is built in: a retrieval
        # gathers its blocks from there directly (HostBlockStore.gather_ids)
        capacity = cache_capacity_blocks(self.config, spec, device, self.kv_dtype)
        self.cache_blocks = max(capacity, self.config.top_k_blocks) if capacity else 0
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
            defer = self.together and self._pending == 1  # a decode step's evictions, every layer's at once
            evicting = [layer for layer in self.layers if layer.commit(defer_eviction=defer)]
            if evicting:
                together.evict(self, evicting, self._n_tokens + 1)
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
        armed = fused and self.scorer.zero_steps and not self.scorer.scores_steps_together
        self._steady = min(layer.steady_steps() for layer in self.layers) if armed else 0

    def _prepare_next(self) -> None:
        """Every layer's retrieval and rebuild ahead of the next decode step (LayerMemory.prepare_next), together where
        they may be (edgectx.memory.together)."""
        due = [(layer, q) for layer in self.layers if (q := layer.next_query()) is not None]
        if self.together and len(due) > 1:
            together.prepare_next(self, due)
            return
        for layer, q in due:
            if layer.prepare_next(q):
                layer.record_query(q)

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
