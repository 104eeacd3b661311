"""A ContextMemory's whole state as snapshot sections, and back: reopen a long document without prefilling it.

What is saved, per layer (section names `layer.{i}.*`; docs/snapshot-format.md has the container):

| state | sections | fp16 codec | int8 / int4 codecs |
|---|---|---|---|
| host block store: every token's pre-RoPE K, V | `host.k`, `host.v` | exact (KV `fp16`, or `raw` if the store is not fp16) | KIVI `int8`/`int4`: K per channel, V per token; the first `n_sink` and last `n_local + evict_every` tokens fp16 |
| block representatives (device) | `host.repr` | raw, exact | raw, exact (blocks keep the live memory's scores) |
| resident tiers: sinks, retained, window per KV head | `resident.k`, `resident.v` | raw in the live dtype, exact | not stored: rebuilt from the host store at `resident.idx` |
| their original indices and eviction scores | `resident.idx`, `resident.score` | raw, exact | raw, exact |
| retrieved blocks per KV head | `selection` | raw | raw |
| LRU block cache: which blocks, oldest use first | `cache.blocks` | raw (contents are refetched from the store) | same |
| the same as (block, KV head) pairs, `block * n_kv + head` | `cache.pairs` (absent in older files) | raw | same |
| observation-window queries (attention-mass scorer) | `q_recent` | raw in the live dtype | the codec, as keys |
| retrieved blocks the assembled context was built with | `asm.selection` | raw | raw |

Small state (eviction flag, step and version counters, cache hit counts, the assembled context's shape,
the retrieval record, the scorer's name) is JSON in the header's `meta`; the engine adds the token ids
(the container's `tokens`) and the last token's logits (`next_logits`, raw float32).

Why the resident tiers are stored by reference under int8/int4: every resident token is also in the host
store, and storing their K/V as well cost up to `resident_tokens` per KV head (1536 at the default budget:
+4.7% of the fp16 KV size at 32768 tokens; at 8192 tokens an int4 snapshot was 0.447 of the fp16 KV size
with them, 0.313 without). The tokens every later query leans on most, the sinks and the window (with the
tokens decode appends before the next eviction), are kept fp16 inside the host store's encoding
(`host_codec_options`), so they come back in fp16 as before; only the retained tokens come back at the
codec's precision (int4 at 8192 tokens: top-1 agreement over the next 512 tokens 0.990). The observation
queries (n_heads, not n_kv_heads, per token: at 4096 tokens they would be 12% of the fp16 KV size) only
steer later evictions, so they go through the codec, per channel as keys are (the newest 128 stay fp16).

The assembled context (keys rotated at their positions) is not stored: it is rebuilt from the resident
tiers and the host store with the same columns, order, positions and capacity as the live one
(`LayerMemory.reassemble`), and the RoPE tables are regrown to the live size in one step (`rope_positions`),
so under the fp16 codec the restored memory's logits are bit-identical (same device, dtypes and threads).
Resident K and V are converted to the restoring memory's `kv_dtype` on load: a snapshot written while the
CPU kept them in float32 (before edgectx stored them as float16) restores into a float16 memory and continues
from there, as if it had been rounded when written.
An assembly made stale by an eviction is never read again; only its existence (decode steps may reuse
the last retrieval) and its size (stats) are restored.

    write_snapshot(path, memory_sections(memory, "int4", logits), token_ids=ids, model_fingerprint=fp,
                   memory_config=memory.config.to_dict(), meta=memory_meta(memory, "int4"))
    with open_snapshot(path, fp) as snap:
        logits = load_memory(snap, fresh_memory)  # a new ContextMemory made with the snapshot's config
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from edgectx.errors import SnapshotError
from edgectx.memory.context import ContextMemory, LayerMemory
from edgectx.memory.config import MemoryConfig
from edgectx.memory.tiers import Assembly
from edgectx.quant import kv_codec
from edgectx.quant.formats import SNAPSHOT_CODECS
from edgectx.snapshot.file import Snapshot
from edgectx.snapshot.sections import Section, tensor_section

STATE = "edgectx-context-memory"
STATE_VERSION = 2  # 2: under int8/int4 the resident tiers are stored by reference (resident.idx)
LOGITS = "next_logits"


# -- saving -------------------------------------------------------------------------------------------


def memory_meta(memory: ContextMemory, codec: str) -> dict:
    """The small state, for the header's `meta`."""
    layers = []
    for layer in memory.layers:
        asm = layer.asm
        if asm is None:
            asm_meta = None
        elif asm.key[0] != layer.version:  # an eviction since: never read again
            asm_meta = {"stale": True, "capacity": asm.capacity, "valid": asm.valid is not None}
        else:
            asm_meta = {"stale": False, "capacity": asm.capacity, "n_resident": asm.n_resident,
                        "length": asm.length, "next_pos": asm.next_pos}
        layers.append({"evicted": layer.evicted, "steps_since_retrieval": layer.steps_since_retrieval,
                       "version": layer.version, "resident_capacity": layer.resident.k.shape[1],
                       "cache_hits": layer.cache.hits, "cache_misses": layer.cache.misses, "asm": asm_meta})
    record = memory.record
    return {"state": STATE, "state_version": STATE_VERSION, "codec": codec, "dtype": str(memory.dtype).removeprefix("torch."),
            "kv_dtype": str(memory.kv_dtype).removeprefix("torch."),  # what the live tiers held (a restore converts)
            "scorer": memory.scorer.name, "n_tokens": memory.n_tokens, "query_start": memory.query_start,
            "rope_positions": memory.rope.n_positions, "layers": layers,
            "record": {"n_retrievals": record.n_retrievals, "blocks": list(record.relevance),
                       "relevance": list(record.relevance.values())}}


