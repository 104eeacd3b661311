"""Retrieval copies only the (block, KV head) pairs its heads selected, in a few batched calls (issue 21, defect 8).

Each KV head retrieves its own blocks; a cache slot that held every head of a block made a retrieval copy
n_kv_heads times the bytes it needed, one copy call per block. Counted here on the CPU: every write into a
layer's block pool (its storage), with the bytes written, per forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgectx.engine import Engine
from edgectx.memory.block_store import HostBlockStore
from edgectx.memory.config import MemoryConfig
from edgectx.memory.retrieval import BlockCache
from tiny_gguf import write_tiny_gguf

# No lexical blocks: those are the same for every head, and this test wants each head's own choice.
SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16, lexical_blocks=0)
WRITES = {torch.ops.aten.copy_.default, torch.ops.aten.index_copy_.default, torch.ops.aten.index_put_.default}


class PoolWrites(TorchDispatchMode):
    """Calls and bytes written into any of `pools` (tensors whose storage is watched)."""

    def __init__(self, pools):
        super().__init__()
        self.pools, self.calls, self.bytes = pools, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in WRITES and any(p is not None and args[0].untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                                  for p in self.pools()):
            self.calls += 1
            src = args[-1] if func is torch.ops.aten.index_copy_.default else args[1]
            self.bytes += src.numel() * src.element_size() if isinstance(src, torch.Tensor) else 0
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("copies") / "m.gguf", arch="llama", n_kv_heads=2)


def test_a_retrieval_copies_each_heads_own_blocks_in_one_batch(tiny):
    engine = Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 1000)]
    engine.prefill(ids[:512])
    memory, n_kv = engine.memory, engine.spec.n_kv_heads
    pair_bytes = 2 * SMALL.block_size * engine.spec.head_dim * memory.kv_dtype.itemsize
    per_layer_limit = n_kv * SMALL.top_k_blocks * pair_bytes  # the pairs one retrieval selects
    split = 0  # forwards where the heads of a layer chose different blocks
    for start in range(512, 1000, 16):
        with PoolWrites(lambda: [layer.cache.slots for layer in memory.layers]) as writes:
            engine.forward(ids[start : start + 16])
        assert writes.bytes <= len(memory.layers) * per_layer_limit, writes.bytes
        assert writes.calls <= len(memory.layers), writes.calls  # one batched write per layer
        split += any(len({tuple(row) for row in layer.selection.tolist()}) > 1 for layer in memory.layers)
    assert split > 0 and memory.layers[0].cache.misses > 0, "the heads never disagreed: the test proves nothing"


def test_cache_holds_exactly_the_pairs_fetched():
    store = HostBlockStore(n_kv_heads=4, head_dim=8, block_size=4, device=torch.device("cpu"), host_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        store.append(torch.randn(4, 4 * 40, 8, generator=gen), torch.randn(4, 4 * 40, 8, generator=gen))
        cache = BlockCache(capacity=8, device=torch.device("cpu"), dtype=torch.float32)
        selection = torch.tensor([[1, 35], [2, 3], [1, 39], [0, 2]])  # (n_kv, k): blocks in two host segments
        pairs = [b * 4 + h for h, row in enumerate(selection.tolist()) for b in row]
        slots = cache.fetch(pairs, store)
        k, v = cache.kv(torch.tensor(slots).reshape(4, 2))
    for h, row in enumerate(selection.tolist()):
        want_k = torch.cat([store.block(b)[0][h] for b in row])
        want_v = torch.cat([store.block(b)[1][h] for b in row])
        assert torch.equal(k[h], want_k) and torch.equal(v[h], want_v)
    assert cache.copied_bytes == 8 * 2 * 4 * 8 * 4  # 8 pairs, not 6 distinct blocks x 4 heads
    assert cache.copy_calls == 2 + 2  # a gather per host segment, the copy and the scatter


def test_blocks_are_scored_in_float32_under_bfloat16_compute():
    """Issue 21, defect 9: bfloat16 scores tied blocks whose keys differ past its 8-bit mantissa."""
    from edgectx.memory.retrieval import select_blocks

    q = torch.ones(1, 1, 1, dtype=torch.bfloat16)  # (n_heads, T, d)
    reps = torch.tensor([[[1.0]], [[1.0 + 2**-9]]], dtype=torch.float16)  # (n_blocks, n_kv, d): equal in bfloat16
    blocks, _ = select_blocks(q, reps, n_eligible=2, top_k=1)
    assert blocks.tolist() == [[1]]


def test_a_bfloat16_memory_keeps_its_host_store_in_bfloat16(tiny):
    """No conversion on every retrieval (and no float16 overflow): the host store, the block pool and the tiers
    share the compute dtype when it is bfloat16."""
    from edgectx.memory.context import ContextMemory

    engine = Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16")
    memory = ContextMemory(engine.spec, engine.rope, engine.device, torch.bfloat16, SMALL, kv_dtype=torch.bfloat16)
    layer = memory.layers[0]
    assert layer.store.host_dtype == layer.cache.dtype == torch.bfloat16
    with torch.inference_mode():
        big = torch.full((engine.spec.n_kv_heads, 40, engine.spec.head_dim), 1e5, dtype=torch.bfloat16)
        layer.store.append(big, big)  # past float16's 65504
    assert bool(layer.store.tokens(0, 40)[0].isfinite().all())


def test_a_cache_of_top_k_blocks_worth_of_pairs_gives_the_same_logits_as_a_big_one(tiny):
    """The smallest pool (top_k blocks' worth of pairs: a retrieval's top_k pairs for every KV head) holds each
    retrieval whole; refetching more often changes no logit."""
    from dataclasses import replace

    ids = [int(i) for i in np.random.default_rng(1).integers(0, 258, 700)]
    logits = []
    for blocks in (SMALL.top_k_blocks, 64):
        engine = Engine.load(tiny, device="cpu", memory_config=replace(SMALL, cache_blocks=blocks), weights="fp16")
        assert engine.memory.cache_blocks == blocks
        out = [engine.prefill(ids[:600])]
        out += [engine.forward([token])[-1] for token in ids[600:]]
        logits.append(torch.stack(out))
        misses = engine.memory.layers[0].cache.misses
        assert blocks == 64 or misses > 0
    assert torch.equal(logits[0], logits[1])


def test_on_a_cpu_auto_gathers_from_the_store_with_no_cache_and_the_same_logits(tiny):
    """A CPU's host store is in the memory the context is built in: "auto" keeps no block cache (a third copy of
    the blocks), and a retrieval gathers each head's blocks from the store's segments straight into the context,
    with the logits of a memory that copies them through a cache. The store holds several segments (blocks of one
    retrieval come from different ones)."""
    from dataclasses import replace

    ids = [int(i) for i in np.random.default_rng(2).integers(0, 258, 1400)]
    logits, engines = [], []
    for blocks in ("auto", 64):
        engine = Engine.load(tiny, device="cpu", memory_config=replace(SMALL, cache_blocks=blocks), weights="fp16")
        out = [engine.prefill(ids[:1300])]
        out += [engine.forward([token])[-1] for token in ids[1300:]]
        logits.append(torch.stack(out))
        engines.append(engine)
    auto, cached = engines
    assert auto.memory.cache_blocks == 0 and all(layer.cache.slots is None for layer in auto.memory.layers)
    assert auto.memory.stats()["device_block_cache_bytes"] == 0
    assert cached.memory.layers[0].cache.misses > 0  # the cached memory did retrieve through its cache
    store = auto.memory.layers[0].store
    assert len(store.segments) > 1, "one host segment: the gather across segments went untested"
    segments = {int(b) // store.segment_blocks for layer in auto.memory.layers for b in layer.selection.flatten()}
    assert len(segments) > 1, "every retrieved block came from one segment"
    assert torch.equal(logits[0], logits[1])


def test_a_gather_by_host_ids_gives_each_head_its_own_blocks_across_segments():
    store = HostBlockStore(n_kv_heads=3, head_dim=8, block_size=4, device=torch.device("cpu"))
    store.segment_blocks = 2  # ids 0-1, 2-3, 4-5 in three segments
    kv = torch.randn(2, 3, 24, 8).half()
    store.append(kv[0], kv[1])
    ids = [5, 0, 2, 2, 3, 1]  # (3 heads, 2 blocks), row-major
    k_out = torch.zeros(3, 2 * 4, 8, dtype=torch.float32)
    v_out = torch.zeros_like(k_out)
    store.gather_ids(ids, 3, k_out, v_out)
    for i, block in enumerate(ids):
        head, col = divmod(i, 2)
        want = kv[:, head, block * 4 : block * 4 + 4].float()
        assert torch.equal(k_out[head, col * 4 : col * 4 + 4], want[0])
        assert torch.equal(v_out[head, col * 4 : col * 4 + 4], want[1])


class _Streams:
    """Stand-ins for CUDA's streams and events that log what is queued where: the copy path's ordering is CUDA's
    alone (a CPU run takes the plain path), so this is the only place a CPU can check it."""

    def __init__(self):
        self.log: list[tuple] = []
        self.compute, self.copy = self.Stream("compute", self), self.Stream("copy", self)
        self.current = [self.compute]

    class Stream:
        def __init__(self, name, streams):
            self.name, self.streams = name, streams

        def wait_stream(self, other):
            self.streams.log.append(("wait", self.name, other.name))

        def wait_event(self, _event):
            self.streams.log.append(("wait_event", self.name))

    def install(self, monkeypatch):
        from contextlib import contextmanager

        from edgectx.memory import retrieval

        @contextmanager
        def stream(s):
            self.current.append(s)
            yield
            self.current.pop()

        log = self.log
        event = type("Event", (), {"record": lambda e, s=None: log.append(("record", (s or self.current[-1]).name)),
                                   "synchronize": lambda e: None})
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current[-1])
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Event", event)
        monkeypatch.setattr(retrieval, "upload", lambda t, device: (log.append(("upload", self.current[-1].name)), t)[1])
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: log.append(("record_stream", s.name, "index" if t.dtype == torch.long else "slots")))


def test_the_copy_stream_reads_the_slot_index_only_after_its_upload(monkeypatch):
    """Review of the CUDA path (never run on a GPU): the slots' index was uploaded on the compute stream *after*
    the copy stream's wait on it, then read on the copy stream: the scatter could read the index before it landed
    (an out-of-bounds assert that ends the process, or K/V in the wrong slots), and the index's memory could be
    handed to other work while the copy stream still read it. Now the wait covers the upload, and the index is
    recorded on the copy stream."""
    streams = _Streams()
    streams.install(monkeypatch)
    store = HostBlockStore(n_kv_heads=2, head_dim=8, block_size=4, device=torch.device("cpu"), host_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        store.append(torch.randn(2, 4 * 40, 8, generator=gen), torch.randn(2, 4 * 40, 8, generator=gen))
        cache = BlockCache(capacity=6, device=torch.device("cpu"), dtype=torch.float32, copy_stream=streams.copy)
        monkeypatch.setattr(cache, "_staging", lambda n, s: torch.empty(max(n, 16), 2, s.block_size, s.head_dim))
        for selection in ([[1, 35], [2, 3]], [[5, 35], [7, 39]]):  # the second: hits, misses, a slot reused
            pairs = [b * 2 + h for h, row in enumerate(selection) for b in row]
            slots = cache.fetch(pairs, store)
            k, _ = cache.kv(torch.tensor(slots).reshape(2, 2))
            for h, row in enumerate(selection):
                assert torch.equal(k[h], torch.cat([store.block(b)[0][h] for b in row]))
    log = streams.log
    uploads = [i for i, e in enumerate(log) if e == ("upload", "compute")]
    waits = [i for i, e in enumerate(log) if e == ("wait", "copy", "compute")]
    assert len(uploads) == len(waits) == 2, log
    assert all(u < w for u, w in zip(uploads, waits)), log  # each upload queued before the wait that covers it
    assert log.count(("record_stream", "copy", "index")) == 2, log
    assert log.count(("record", "copy")) == 2, log


def test_the_chat_stats_line_names_cached_blocks_only_where_there_is_a_cache(tiny):
    from dataclasses import replace

    from edgectx.cli.chat import memory_line

    ids = [int(i) for i in np.random.default_rng(3).integers(0, 258, 600)]
    lines = {}
    for blocks in ("auto", 8):
        engine = Engine.load(tiny, device="cpu", memory_config=replace(SMALL, cache_blocks=blocks), weights="fp16")
        engine.prefill(ids)
        lines[blocks] = memory_line(engine.stats())
    assert "cached blocks" not in lines["auto"] and "retained" in lines["auto"]
    assert "cached blocks" in lines[8]
