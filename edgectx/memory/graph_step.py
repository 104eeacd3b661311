"""The long-context memory's steady decode step as a CUDA graph may capture it (edgectx.model.graph_step).

In a steady step (no retrieval, no rebuild, no eviction at commit) `LayerMemory.attend` rotates the new query
and key at the context's next position, writes the key, value and token index at the context's next column, and
attends over the assembled context; everything else it does is host bookkeeping (`_plan_commit`). Here the device
part reads the column, position and token index from a (n_layers, 3) tensor the memory keeps, and attends over
the assembled context's whole capacity with the Triton decode kernel, each head's length read from that tensor
too (the kernel loads no column past it, so the scratch columns may hold anything). `finish` then plans the commit
from the pre-RoPE q, k, v the captured layers recorded, as `attend` would have; `commit` runs eagerly as ever.

Declined (None, the step runs eagerly): a chunk; a retrieval step (every `retrieve_every`th once evicted: it
reads block ids back); a step whose context must be rebuilt (the first after an eviction or a new retrieval);
a step that evicts at commit (every `evict_every`th: its plan observes attention mass over the context); and a
device where the decode kernel cannot run (the masked torch path would read the scratch columns).

The key names each layer's assembled K, V, index and validity buffers. A rebuild writes into the buffers of the
context it replaces (Assembly's `reuse`) whenever they are big enough and not much bigger, which the budget makes the rule once
evicted, and with the bookkeeping on the device a validity buffer is always there (all true where nothing is
masked): the key stays, and the step after a rebuild replays the graph already captured.

    step = memory.graph_step()   # after memory.begin(1); None: eager
"""

from __future__ import annotations

import torch

from edgectx import kernels
from edgectx.model.graph_step import GraphStep, tensor_key


class _MemoryGraphLayer:
    """A steady `LayerMemory.attend` reading its column, position and token index from `row` (3,)."""

    def __init__(self, asm, cos: torch.Tensor, sin: torch.Tensor, row: torch.Tensor, rope, kv_dtype: torch.dtype,
                 outputs: list, index: int):
        self.k, self.v, self.idx, self.valid = asm.k, asm.v, asm.idx, asm.valid_buffer
        self.cos, self.sin, self.row, self.rope, self.kv_dtype = cos, sin, row, rope, kv_dtype
        self.outputs, self.index = outputs, index

    def _as_stored(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.kv_dtype == t.dtype else t.to(self.kv_dtype).to(t.dtype)  # ContextMemory.as_stored

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_heads, n_kv = q.shape[0], k.shape[0]
        column, position, token = self.row[0:1], self.row[1:2], self.row[2:3]
        k, v = self._as_stored(k), self._as_stored(v)  # as the tiers will hold them
        qk = self.rope.rotate(torch.cat((q, k)), self.cos.index_select(0, position), self.sin.index_select(0, position))
        self.k.index_copy_(1, column, self._as_stored(qk[n_heads:]))
        self.v.index_copy_(1, column, v)
        self.idx.index_copy_(1, column, token.expand(n_kv, 1))
        lengths = (column + 1).to(torch.int32).repeat(n_kv)  # (n_kv,) contiguous: the kernel reads lengths[kv]
        out = kernels.decode(qk[:n_heads], self.k, self.v, valid=self.valid, lengths=lengths)
        self.outputs[self.index] = (q, k, v)  # pre-RoPE, K and V as stored: what `_plan_commit` takes
        return out


def steady(layer) -> bool:
    """Whether this layer's one-token step is steady: `attend` would neither retrieve, nor rebuild the context,
    nor plan an eviction (the conditions `_retrieve`, `_assemble` and `_plan_commit` test)."""
    c, asm = layer.memory.config, layer.asm
    if asm is None or layer._record_now:
        return False
    if layer._retrieval_due:
        return False
    retrieving = layer.evicted and c.top_k_blocks > 0
    if asm.key != (layer.version, layer._key if retrieving else ()):
        return False
    return not layer.evicts(1)


def memory_graph_step(memory) -> GraphStep | None:
    """The graph step of a ContextMemory after `begin(1)`, or None where this step must run eagerly."""
    m = memory
    if m._pending != 1 or not kernels.available(m.device) or not all(steady(layer) for layer in m.layers):
        return None
    rows = []
    for layer in m.layers:
        asm = layer.asm
        if asm.length >= asm.capacity:
            asm.reserve(asm.length + 1 + asm.capacity // 2)  # as `write` would grow it
        rows.append([asm.length, asm.next_pos, m.n_tokens])
    cos, sin = m.rope.signed_tables(max(r[1] for r in rows) + 1, m.dtype)
    if m.graph_scalars is None:
        m.graph_scalars = torch.zeros(len(m.layers), 3, dtype=torch.long, device=m.device)
    outputs: list = [None] * len(m.layers)
    layers = [_MemoryGraphLayer(layer.asm, cos, sin, m.graph_scalars[i], m.rope, m.kv_dtype, outputs, i)
              for i, layer in enumerate(m.layers)]
    key = ("memory", m.dtype, m.kv_dtype, tensor_key(cos), tensor_key(sin), tensor_key(m.graph_scalars),
           *(tensor_key(l.k) + tensor_key(l.v) + tensor_key(l.idx) + tensor_key(l.valid) for l in layers))

    def finish(recorded: list) -> None:
        for layer, (q, k, v) in zip(m.layers, recorded):
            layer._plan_commit(q, k, v, layer.asm, layer.asm.length)

    return GraphStep(key, layers, m.graph_scalars, rows, finish, outputs)
