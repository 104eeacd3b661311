"""The KV storage interface the model attends through, and its plain implementation: full attention.

A `KVMemory` holds one `LayerKV` per layer. Per forward chunk the engine calls `begin(n_new)` (plan:
positions and mask for the chunk), the model calls `layers[i].attend(q, k, v)` with pre-RoPE
projections, and the engine calls `commit()` once every layer succeeded; a failed or cancelled
forward leaves the memory as it was. The long-context memory (ContextMemory) implements the same
interface with eviction, a host block store and retrieval.

K and V may be stored in a narrower dtype than the model computes in (`kv_dtype`): on a CPU the model
computes in float32 and the cache holds float16, as llama.cpp's f16 KV does (half the bytes). Keys are
rounded to the storage dtype *before* RoPE, so a rotated key is the rotation of the stored pre-RoPE key
(what ContextMemory rebuilds its context from), and attention widens K and V back to float32 (`Widener`):
the products and the softmax stay float32.

    memory = FullKVCache(spec, rope, device, dtype, kv_dtype=torch.float16)
    memory.begin(len(tokens)); logits = model(tokens, memory); memory.commit()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from edgectx.errors import UsageError
from edgectx.model.rope import Rope
from edgectx.model.spec import ModelSpec

KV_DTYPES = ("auto", "float32", "float16", "bfloat16")


def kv_storage_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype K and V are stored in for a model computing in `dtype` on `device`. "auto": on a CPU computing
    in float32, float16: half the bytes, and three more mantissa bits than bfloat16 for the same cost (attention
    widens either to float32, see `Widener`). Measured on the embedded model, full attention over 8192 tokens of
    stdlib sources: NLL 1.582607 with float32 K and V, 1.582600 with float16, 1.582809 with bfloat16.
    Elsewhere the compute dtype (a GPU's is already 16-bit)."""
    if name not in KV_DTYPES:
        raise UsageError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {name!r}.")
    if name == "auto":
        return torch.float16 if device.type == "cpu" and dtype == torch.float32 else dtype
    return getattr(torch, name)


