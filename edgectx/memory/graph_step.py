"""The long-context memory's steady decode step as a CUDA graph may capture it (edgectx.model.graph_step).

In a one-token step that neither retrieves nor rebuilds its context, `LayerMemory.attend` rotates the new query
and key at the context's next position, writes the key, value and token index at the context's next column, and
attends over the assembled context; its commit then copies the key and value into the resident tier and the host
store (the staging buffer of the block under way) and the query into the recent queries. Here the device part does
all of it, reading each layer's columns, position and token index from a (n_layers, ROW) tensor the memory keeps,
and attends over the assembled context's whole capacity with the Triton decode kernel, each head's length read
from that tensor too (the kernel loads no column past it, so the scratch columns may hold anything). `finish` then
plans the commit from the pre-RoPE q, k, v the captured layers recorded, as `attend` would have, marked written:
the commit only counts (its copies were 7 of the 8 operations a layer issued after the replay: 224 launches a
token on an 8B model, each a few microseconds of the host's time), and flushes a block the step completed.

A step that evicts at its commit (every `evict_every`th) is captured too: `finish` plans the eviction, observing
the attention mass of the recent queries and the step's own over the context the step wrote, as `attend` would.

Declined (None, the step runs eagerly): a chunk; a retrieval step (every `retrieve_every`th once evicted: it
reads block ids back); a step whose context must be rebuilt (the first after an eviction or a new retrieval,
unless the commit before retrieved ahead: `RETRIEVE_AHEAD`); a device
where the decode kernel cannot run (the masked torch path would read the scratch columns); a store that is not
staged (written on the host: the CPU's plain path).

The key names every buffer a layer writes or reads. A rebuild writes into the buffers of the context it replaces
(Assembly's `reuse`) whenever they are big enough and not much bigger, which the budget makes the rule once evicted,
and with the bookkeeping on the device a validity buffer is always there (all true where nothing is masked); an
eviction refills the resident tier's buffers in place (Resident.rebuild), the staging buffers and the recent
queries' never move: the key stays, and the steps after a rebuild or an eviction replay the graph already captured.

    step = memory.graph_step()   # after memory.begin(1); None: eager
"""

from __future__ import annotations

import torch

from edgectx import kernels
from edgectx.memory import together
from edgectx.model.graph_step import GraphStep, tensor_key

COLUMN, POSITION, TOKEN, RESIDENT, STAGE, RECENT = range(6)  # a layer's row of the step's inputs: the context's
# column, the rotary position, the token's index, the resident tier's column, the staging row, the recent queries'
ROW = 6


