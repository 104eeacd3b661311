"""Host syncs per decode step, counted on the CPU with tests/sync_counter.py (issue 21, defect 1).

A decode step that reads a value back from the GPU waits for every kernel queued before it: the host cannot run
ahead, and the step cannot be captured in a CUDA graph. The full-attention step (rope, KV cache, the model) makes
none; the sampler's read of the logits is the one sync per token. The long-context memory, on its device path
(what CUDA runs; a CPU memory runs it with `device_bookkeeping=True`), makes none in a steady decode step nor in a
prefill chunk past the budget (its retrieved blocks are gathered by ids on the device, HostBlockStore.gather); a
prefill's end reads every layer's block ids and position count at once; a decode retrieval (and the first step
after an eviction) reads the block ids and what a rebuild needs once per layer.
The lexical index's reads are of host tensors (token ids) on every device and are left out of the counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgectx.engine import Engine
from edgectx.memory.block_store import HostBlockStore
from edgectx.memory.config import MemoryConfig
from edgectx.memory.context import ContextMemory
from edgectx.model.rope import Rope
from edgectx.model.sampling import Sampler, SamplingParams
from edgectx.model.synthetic import SYNTHETIC
from sync_counter import SyncCounter
from tiny_gguf import write_tiny_gguf

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)


def test_the_counter_sees_every_kind_of_sync():
    x = torch.arange(10)
    with torch.inference_mode(), SyncCounter() as syncs:
        int(x.max()), bool((x > 3).any()), x.sum().item(), x.tolist(), x.cpu(), x.to("cpu", torch.float32)
        x.nonzero(), torch.unique(x), torch.equal(x, x)
        (x + 1) * 2, x[2:5], torch.cat((x, x))  # no sync
    assert syncs.by_kind == {"_local_scalar_dense": 3, "tolist": 1, "cpu": 1, "to cpu": 1, "nonzero": 1, "_unique2": 1,
                             "equal": 1}, syncs.by_kind
    assert all("test_host_syncs.py" in site for site in syncs.sites)


def test_rope_tables_for_known_positions_need_no_sync():
    rope = Rope(SYNTHETIC["tiny"], torch.device("cpu"))
    rope.reserve(8192)  # growing the tables is a copy to the device (counted on a CPU as one to the CPU), once per doubling
    with torch.inference_mode(), SyncCounter() as syncs:
        rope.range_tables(900, 1, torch.float32)
        rope.range_tables(5000, 1, torch.float32)
        rope.tables(torch.tensor([3, 7000]), torch.float32, n_positions=7001)
    assert syncs.total == 0, syncs.sites
    with torch.inference_mode(), SyncCounter() as syncs:
        rope.tables(torch.tensor([3, 7]), torch.float32)  # the bound from the data: the one sync left, documented
    assert syncs.total == 1
    gathered = rope.tables(torch.arange(4990, 5003), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(rope.range_tables(4990, 13, torch.float32), gathered))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("syncs") / "m.gguf", arch="llama", n_kv_heads=2)


def _step_syncs(engine: Engine, n_steps: int) -> list[SyncCounter]:
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 900)]
    engine.prefill(ids)
    sampler = Sampler(SamplingParams(temperature=0))
    token, counts = sampler.sample(engine.next_logits), []
    for _ in range(n_steps):
        with SyncCounter() as syncs:
            logits = engine.forward([token])
        counts.append(syncs)
        token = sampler.sample(logits[-1])
    return counts


def test_full_attention_decode_step_makes_no_host_sync_besides_sampling(tiny):
    engine = Engine.load(tiny, device="cpu", n_ctx=2048, weights="fp16")
    counts = _step_syncs(engine, 6)
    assert [c.total for c in counts] == [0] * 6, [dict(c.sites) for c in counts]
    with torch.inference_mode(), SyncCounter() as sampling:
        Sampler(SamplingParams(temperature=0)).sample(engine.next_logits)
    assert sampling.total >= 1  # the sampled token: the one read-back a token needs


def _device_path(engine: Engine) -> Engine:
    """The engine with a fresh memory that keeps its bookkeeping on the device, as on CUDA (staged block store,
    facts read with the block ids): on a CPU the counter then sees the syncs a GPU run would make."""
    old = engine.memory
    engine.memory = ContextMemory(engine.spec, engine.rope, engine.device, engine.dtype, engine.memory_config,
                                  kv_dtype=engine.kv_dtype, scorer=old.scorer, device_bookkeeping=True)
    return engine


def _kinds(counts: list[SyncCounter]) -> list[int]:
    """Per step, the syncs outside the lexical index (host token ids, CPU tensors on every device: its reads
    never wait for a GPU)."""
    return [sum(n for site, n in c.sites.items() if "memory/lexical.py" not in site.split(" < ")[0]) for c in counts]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_memory_decode_steps_make_no_sync_and_a_retrieval_one(tiny, positions):
    """Issue 21, defect 1: in steady state a memory decode step reads nothing back; a step that retrieves (ahead, at
    its commit, for the next step; or after an eviction) reads every layer's block ids and position counts in one
    go. Before the fix: 2 per layer every step (the block store's copy to the host, the selection's `tolist`),
    ~7 per layer on retrieval steps; then one per layer on retrieval steps."""
    config = MemoryConfig(**{**SMALL.to_dict(), "positions": positions})
    engine = _device_path(Engine.load(tiny, device="cpu", memory_config=config, weights="fp16"))
    counts = _step_syncs(engine, 20)
    per_step = _kinds(counts)
    retrieval_steps = [i for i, c in enumerate(counts) if any("lexical" in site for site in c.sites)]
    assert len(retrieval_steps) >= 4, "the memory hardly retrieved: the test proves little"
    for step, n in enumerate(per_step):
        sites = {site for site in counts[step].sites if "lexical" not in site}
        assert n == (1 if step in retrieval_steps else 0), (step, sites)
        assert all("_read_device_state" in site or "context.py" in site for site in sites), sites


def test_device_bookkeeping_changes_no_logit(tiny):
    """The device path (what CUDA runs) and the CPU's plain path give the same logits: bit for bit through the
    prefill; in decode steps after a retrieval to float32 rounding (~1e-5 at logits near 50), as the device path
    masks duplicate columns without reading whether there are any (an all-true mask takes another sum order)."""
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 258, 700)]
    logits = []
    for device_path in (False, True):
        engine = Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16")
        if device_path:
            _device_path(engine)
        engine.prefill(ids[:600])
        out = [engine.next_logits]
        for token in ids[600:]:
            out.append(engine.forward([token])[-1])
        logits.append(torch.stack(out))
        assert engine.memory.stats()["evicted_tokens"] > 0
    assert torch.equal(logits[0][0], logits[1][0])
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_device_counted_positions_stay_below_their_host_bound(tmp_path):
    """Compact positions counted on the device (a chunk's retrieval) number the distinct tokens of every head's
    columns: heads that retain tokens of their own make more of them than the context has columns. The host bound
    the rotary tables are sized by must hold anyway (it was the context's length: the tables were indexed past their
    end, an IndexError on a CPU and a device-side assert on CUDA, on a synthetic Llama-3.1-8B's first 2,048-token
    chunk past the budget); the logits are the plain path's, which reads the count."""
    model = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_heads=8, n_kv_heads=8, dim=128)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 258, 1100)]
    logits, overshoot = [], []
    for device_path in (False, True):
        engine = Engine.load(model, device="cpu", memory_config=SMALL, weights="fp16")
        if device_path:
            _device_path(engine)
        engine.prefill(ids[:640])
        out = []
        for start in range(640, 1024, 64):
            out.append(engine.forward(ids[start : start + 64]))
            for layer in engine.memory.layers if device_path else ():
                asm = layer.asm
                assert isinstance(asm.next_position, torch.Tensor)  # counted on the device, not read yet
                position = int(asm.next_position)
                assert position <= asm.position_bound(0), (position, asm.position_bound(0))
                overshoot.append(position - asm.length)
        with torch.inference_mode():  # as Engine.prefill calls it
            engine.memory.ready()
        out += [engine.forward([token]) for token in ids[1024:]]
        logits.append(torch.cat(out))
    assert max(overshoot) > 64, overshoot  # past the old bound (length + a chunk): the case this test is about
    n_chunks = len(range(640, 1024, 64))
    assert torch.equal(logits[1][:n_chunks], logits[0][:n_chunks])
    # decode steps after a retrieval: to float32 rounding (test_device_bookkeeping_changes_no_logit), at logits near 100
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=2e-3)
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))


