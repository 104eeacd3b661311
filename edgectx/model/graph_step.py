"""A one-token decode step that a CUDA graph can capture once and replay: what a memory offers the graph runner.

A CUDA graph records kernel launches with their arguments, pointers and sizes fixed; a replay runs no Python.
So whatever changes from one decode step to the next (the new token's column in the KV buffers, its rotary
position, the number of keys attention reads) must be a value in a device tensor that kernels read, written in
place before each replay, never a Python int baked into a launch. For a one-token step it can run that way, a
memory offers a `GraphStep` (`graph_step_of(memory)`):

- `layers`: graph-safe `LayerKV`s. Each writes the new key and value with `index_copy_` at a column read from
  `scalars`, indexes the rotary tables with the position read from `scalars`, and attends over the buffers'
  whole capacity, keys past the new column masked (the Triton decode kernel's per-head `lengths`, or a mask).
  They hold tensors only, no memory object, so what they do cannot depend on host state a replay would miss.
- `key`: the shape class. Every tensor those layers read or write (address, shape, strides, dtype), and every
  choice their Python made; a captured graph is valid exactly for steps with an equal key. When a memory
  reallocates a buffer (a cache growing, a context rebuilt after an eviction), the key changes and the runner
  captures again (edgectx.model.cuda_graph).
- `values`: this step's host integers for `scalars` (n_rows, columns): full attention's [column, position, token
  index]; the long-context memory's add where the step writes what its commit would copy (edgectx.memory.graph_step).
- `finish(outputs)`: after the replay, the host bookkeeping the eager `attend` would have done, given what the
  captured layers recorded (their pre-RoPE q, k, v).

Steps that cannot run this way (prefill chunks, sliding-window masks, the long-context memory's steps that retrieve
or rebuild their context themselves) get None: the runner runs them eagerly. Everything here also runs eagerly on a
CPU, which is how the tests compare it with the eager step.

    step = graph_step_of(memory)        # after memory.begin(1); None: run this step eagerly
    step.prepare()                      # this step's column and position, written into `scalars` in place
    logits = model(token_buffer, step)  # what a graph captures (`step` stands in for the memory)
    step.finish(step.outputs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from edgectx import kernels
from edgectx.model.kv import FullKVCache, KVMemory, grouped_attention


def tensor_key(t: torch.Tensor | None) -> tuple:
    """What a captured kernel baked in about `t`: its address, shape, strides and dtype."""
    return () if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def upload_into(dst: torch.Tensor, values: list) -> None:
    """Write host `values` into the device tensor `dst` in place, without making the host wait: from pinned
    memory, asynchronously (the caching host allocator keeps the page until the copy has run)."""
    src = torch.tensor(values, dtype=dst.dtype).reshape(dst.shape)
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=dst.device.type == "cuda")


@dataclass
class GraphStep:
    key: tuple
    layers: list  # graph-safe LayerKVs, one per model layer; the model calls their `attend`
    scalars: torch.Tensor  # (n_rows, columns) int64 on the device, kept by the memory: the same tensor every step
    values: list  # this step's rows for `scalars`
    finish: Callable[[list], None] = lambda outputs: None  # full attention has nothing to do: commit counts
    outputs: list = field(default_factory=list)  # what the layers record during a run (per layer), for `finish`

    def prepare(self) -> None:
        upload_into(self.scalars, self.values)


def attend_over_capacity(q_rot: torch.Tensor, k: torch.Tensor, v: torch.Tensor, column: torch.Tensor,
                         valid: torch.Tensor | None, use_kernel: bool) -> torch.Tensor:
    """One query per head over columns [0, column] of k, v (n_kv, capacity, d), the later ones masked; `column`
    a (1,) device tensor, `valid` (n_kv, capacity) bool or None. The kernel reads no column past a head's length;
    the masked path reads them all, so they must hold finite numbers (0 * NaN is NaN)."""
    n_kv, capacity = k.shape[0], k.shape[1]
    if use_kernel:
        lengths = (column + 1).to(torch.int32).repeat(n_kv)  # (n_kv,) contiguous: the kernel reads lengths[kv]
        return kernels.decode(q_rot, k, v, valid=valid, lengths=lengths)
    keep = torch.arange(capacity, device=k.device)[None, :] <= column  # (1, capacity)
    mask = keep if valid is None else (valid & keep)[:, None, :]  # (1, S) shared, or (n_kv, 1, S) per head
    return grouped_attention(q_rot, k.to(q_rot.dtype), v.to(q_rot.dtype), mask)


class _FullGraphLayer:
    """`_FullLayer.attend` for one token whose column (= position) is read from `row[0]`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, row: torch.Tensor,
                 rope, use_kernel: bool):
        self.k, self.v, self.cos, self.sin, self.row, self.rope, self.use_kernel = k, v, cos, sin, row, rope, use_kernel

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_heads, column = q.shape[0], self.row[0:1]
        k = k.to(self.k.dtype).to(q.dtype)  # the key as stored, then rotated (edgectx.model.kv)
        qk = self.rope.rotate(torch.cat((q, k)), self.cos.index_select(0, column), self.sin.index_select(0, column))
        self.k.index_copy_(1, column, qk[n_heads:].to(self.k.dtype))
        self.v.index_copy_(1, column, v.to(self.v.dtype))
        return attend_over_capacity(qk[:n_heads], self.k, self.v, column, None, self.use_kernel)


def full_graph_step(cache: FullKVCache) -> GraphStep | None:
    """The graph step of a `FullKVCache` after `begin(1)`, or None when this step needs the eager path (a chunk,
    a sliding-window mask). Grows the buffers first if the new token would not fit, as `attend` would."""
    if cache._pending != 1 or cache.mask is not None or cache.from_empty:
        return None
    n = cache.n_tokens
    for layer in cache.layers:
        layer._reserve(n + 1)  # geometric: a new shape class (and capture) once per doubling
    cos, sin = cache.rope.signed_tables(n + 1, cache.dtype)
    if cache.graph_scalars is None:
        cache.graph_scalars = torch.zeros(1, 3, dtype=torch.long, device=cache.device)
    # The kernel reads K in its stored dtype; where it is narrower than the compute dtype, eager widens it first,
    # and so does the masked path.
    use_kernel = cache.kv_dtype == cache.dtype and kernels.available(cache.device)
    row = cache.graph_scalars[0]
    layers = [_FullGraphLayer(l.k, l.v, cos, sin, row, cache.rope, use_kernel) for l in cache.layers]
    key = ("full", use_kernel, cache.dtype, tensor_key(cos), tensor_key(sin), tensor_key(cache.graph_scalars),
           *(tensor_key(l.k) + tensor_key(l.v) for l in cache.layers))
    return GraphStep(key, layers, cache.graph_scalars, [[n, n, n]])


def graph_step_of(memory: KVMemory) -> GraphStep | None:
    """The graph step a memory offers for the step under way (after `begin(1)`), or None: full attention's here,
    another memory's from its own `graph_step()` (ContextMemory: edgectx.memory.graph_step)."""
    if isinstance(memory, FullKVCache):
        return full_graph_step(memory)
    offer = getattr(memory, "graph_step", None)
    return offer() if offer is not None else None