class Widener:
    """Widens a layer's stored K and V to the compute dtype for attention, into one buffer that every layer
    and step reuses.

    PyTorch's CPU attention has no fast float16 path (its float16 SDPA decode step measured 3.5x slower than
    float32 at 4096 keys), so 16-bit K and V are copied to float32 and attention runs as before. A fresh
    float32 copy per layer and step took 2.5x the whole float32 attention (page faults on every allocation);
    this buffer is allocated once (grown geometrically) and holds one layer's worth at a time: 1/n_layers of
    a float32 cache. Measured per decoded token of the embedded model (2 threads, interleaved with a float32
    cache): full attention +5% at 512 tokens, +11% at 4096, +23% at 8000. (ContextMemory keeps its assembled
    context in float32 instead, since it is bounded by the budget: edgectx.memory.context.) Chunked widening (L2-sized pieces merged by log-sum-exp) was slower, and an Inductor-fused kernel reading
    float16 at most a few percent faster in isolation, at the price of a compile. The buffer is attention
    scratch, like SDPA's own buffers, not KV storage: memories' `device_kv_bytes` leave it out.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # (2, n_kv, capacity, d): K then V

    def __call__(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (n_kv, n, d) in any dtype -> views (n_kv, n, d) in `dtype`, valid until the next call."""
        if k.dtype == dtype and v.dtype == dtype:
            return k, v
        n_kv, n, d = k.shape
        b = self.buffer
        if b is None or b.dtype != dtype or b.device != k.device or b.shape[1] != n_kv or b.shape[3] != d or b.shape[2] < n:
            capacity = max(n, 256, 0 if b is None else b.shape[2] * 3 // 2)
            self.buffer = None  # free the old one first
            b = self.buffer = torch.empty(2, n_kv, capacity, d, dtype=dtype, device=k.device)
        wk, wv = b[0, :, :n], b[1, :, :n]
        wk.copy_(k)
        wv.copy_(v)
        return wk, wv

    @property
    def device_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


@dataclass
class DecodeSlot:
    """Where a one-token step of a layer may run its attention outside PyTorch (edgectx.quant.ggml_decode): the
    layer's assembled context, the new token's column in it, and its rotary tables. The step writes the new
    key (rotated, rounded as `as_stored`) and value at column `start`, attends to columns [0, start], and the
    memory's `decoded(q, k, v)` does the rest of what `attend` does."""

    k: torch.Tensor  # (n_kv, capacity, head_dim) float32, rotated keys; capacity > start
    v: torch.Tensor  # (n_kv, capacity, head_dim) float32
    start: int  # the new token's column
    cos: int  # the address of Rope.signed_tables' float32 row (head_dim,) for the new token's position
    sin: int  # (the tables are kept until they grow, which no step does)
    rounded: bool  # K and V are stored in float16: round them so (ContextMemory.as_stored)
    mask: torch.Tensor | None  # (n_heads, capacity) float16: 0 where a query head may attend, -inf where not
    # The buffers' addresses and strides: (K address, V address, capacity, (mask address, mask columns) or None,
    # ((row bytes, rows), ...) of each of `writes`, bytes between the rope tables' rows), one tuple for as long as
    # none of them changes, so that the step re-points its graph only when it is handed another.
    layout: tuple = ()
    # Where the step also writes its K and V (as stored, before RoPE) and Q, so that recording the step copies
    # nothing: the addresses of the resident tier's next column, the host store's (each n_kv K rows of head_dim then
    # n_kv V rows) and the recent queries' (n_heads rows), the rows as far apart as `layout` says. None: `decoded`
    # copies them.
    writes: tuple[int, ...] | None = None
    write_dtypes: tuple[torch.dtype, ...] = ()  # theirs, in order: one tuple that every layer's slot shares


class LayerKV(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (n_heads, T, head_dim), k and v (n_kv_heads, T, head_dim), all pre-RoPE -> (n_heads, T, head_dim)."""

    def decode_slot(self) -> DecodeSlot | None:
        """For a one-token step: where it may attend outside PyTorch, or None if this step needs `attend`."""

    def decoded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: torch.Tensor,
                written: bool = False) -> None:
        """The step that `decode_slot` planned ran (pre-RoPE projections, K and V as stored, and the three as one
        row): record it. `written`: the step also wrote them where the slot's `writes` said."""


class KVMemory(Protocol):
    layers: Sequence[LayerKV]

    @property
    def n_tokens(self) -> int: ...

    def begin(self, n_new: int) -> None: ...

    def commit(self) -> None: ...

    def truncate(self, n_tokens: int) -> None: ...

    def stats(self) -> dict[str, int]: ...


SMALL_QUERY_ROWS = 16  # query rows per KV head up to which grouped_attention multiplies without SDPA on the CPU


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention with query heads grouped onto shared KV heads, without repeating K or V.

    q (n_heads, T, d), k/v (n_kv, S, d), mask bool (True = attend): (T, S) shared by all heads, (n_kv, T, S)
    per KV head, or None -> (n_heads, T, d).
    """
    n_heads, n_tokens, head_dim = q.shape
    n_kv, n_keys = k.shape[0], k.shape[1]
    group = n_heads // n_kv
    qg = q.reshape(1, n_kv, group * n_tokens, head_dim)  # heads h*group..h*group+group-1 share KV head h
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None].expand(n_kv, group, n_tokens, n_keys).reshape(1, n_kv, group * n_tokens, n_keys)
    elif mask is not None and group > 1:
        mask = mask.repeat(group, 1)  # (group * T, S)
    if group * n_tokens <= SMALL_QUERY_ROWS and q.device.type == "cpu":
        # A decode step: three plain products beat the fused kernel's setup on the CPU (measured 75 against
        # 100 us for 8 KV heads x 4 query rows x 520 keys, 183 against 292 us at 2,100 keys).
        scores = torch.baddbmm(q.new_empty(()), qg[0], k.transpose(1, 2), beta=0.0, alpha=head_dim ** -0.5)
        if mask is not None:
            scores.masked_fill_(~mask.reshape(-1, group * n_tokens, n_keys), float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1), v).reshape(n_heads, n_tokens, head_dim)
    # 4-D inputs take PyTorch's fused CPU kernel; 3-D ones fall back to the slower math path.
    out = F.scaled_dot_product_attention(qg, k[None], v[None], attn_mask=mask)
    return out.reshape(n_heads, n_tokens, head_dim)


@functools.cache
def _flash_with_lse():
    """PyTorch's fused CPU attention kernel that also returns each row's log-sum-exp (what lets `chunk_attention`
    run a chunk's two parts apart), or None where this torch lacks it or takes other arguments: a private op,
    so it is tried once on a tiny input rather than trusted by version."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    x = torch.zeros(1, 1, 2, 8)
    try:
        out, lse = op(x, x, x, attn_mask=torch.zeros(1, 1, 1, 2))
        op(x, x, x, is_causal=True)
    except (RuntimeError, TypeError):
        return None
    return op if out.shape == x.shape and lse.numel() == 2 else None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_attention` for a chunk of T queries whose keys sit at columns [start, start + T) of k and v
    (n_kv, start + T, d): each query sees every earlier column its KV head's `valid` (n_kv, >= start, bool;
    None: all) allows, and the chunk causally.

    On the CPU the earlier columns and the chunk are two fused-kernel calls merged by their log-sum-exp: the
    earlier columns under a (n_kv, 1, start) mask broadcast over the rows, the chunk with `is_causal`, which
    skips its upper triangle. A single call would need the whole (n_heads x T, S) mask, which PyTorch widens to
    float per call (measured on 2 cores' one thread, 9 heads over 3 KV heads, 512 queries over 2,560 keys with
    per-head duplicates masked: 92 ms one call, 55 ms two). Equal to the one-call result to float32 rounding."""
    n_heads, n_new, head_dim = q.shape
    n_kv, group = k.shape[0], n_heads // k.shape[0]
    if start == 0:
        return causal_attention(q, k, v)
    flash = _flash_with_lse() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    if flash is None or n_new == 1 or group * n_new <= SMALL_QUERY_ROWS:
        return grouped_attention(q, k, v, chunk_mask(start, n_new, valid, q.device))
    qg = q.reshape(1, n_kv, group * n_new, head_dim)  # heads h*group..h*group+group-1 share KV head h
    mask = None
    if valid is not None:
        mask = torch.zeros(1, n_kv, 1, start, dtype=q.dtype).masked_fill_(~valid[None, :, None, :start], float("-inf"))
    before, lse_before = flash(qg, k[None, :, :start], v[None, :, :start], attn_mask=mask)
    k_new, v_new = (x[:, start:].repeat_interleave(group, dim=0)[None] for x in (k, v))  # the chunk's few keys
    own, lse_own = flash(q[None], k_new, v_new, is_causal=True)
    lse_before, lse_own = lse_before.reshape(n_heads, n_new, 1), lse_own.reshape(n_heads, n_new, 1)
    lse = torch.logaddexp(lse_before, lse_own)
    out = before.reshape(n_heads, n_new, head_dim) * (lse_before - lse).exp_()
    return out.add_(own.reshape(n_heads, n_new, head_dim) * (lse_own - lse).exp_())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`grouped_attention` for T queries at positions 0..T-1 over their own T keys, causally: without a
    mask tensor the fused kernel skips the blocks above the diagonal (half the work of a long prefill)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]


def chunk_mask(start: int, n_new: int, valid: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`grouped_attention`'s mask for a chunk of `n_new` queries at columns [start, start + n_new): every earlier
    column `valid` (n_kv, >= start, bool; None: all) allows, and the chunk causally. (T, S) without `valid`
    (None for a single query), else (n_kv, T, S)."""
    if valid is None:
        return causal_mask(start, n_new, 0, device)
    n_kv = valid.shape[0]
    causal = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    return torch.cat((valid[:, None, :start].expand(n_kv, n_new, start), causal.expand(n_kv, n_new, n_new)), dim=2)


def causal_mask(n_past: int, n_new: int, sliding_window: int, device: torch.device) -> torch.Tensor | None:
    """(n_new, n_past + n_new) bool mask: query i (at n_past + i) sees keys j <= n_past + i (within the window)."""
    if n_new == 1 and (not sliding_window or n_past < sliding_window):
        return None
    q_pos = torch.arange(n_past, n_past + n_new, device=device)[:, None]
    k_pos = torch.arange(n_past + n_new, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window:
        mask &= k_pos > q_pos - sliding_window
    return mask


class _FullLayer:
    """One layer's keys (rotated once: positions never change under full attention) and values."""

    def __init__(self, owner: "FullKVCache"):
        self.owner = owner
        self.k = torch.empty(owner.spec.n_kv_heads, 0, owner.spec.head_dim, device=owner.device, dtype=owner.kv_dtype)
        self.v = torch.empty_like(self.k)

    def _reserve(self, n_total: int) -> None:
        capacity = self.k.shape[1]
        if n_total <= capacity:
            return
        new_capacity = max(n_total, 2 * capacity, 256)
        for name in ("k", "v"):
            old = getattr(self, name)
            # zeros, not garbage, past the tokens: a captured decode step's masked attention reads every column
            # (edgectx.model.graph_step), and a NaN there would poison it (0 * NaN)
            grown = old.new_zeros(old.shape[0], new_capacity, old.shape[2])
            grown[:, :capacity] = old
            setattr(self, name, grown)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = self.owner
        start, end = o.n_tokens, o.n_tokens + q.shape[1]
        self._reserve(end)
        n_heads = q.shape[0]
        k = k.to(o.kv_dtype).to(q.dtype)  # the key as stored, then rotated (see the module docstring)
        qk = o.rope.rotate(torch.cat((q, k)), *o.rope_tables)  # one rotation for queries and keys
        self.k[:, start:end] = qk[n_heads:]
        self.v[:, start:end] = v
        k_all, v_all = o.widen(self.k[:, :end], self.v[:, :end], q.dtype)
        if o.from_empty:
            return causal_attention(qk[:n_heads], k_all, v_all)
        if not o.spec.sliding_window:
            return chunk_attention(qk[:n_heads], k_all, v_all, start)
        return grouped_attention(qk[:n_heads], k_all, v_all, o.mask)


class FullKVCache:
    """Every token's K and V on the device: exact full attention, memory growing with the context."""

    def __init__(self, spec: ModelSpec, rope: Rope, device: torch.device, dtype: torch.dtype,
                 kv_dtype: torch.dtype | None = None):
        self.spec, self.rope, self.device, self.dtype = spec, rope, device, dtype
        self.kv_dtype = kv_dtype or dtype  # what K and V are stored in; `dtype` is what the model computes in
        self.widen = Widener()
        self._n_tokens = 0
        self._pending = 0
        self.mask: torch.Tensor | None = None
        self.from_empty = False  # this chunk starts the sequence and sees all of itself: plain causal attention
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.layers = [_FullLayer(self) for _ in range(spec.n_layers)]
        self.graph_scalars: torch.Tensor | None = None  # a captured decode step's column, on the device (graph_step)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def begin(self, n_new: int) -> None:
        self._pending = n_new
        self.rope_tables = self.rope.range_tables(self._n_tokens, n_new, self.dtype)  # positions known here: no sync
        window = self.spec.sliding_window
        self.from_empty = self._n_tokens == 0 and n_new > 1 and (not window or n_new <= window)
        self.mask = None if self.from_empty else causal_mask(self._n_tokens, n_new, window, self.device)

    def commit(self) -> None:
        self._n_tokens += self._pending
        self._pending = 0

    def truncate(self, n_tokens: int) -> None:
        """Forget every token from `n_tokens` on (a regenerated or edited turn)."""
        self._n_tokens = min(self._n_tokens, n_tokens)

    def stats(self) -> dict[str, int]:
        kv_bytes = self._n_tokens * self.spec.kv_bytes_per_token(self.layers[0].k.element_size())
        return {"tokens": self._n_tokens, "device_kv_bytes": kv_bytes, "host_kv_bytes": 0}