def _chunk_syncs(engine: Engine) -> list[SyncCounter]:
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 900)]
    engine.prefill(ids[:640])
    counts = []
    for start in range(640, 900, 64):
        with SyncCounter() as syncs:
            engine.forward(ids[start : start + 64])
        counts.append(syncs)
    assert engine.memory.stats()["evicted_tokens"] > 0
    return counts


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_memory_prefill_chunk_reads_nothing_back(tiny, positions):
    """Issue 21: a prefill chunk past the budget retrieves for every layer and reads nothing back (was one read of
    the block ids per layer; before that 15-17 per chunk on this 2-layer model). Its blocks come from the host
    store by ids on the device; the prefill's end reads every layer's ids and position count in one go."""
    config = dataclasses.replace(SMALL, positions=positions)
    engine = _device_path(Engine.load(tiny, device="cpu", memory_config=config, weights="fp16"))
    counts = _chunk_syncs(engine)
    assert _kinds(counts) == [0] * len(counts), [dict(c.sites) for c in counts]
    layers = engine.memory.layers
    assert all(layer._selection is None and layer._selection_d.shape[1] == SMALL.top_k_blocks for layer in layers)
    pending = sum(isinstance(layer.asm.next_position, torch.Tensor) for layer in layers)
    assert pending == (len(layers) if positions == "compact" else 0)
    with torch.inference_mode(), SyncCounter() as syncs:  # as Engine.prefill calls it
        engine.memory.ready()
    assert _kinds([syncs]) == [1], dict(syncs.sites)
    assert all(layer._selection is not None and isinstance(layer.asm.next_position, int) for layer in layers)