def memory_sections(memory: ContextMemory, codec: str, next_logits: torch.Tensor | None = None) -> Iterator[Section]:
    """Every layer's tensors, one section at a time (the writer compresses each as it comes)."""
    if codec not in SNAPSHOT_CODECS:
        raise ValueError(f"codec must be one of {SNAPSHOT_CODECS}, not {codec!r}")
    for i, layer in enumerate(memory.layers):
        yield from _layer_sections(f"layer.{i}.", layer, codec, memory.scorer.observes)
    if next_logits is not None:
        yield tensor_section(LOGITS, next_logits.detach().float().reshape(-1))


def _layer_sections(p: str, layer: LayerMemory, codec: str, observes: bool) -> Iterator[Section]:
    store, r = layer.store, layer.resident
    k, v = store.tokens(0, store.n_tokens)  # (n_kv, n_tokens, d) in the host dtype
    yield _host(p + "host.k", k, codec, "key", layer.memory.config)
    yield _host(p + "host.v", v, codec, "value", layer.memory.config)
    yield tensor_section(p + "host.repr", store.representatives)
    if codec == "fp16":  # lossy codecs rebuild the resident tiers from the host store at resident.idx
        yield tensor_section(p + "resident.k", r.k[:, : r.n])
        yield tensor_section(p + "resident.v", r.v[:, : r.n])
    yield tensor_section(p + "resident.idx", r.idx[:, : r.n])
    yield tensor_section(p + "resident.score", r.score[:, : r.n])
    yield tensor_section(p + "selection", layer.selection.long())
    yield tensor_section(p + "cache.blocks", torch.tensor(layer.cache.blocks(store.n_kv_heads), dtype=torch.int64))
    yield tensor_section(p + "cache.pairs", torch.tensor(list(layer.cache.where), dtype=torch.int64))
    if observes:
        q = layer.q_recent  # (n_heads, n_observed, d)
        yield tensor_section(p + "q_recent", q) if codec == "fp16" else tensor_section(p + "q_recent", q, codec, "key")
    if layer.asm is not None and layer.asm.key[0] == layer.version:
        yield tensor_section(p + "asm.selection", torch.tensor(layer.asm.key[1], dtype=torch.int64).reshape(r.n_kv, -1))


def host_codec_options(config: MemoryConfig) -> dict:
    """How int8/int4 encode the host store: the sinks and the window (with the tokens decode appends before
    the next eviction) stay fp16, so the resident tiers rebuilt from the store keep them at full precision."""
    # Group 64, not 128: at 8192 tokens 128 saved 1% of the fp16 KV size and lowered top-1 agreement from 0.990 to 0.980.
    return {"group": kv_codec.DEFAULT_GROUP, "keep_first": config.n_sink, "keep_last": config.n_local + config.evict_every}


def _host(name: str, x: torch.Tensor, codec: str, kind: str, config: MemoryConfig) -> Section:
    if codec != "fp16":
        return tensor_section(name, x, codec, kind, **host_codec_options(config))
    if x.dtype != torch.float16:
        return tensor_section(name, x)  # a float32 or bfloat16 host store: raw keeps it exact
    return tensor_section(name, x, codec, kind)


# -- restoring ----------------------------------------------------------------------------------------