class _MemoryGraphLayer:
    """A steady `LayerMemory.attend` reading its columns, position and token index from `row` (ROW,), which also
    writes what the step's commit would copy: K and V into the resident tier and the host store's staging buffer,
    the query into the recent queries (a scorer that observes). The commit then only counts them (`written`)."""

    def __init__(self, layer, cos: torch.Tensor, sin: torch.Tensor, row: torch.Tensor, stage_offsets: torch.Tensor,
                 outputs: list):
        m, asm = layer.memory, layer.asm
        self.k, self.v, self.idx, self.valid = asm.k, asm.v, asm.idx, asm.valid_buffer
        self.r_k, self.r_v = layer.resident.k, layer.resident.v
        self.stage, self.stage_offsets = layer.store.stage_rows, stage_offsets
        self.recent = layer.recent.buffer if m.scorer.observes else None
        self.cos, self.sin, self.row, self.rope, self.kv_dtype = cos, sin, row, m.rope, m.kv_dtype
        self.outputs, self.index = outputs, layer.layer

    def key(self) -> tuple:
        return tuple(tensor_key(t) for t in (self.k, self.v, self.idx, self.valid, self.r_k, self.r_v, self.stage,
                                             self.recent))

    def _as_stored(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.kv_dtype == t.dtype else t.to(self.kv_dtype).to(t.dtype)  # ContextMemory.as_stored

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_heads, n_kv = q.shape[0], k.shape[0]
        row = self.row
        column, position, token = row[COLUMN : COLUMN + 1], row[POSITION : POSITION + 1], row[TOKEN : TOKEN + 1]
        k, v = self._as_stored(k), self._as_stored(v)  # as the tiers will hold them
        qk = self.rope.rotate(torch.cat((q, k)), self.cos.index_select(0, position), self.sin.index_select(0, position))
        self.k.index_copy_(1, column, self._as_stored(qk[n_heads:]))
        self.v.index_copy_(1, column, v)
        self.idx.index_copy_(1, column, token.expand(n_kv, 1))
        lengths = (column + 1).to(torch.int32).repeat(n_kv)  # (n_kv,) contiguous: the kernel reads lengths[kv]
        out = kernels.decode(qk[:n_heads], self.k, self.v, valid=self.valid, lengths=lengths)
        # the commit's copies: pre-RoPE K and V as stored, the pre-RoPE query
        resident = self.row[RESIDENT : RESIDENT + 1]
        self.r_k.index_copy_(1, resident, k.to(self.r_k.dtype))
        self.r_v.index_copy_(1, resident, v.to(self.r_v.dtype))
        rows = self.stage_offsets + self.row[STAGE]
        self.stage.index_copy_(0, rows, torch.cat((k, v)).view(2 * n_kv, -1).to(self.stage.dtype))
        if self.recent is not None:
            self.recent.index_copy_(1, self.row[RECENT : RECENT + 1], q.to(self.recent.dtype))
        self.outputs[self.index] = (q, k, v)  # what `_plan_commit` takes
        return out


def steady(layer) -> bool:
    """Whether this layer's one-token step may be captured: `attend` would neither retrieve nor rebuild the context
    (the conditions `_retrieve` and `_assemble` test). A step that evicts at its commit is one: its plan observes
    the attention mass of the recent queries and its own, after the replay (`finish`), from what the step wrote."""
    c, asm = layer.memory.config, layer.asm
    if asm is None or layer._record_now:
        return False
    if layer._retrieval_due:
        return False
    retrieving = layer.evicted and c.top_k_blocks > 0
    return asm.key == (layer.version, layer._key if retrieving else ())


def memory_graph_step(memory) -> GraphStep | None:
    """The graph step of a ContextMemory after `begin(1)`, or None where this step must run eagerly."""
    m = memory
    if m._pending != 1 or not kernels.available(m.device) or not all(steady(layer) for layer in m.layers):
        return None
    if not all(layer.store.staged for layer in m.layers):
        return None  # the host store is written where the step can write it only on the device path
    rows = []
    for layer in m.layers:  # buffers grown first, as the eager step would (a new key, a new capture)
        asm = layer.asm
        if asm.length >= asm.capacity:
            asm.reserve(asm.length + 1 + asm.capacity // 2)  # as `write` would grow it
        row = [0] * ROW
        row[COLUMN], row[POSITION], row[TOKEN] = asm.length, asm.next_pos, m.n_tokens
        row[RESIDENT], row[STAGE] = layer.resident.next_index(), layer.store.stage_row()
        row[RECENT] = layer.recent.next_index() if m.scorer.observes else 0
        rows.append(row)
    cos, sin = m.rope.signed_tables(max(r[POSITION] for r in rows) + 1, m.dtype)
    if m.graph_scalars is None:
        m.graph_scalars = torch.zeros(len(m.layers), ROW, dtype=torch.long, device=m.device)
    if m.stage_offsets is None:
        m.stage_offsets = m.layers[0].store.stage_offsets()  # every layer's staging buffers have one shape
    outputs: list = [None] * len(m.layers)
    layers = [_MemoryGraphLayer(layer, cos, sin, m.graph_scalars[i], m.stage_offsets, outputs)
              for i, layer in enumerate(m.layers)]
    key = ("memory", m.dtype, m.kv_dtype, tensor_key(cos), tensor_key(sin), tensor_key(m.graph_scalars),
           tensor_key(m.stage_offsets), *(l.key() for l in layers))

    def finish(recorded: list) -> None:
        observed = together.observe(m, [q for q, _, _ in recorded])  # an evicting step's, every layer's at once
        for layer, (q, k, v), seen in zip(m.layers, recorded, observed):
            layer._plan_commit(q, k, v, layer.asm, layer.asm.length, observed=seen)
            layer._pending.written = True  # the step wrote what the commit would copy: it counts them

    return GraphStep(key, layers, m.graph_scalars, rows, finish, outputs)