def test_without_the_gather_kernel_a_chunk_reads_its_block_ids(tiny, monkeypatch):
    """Where the kernel cannot read pinned memory (its probe failed), a chunk's retrieval copies as before: one
    read of the block ids per layer, with the same logits (to rounding in decode steps)."""

    ids = [int(i) for i in np.random.default_rng(2).integers(0, 258, 700)]
    logits = []
    for gather in (True, False):
        monkeypatch.setattr(HostBlockStore, "device_gather", property(lambda self: gather))
        engine = _device_path(Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16"))
        if not gather:
            counts = _chunk_syncs(engine)
            assert _kinds(counts) == [engine.spec.n_layers] * len(counts), [dict(c.sites) for c in counts]
            engine = _device_path(Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16"))
        engine.prefill(ids[:600])
        logits.append(torch.stack([engine.next_logits] + [engine.forward([t])[-1] for t in ids[600:]]))
    assert torch.equal(logits[0][0], logits[1][0])  # decode steps: to rounding (test_device_bookkeeping_changes_no_logit)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


@torch.inference_mode()  # as the engine runs it
def test_staged_block_store_matches_the_plain_one_without_a_sync():
    """The CUDA store stages K and V on the device and flushes whole blocks (defect 1: was a blocking copy to the
    host per layer and token). Forced on a CPU, it holds what the plain store holds, appends without a sync, and
    its truncation and partial block read back right."""

    gen = torch.Generator().manual_seed(0)
    plain, staged = (HostBlockStore(2, 8, 4, torch.device("cpu"), staged=s) for s in (False, True))
    for n in (3, 1, 1, 6, 1, 9):
        k, v = torch.randn(2, n, 8, generator=gen), torch.randn(2, n, 8, generator=gen)
        plain.append(k, v)
        with SyncCounter() as syncs:
            staged.append(k, v)
        assert syncs.total == 0, syncs.sites
    assert torch.equal(plain.representatives, staged.representatives)
    for store in (plain, staged):
        store.truncate(14)
    k, v = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    plain.append(k, v), staged.append(k, v)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens(0, 19), staged.tokens(0, 19)))
    assert torch.equal(plain.representatives, staged.representatives) and staged.n_blocks == 4


@torch.inference_mode()
def test_staged_store_flushes_a_chunks_whole_blocks_together_across_segments():
    """A prefill chunk's whole blocks skip the staging buffers: laid out once, one copy per host segment they
    touch (was three copies and a representative per block: 16 flushes for a 2,048-token chunk on the GPU path),
    with the same tokens and representatives as the plain store, a partial block before and after them."""
    from torch.utils._python_dispatch import TorchDispatchMode


    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func is torch.ops.aten.copy_.default
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(1)
    plain, staged = (HostBlockStore(2, 8, 4, torch.device("cpu"), staged=s) for s in (False, True))
    for store in (plain, staged):
        store.segment_blocks = 3  # blocks 0-2, 3-5, 6-8, ...
    for n in (2, 30, 16, 3):  # 2 + 30: a partial block, then 7 whole ones over three segments, then 2 tokens
        k, v = torch.randn(2, n, 8, generator=gen), torch.randn(2, n, 8, generator=gen)
        plain.append(k, v)
        Copies.n = 0
        with Copies():
            staged.append(k, v)
        if n == 16:  # at a block's start: 4 whole blocks (8-11, in segments 2 and 3): 2 copies to lay out, 2 out
            assert Copies.n == 4, Copies.n
    assert staged.n_blocks == plain.n_blocks == 12 and len(staged.segments) == 4  # the partial block: staged
    assert torch.equal(plain.representatives, staged.representatives)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens(0, 51), staged.tokens(0, 51)))