def load_memory(snap: Snapshot, memory: ContextMemory) -> torch.Tensor | None:
    """Fill a fresh `memory` (built with the snapshot's config) from `snap`; returns the saved next-token
    logits, or None. Raises SnapshotError on anything inconsistent; `memory` is then to be discarded."""
    if memory.n_tokens:
        raise ValueError("load_memory needs a fresh ContextMemory")
    meta = _State(snap, memory)
    memory._n_tokens = meta.n_tokens  # restoring is the one writer besides commit: `reassemble` and retrieval read it
    memory.rope.reserve(meta.rope_positions)  # a fresh Rope: same table size, same table bits
    for i, (layer, layer_meta) in enumerate(zip(memory.layers, meta.layers)):
        _load_layer(_Reader(snap, f"layer.{i}.", memory), layer, layer_meta, meta.n_tokens, meta.codec,
                    memory.scorer.observes)
    # The token ids (the container's `tokens`) feed lexical retrieval; the lexical query starts where it did.
    memory.token_index.append(snap.tokens().to(torch.int32))
    memory.query_start = meta.query_start
    memory.record.relevance = dict(zip(meta.record_blocks, meta.record_relevance))
    memory.record.n_retrievals = meta.n_retrievals
    if LOGITS not in snap:
        return None
    return _Reader(snap, "", memory).tensor(LOGITS, (memory.spec.vocab_size,), torch.float32).to(memory.device)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of float tensor `t` is finite, in one pass without a temporary: a sum is finite exactly
    when its terms are (NaN and infinities carry through it), and its accumulator cannot overflow (float32 for
    float16's largest 65,504, float64 for the rest). A fourth of `isfinite(t).all()`'s time on a 32K-token section,
    a quarter of a 32K-token restore."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.dtype == torch.float16 else torch.float64)))


def _load_layer(rd: "_Reader", layer: LayerMemory, m: dict, n_tokens: int, codec: str, observes: bool) -> None:
    store, r, c = layer.store, layer.resident, layer.memory.config
    n_kv, d = r.n_kv, r.head_dim
    k, v = rd.tensor("host.k", (n_kv, n_tokens, d)), rd.tensor("host.v", (n_kv, n_tokens, d))
    rd.fits(store.host_dtype, k, v)
    store.load(k, v, rd.tensor("host.repr", (n_tokens // store.block_size, n_kv, d)))

    idx = rd.tensor("resident.idx", (n_kv, None), torch.int64, at_most=n_tokens)
    n = idx.shape[1]
    rd.check(bool((idx >= 0).all() and (idx < n_tokens).all() and (idx[:, 1:] > idx[:, :-1]).all()),
             "resident token indices are not sorted positions inside the context")
    # Until the first eviction every token is resident; after it, at least the sinks and the window are.
    rd.check(n == n_tokens if not m["evicted"] else n >= min(n_tokens, c.n_sink + c.n_local),
             "its resident tier holds fewer tokens than its memory keeps")
    # Live capacity is what the tokens need plus a chunk's headroom, doubled at most by growth.
    headroom = max(c.chunk_tokens, c.evict_every) + 1
    rd.check(n <= m["resident_capacity"] <= min(rd.max_capacity, max(256, 2 * (n + headroom))),
             "the resident tier's capacity does not fit its tokens")
    if codec == "fp16":
        rk, rv = rd.tensor("resident.k", (n_kv, n, d)), rd.tensor("resident.v", (n_kv, n, d))
    else:  # by reference: the resident tokens as the host store decodes them
        cols = idx[..., None].expand(-1, -1, d)  # (n_kv, n, d)
        rk, rv = k.gather(1, cols), v.gather(1, cols)
    score = rd.tensor("resident.score", (n_kv, n), torch.float32)
    rd.fits(r.dtype, rk, rv)  # float32 tiers (older snapshots) become float16 ones here
    r.rebuild([tuple(t.to(r.device, r.dtype) for t in (rk, rv)) + (idx.to(r.device), score.to(r.device))],
              headroom=m["resident_capacity"] - n)

    layer.selection = rd.blocks("selection", store.n_blocks, c.top_k_blocks)  # on the host, as retrieval keeps it
    layer.evicted, layer.steps_since_retrieval, layer.version = m["evicted"], m["steps_since_retrieval"], m["version"]
    if observes:
        q = rd.tensor("q_recent", (layer.q_recent.shape[0], None, d), at_most=c.n_observe)
        layer.q_recent = q.to(layer.memory.device, layer.memory.dtype)

    cached = rd.tensor("cache.blocks", (None,), torch.int64, at_most=store.n_blocks).tolist()
    rd.check(len(set(cached)) == len(cached) and all(0 <= b < store.n_blocks for b in cached),
             "its block cache lists blocks it cannot hold")
    # Oldest use first, so the LRU order comes back as it was; a smaller cache ("auto" sized it from this
    # GPU's free memory) keeps the most recent. The cache's contents never change the logits.
    if rd.has("cache.pairs"):  # the exact LRU order of each head's blocks
        n_pairs = store.n_blocks * n_kv
        pairs = rd.tensor("cache.pairs", (None,), torch.int64, at_most=n_pairs).tolist()
        rd.check(len(set(pairs)) == len(pairs) and all(0 <= p < n_pairs for p in pairs),
                 "its block cache lists blocks it cannot hold")
        if not layer.gathers_on_device:  # (where retrieval reads the host store itself, the cache stays unused)
            layer.cache.fetch(pairs[len(pairs) - min(len(pairs), layer.cache.capacity) :], store)
    elif not layer.gathers_on_device:
        layer.cache.fetch_blocks(cached, store)
    _load_assembly(rd, layer, m["asm"])
    layer.cache.hits, layer.cache.misses = m["cache_hits"], m["cache_misses"]


def _load_assembly(rd: "_Reader", layer: LayerMemory, m: dict | None) -> None:
    r = layer.resident
    if m is None:
        layer.asm = None
        return
    c = layer.memory.config
    keys = r.n + c.top_k_blocks * c.block_size + max(c.chunk_tokens, c.evict_every) + 1  # resident, retrieved, a chunk
    rd.check(m["capacity"] <= min(rd.max_capacity, 2 * keys + 256), "its assembled context is implausibly large")
    if m["stale"]:  # a placeholder of the same size, under a key no retrieval can produce
        empty_k = torch.empty(r.n_kv, 0, r.head_dim, device=r.device, dtype=layer.memory.context_dtype)  # as `_build`
        valid = torch.empty(r.n_kv, 0, dtype=torch.bool, device=r.device) if m["valid"] else None
        layer.asm = Assembly(empty_k, empty_k, torch.empty(r.n_kv, 0, dtype=torch.long, device=r.device), valid,
                             0, ("stale",), n_resident=0, headroom=m["capacity"])
        return
    selection = rd.blocks("asm.selection", layer.store.n_blocks, layer.memory.config.top_k_blocks)
    rd.check(m["n_resident"] <= r.n, "its assembled context starts past its resident tokens")
    length = selection.shape[1] * layer.memory.config.block_size + r.n  # blocks, and every resident token
    rd.check(m["length"] == length and m["capacity"] >= length, "its assembled context does not match its resident tokens")
    asm = layer.reassemble(selection, m["n_resident"], m["capacity"])
    rd.check(asm.next_pos == m["next_pos"] and asm.capacity == m["capacity"],
             "its assembled context does not rebuild to the recorded positions")


class _Reader:
    """Reads one layer's sections and checks their shapes and dtypes; every failure is a SnapshotError."""

    def __init__(self, snap: Snapshot, prefix: str, memory: ContextMemory):
        self.snap, self.prefix, self.n_kv = snap, prefix, memory.spec.n_kv_heads
        c = memory.config
        # Generous bounds on the buffers a file may ask for (live ones stay far below them).
        self.max_capacity = 4 * (c.budget_tokens + c.chunk_tokens + c.evict_every + c.top_k_blocks * c.block_size) + 1024

    def has(self, name: str) -> bool:
        return self.prefix + name in self.snap

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise SnapshotError(f"{self.snap.path} is corrupt: {what} ({self.prefix.rstrip('.') or 'memory'}).")

    def fits(self, dtype: torch.dtype, *tensors: torch.Tensor) -> None:
        """Values that `dtype` can hold: K and V converted to a narrower dtype must not overflow to inf."""
        limit = torch.finfo(dtype).max
        self.check(all(t.numel() == 0 or float(t.abs().max()) <= limit for t in tensors),
                   f"its keys or values overflow {str(dtype).removeprefix('torch.')}")

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype | None = None, at_most: int | None = None) -> torch.Tensor:
        """Section `prefix + name`, whose shape must match `shape` (None = any size up to `at_most` there). The
        declared shape is checked before the section is read: a file may not make this reader allocate more
        than the memory it restores needs. Floats must be finite."""
        info = self.snap.info(self.prefix + name)
        if info is not None:  # a missing section is reported by `read`
            self._check_shape(name, info.shape if info.kind == "tensor" else "bytes", shape, at_most)
        t = self.snap.read(self.prefix + name)
        ok = isinstance(t, torch.Tensor) and (dtype is None or t.dtype == dtype)
        ok = ok and t.is_floating_point() == (dtype is None or dtype.is_floating_point)
        self._check_shape(name, tuple(t.shape) if isinstance(t, torch.Tensor) else "bytes", shape, at_most, ok)
        if t.is_floating_point():
            self.check(all_finite(t), f"section {self.prefix + name!r} holds values that are not finite")
        return t

    def _check_shape(self, name: str, got, shape: tuple, at_most: int | None, ok: bool = True) -> None:
        ok = ok and isinstance(got, tuple) and len(got) == len(shape) and all(
            g == want if want is not None else at_most is None or g <= at_most for g, want in zip(got, shape))
        if not ok:
            want = tuple(("*" if at_most is None else f"<={at_most}") if s is None else s for s in shape)
            raise SnapshotError(f"{self.snap.path} is corrupt: section {self.prefix + name!r} has shape {got}, "
                                f"this memory needs {want}.")

    def blocks(self, name: str, n_blocks: int, top_k: int) -> torch.Tensor:
        """Block ids (n_kv, k) per KV head: at most top_k, each a completed block."""
        t = self.tensor(name, (self.n_kv, None), torch.int64, at_most=top_k)
        self.check(bool(((t >= 0) & (t < n_blocks)).all()), f"section {name!r} names blocks it does not hold")
        return t


class _State:
    """The header's meta, checked field by field (the header is verified, but may come from any writer)."""

    def __init__(self, snap: Snapshot, memory: ContextMemory):
        meta, path = snap.header.meta, snap.path
        fail = SnapshotError(f"{path} does not hold an edgectx long-context memory this edgectx can restore "
                             "(its memory state is missing or malformed).")
        if not isinstance(meta, dict) or meta.get("state") != STATE or meta.get("state_version") != STATE_VERSION:
            raise fail
        try:
            self.n_tokens = _count(meta["n_tokens"])
            self.rope_positions = _count(meta["rope_positions"])
            # written since lexical retrieval came; an older snapshot's next decode queries from its last token
            self.query_start = min(_count(meta.get("query_start", self.n_tokens)), self.n_tokens)
            layers = meta["layers"]
            self.codec = meta["codec"]
            if self.codec not in SNAPSHOT_CODECS or not isinstance(layers, list) or len(layers) != len(memory.layers):
                raise fail
            self.layers = [_layer_meta(m) for m in layers]
            record = meta["record"]
            self.n_retrievals = _count(record["n_retrievals"])
            self.record_blocks = [_count(b) for b in record["blocks"]]
            self.record_relevance = [_number(x) for x in record["relevance"]]
            scorer = meta["scorer"]
        except (KeyError, TypeError, ValueError):
            raise fail from None
        c = memory.config
        reach = 2 * (self.n_tokens + c.budget_tokens + c.chunk_tokens + c.evict_every + c.top_k_blocks * c.block_size) + 4096
        n_blocks = -(-self.n_tokens // c.block_size)
        if self.n_tokens != snap.header.n_tokens or len(self.record_blocks) != len(self.record_relevance) \
                or self.rope_positions > reach or any(b >= n_blocks for b in self.record_blocks):
            raise fail
        if scorer != memory.scorer.name:
            raise SnapshotError(f"{path} was made with the {scorer!r} eviction scorer, and this engine would continue "
                                f"with {memory.scorer.name!r}: the memory would not behave as it did; read the document again.")


def _count(x) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 1 << 48:
        raise ValueError(x)
    return x


def _number(x) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise ValueError(x)
    return float(x)


def _layer_meta(m: dict) -> dict:
    if not isinstance(m, dict) or not isinstance(m["evicted"], bool):
        raise ValueError(m)
    out = {k: _count(m[k]) for k in ("steps_since_retrieval", "version", "resident_capacity", "cache_hits", "cache_misses")}
    out["evicted"] = m["evicted"]
    asm = m["asm"]
    if asm is None:
        out["asm"] = None
    elif isinstance(asm, dict) and asm.get("stale") is True and isinstance(asm["valid"], bool):
        out["asm"] = {"stale": True, "capacity": _count(asm["capacity"]), "valid": asm["valid"]}
    elif isinstance(asm, dict) and asm.get("stale") is False:
        out["asm"] = {"stale": False, **{k: _count(asm[k]) for k in ("capacity", "n_resident", "length", "next_pos")}}
    else:
        raise ValueError(asm)
    return out