def test_a_snapshot_taken_while_a_chunks_retrieval_is_on_the_device_restores_exactly(tiny, tmp_path):
    """Block ids and position counts left on the device by a chunk (no prefill end has read them) are read when a
    snapshot needs them: the restored memory (the CPU's plain path) goes on with the same logits."""
    live = _device_path(Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16"))
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 258, 760)]
    live.prefill(ids[:640])
    live.forward(ids[640:704])
    assert all(layer._selection is None for layer in live.memory.layers)
    info = live.snapshot(tmp_path / "doc.edgectxs", codec="fp16")
    restored = Engine.load(tiny, device="cpu", weights="fp16")
    restored.restore(info.path)
    assert torch.equal(restored.next_logits, live.next_logits)
    for token in ids[704:]:  # the plain path against the device path: to rounding (test_device_bookkeeping_...)
        torch.testing.assert_close(restored.forward([token])[-1], live.forward([token])[-1], rtol=0, atol=1e-4)


def test_a_device_path_memory_restored_from_a_snapshot_goes_on_bit_for_bit(tiny, tmp_path, monkeypatch):
    """Restored into a memory on the device path (as on CUDA), a snapshot's contexts are built as the live ones
    were (blocks gathered by ids, duplicates masked): the same logits bit for bit, and no block cache on either."""
    init = ContextMemory.__init__

    def device_path(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "device_bookkeeping": True})

    monkeypatch.setattr(ContextMemory, "__init__", device_path)
    live = Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 258, 760)]
    live.prefill(ids[:700])
    info = live.snapshot(tmp_path / "doc.edgectxs", codec="fp16")
    restored = Engine.load(tiny, device="cpu", weights="fp16")
    restored.restore(info.path)
    assert restored.memory.device_bookkeeping and torch.equal(restored.next_logits, live.next_logits)
    for token in ids[700:]:  # decode retrieves every 4th step and evicts every 16th
        assert torch.equal(restored.forward([token])[-1], live.forward([token])[-1])
    assert restored.stats() == live.stats() and restored.stats()["device_block_cache_bytes"] == 0


@pytest.mark.parametrize("n_tokens", [0, 3, 16, 52, 130])  # empty, a partial block, whole blocks, across segments
def test_a_snapshot_loads_into_the_host_segments_without_a_device_round_trip(n_tokens):
    """Review of the CUDA path: a restore appended the snapshot's K and V, which on the staged store (CUDA) staged
    every token on the device and flushed it back, 1.3 GiB a layer at 128K tokens for an 8B model, before the
    representatives it computed on the way were replaced by the snapshot's. `load` writes the segments where they
    lie and takes the representatives given: the same store as appending, with nothing flushed."""
    gen = torch.Generator().manual_seed(n_tokens)
    k, v = torch.randn(2, n_tokens, 8, generator=gen), torch.randn(2, n_tokens, 8, generator=gen)
    for staged in (False, True):
        appended, loaded = (HostBlockStore(2, 8, 4, torch.device("cpu"), staged=staged) for _ in range(2))
        appended.segment_blocks = loaded.segment_blocks = 4  # 16 tokens a segment: several segments
        with torch.inference_mode():
            appended.append(k, v)
        flushes, flush = [], loaded._copy_out
        loaded._copy_out = lambda *a: flushes.append(a) or flush(*a)
        loaded.load(k, v, appended.representatives)
        assert not flushes  # nothing staged on the device and copied back
        assert loaded.n_tokens == n_tokens and loaded.n_blocks == appended.n_blocks
        assert all(torch.equal(a, b) for a, b in zip(loaded.tokens(0, n_tokens), appended.tokens(0, n_tokens)))
        assert torch.equal(loaded.representatives, appended.representatives)
        more = torch.randn(2, 7, 8, generator=gen)  # and both go on alike from there (the partial block's stage)
        with torch.inference_mode():
            appended.append(more, -more), loaded.append(more, -more)
        assert all(torch.equal(a, b) for a, b in zip(loaded.tokens(0, n_tokens + 7), appended.tokens(0, n_tokens + 7)))
        assert torch.equal(loaded.representatives, appended.representatives)
    with pytest.raises(ValueError, match="empty store"):
        loaded.load(k, v, appended.representatives)
