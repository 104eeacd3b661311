"""ContextMemory: exact under budget, retrieval finds what matches, cancellation and truncation stay consistent."""

from __future__ import annotations

import pytest
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.memory.block_store import HostBlockStore
from edgectx.engine import Cancelled
from edgectx.errors import UsageError
from edgectx.memory.context import ContextMemory
from edgectx.memory.config import MemoryConfig
from edgectx.model.rope import Rope
from edgectx.model.spec import ModelSpec

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)


@pytest.fixture
def engine(embedded_engine):
    yield embedded_engine
    embedded_engine.configure_memory(None)


def _teacher_forced(engine, ids, chunk):
    engine.reset()
    return torch.cat([engine.forward(ids[s : s + chunk], all_logits=True) for s in range(0, len(ids), chunk)])


def _greedy(engine, n):
    out, logits = [], engine._next_logits
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = engine.forward([token])[-1]
    return out, logits


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_memory_within_budget_is_full_attention(engine, positions):
    ids = corpus_tokens(engine.tokenizer, 400)
    engine.configure_memory(None)
    full = _teacher_forced(engine, ids, 128)
    engine.sync(ids)
    full_tokens, full_last = _greedy(engine, 4)
    engine.configure_memory(MemoryConfig.for_budget(1024, positions=positions))
    mem = _teacher_forced(engine, ids, 128)
    engine.sync(ids)
    mem_tokens, mem_last = _greedy(engine, 4)
    assert engine.stats()["evicted_tokens"] == 0
    assert torch.allclose(full, mem, atol=1e-4), (full - mem).abs().max()
    assert mem_tokens == full_tokens
    assert torch.allclose(full_last, mem_last, atol=1e-4)


def test_memory_over_budget_evicts_to_budget_and_keeps_every_token_on_host(engine):
    ids = corpus_tokens(engine.tokenizer, 640)
    engine.configure_memory(SMALL)
    engine.prefill(ids)
    stats = engine.stats()
    assert stats["host_tokens"] == 640
    assert stats["sink_tokens"] == 16 and stats["window_tokens"] >= 64
    assert stats["sink_tokens"] + stats["retained_tokens"] + stats["window_tokens"] <= SMALL.resident_tokens
    assert stats["evicted_tokens"] == 640 - (stats["sink_tokens"] + stats["retained_tokens"] + stats["window_tokens"])
    assert stats["host_kv_bytes"] >= 640 * engine.spec.kv_bytes_per_token(2)
    assert engine.retrieved_blocks(), "retrieval should have run once tokens were evicted"


def test_cancelled_prefill_leaves_a_usable_memory(engine):
    ids = corpus_tokens(engine.tokenizer, 512)
    engine.configure_memory(SMALL)
    whole = engine.prefill(ids)
    engine.reset()
    calls = []
    with pytest.raises(Cancelled):
        engine.prefill(ids, cancel=lambda: calls.append(1) or len(calls) > 5)
    assert engine.memory.n_tokens == len(engine.tokens) == 5 * SMALL.chunk_tokens
    resumed = engine.prefill(ids[len(engine.tokens) :])
    assert torch.allclose(whole, resumed, atol=1e-4), (whole - resumed).abs().max()


def test_truncate_inside_the_window_cuts_only_the_window(engine):
    ids = corpus_tokens(engine.tokenizer, 600)
    engine.configure_memory(SMALL)
    engine.prefill(ids)
    before = engine.memory.layers[3].resident
    keep = before.idx[:, : before.n] < 580
    expected_idx, expected_k = before.idx[:, : before.n][keep], before.k[:, : before.n][keep]
    engine.sync(ids[:580] + ids[590:600])  # an edited last turn: the cut lies in the window
    assert engine.memory.n_tokens == engine.memory.layers[3].store.n_tokens == 590
    after = engine.memory.layers[3].resident
    n_kept = expected_idx.numel() // after.n_kv
    assert torch.equal(after.idx[:, :n_kept].flatten(), expected_idx)
    assert torch.equal(after.k[:, :n_kept].reshape(-1, after.head_dim), expected_k)
    assert int(after.idx[0, after.n - 1]) == 589


def test_deep_truncate_rebuilds_a_consistent_memory(engine):
    ids = corpus_tokens(engine.tokenizer, 700)
    engine.configure_memory(SMALL)
    engine.prefill(ids)
    engine.sync(ids[:300] + ids[650:700])  # cut far behind the window, among retained tokens
    stats = engine.stats()
    assert stats["tokens"] == stats["host_tokens"] == 350
    resident = engine.memory.layers[0].resident
    idx = resident.idx[:, : resident.n]
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "resident tokens stay sorted and unique per head"
    assert int(idx.max()) == 349
    out, _ = _greedy(engine, 4)
    assert len(out) == 4


def _synthetic_memory(config: MemoryConfig) -> ContextMemory:
    spec = ModelSpec(arch="llama", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                     vocab_size=10, context_length=4096)
    return ContextMemory(spec, Rope(spec, torch.device("cpu")), torch.device("cpu"), torch.float32, config)


def _feed(memory: ContextMemory, k: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """Append keys k (1, T, 16) (values equal to keys) through the plan/commit cycle, as the model would."""
    n = k.shape[1]
    q = torch.randn(2, n, 16) * 0.1 if q is None else q
    memory.begin(n)
    memory.layers[0].attend(q, k, k.clone())
    memory.commit()


def test_planted_block_is_retrieved_across_turns_and_decode_steps():
    gen = torch.Generator().manual_seed(0)
    memory = _synthetic_memory(SMALL)
    direction = torch.zeros(16)
    direction[3] = 1.0
    for chunk in range(10):  # turn 1: 640 tokens; block 5 (tokens 160..191) carries the planted keys
        k = torch.randn(1, 64, 16, generator=gen) * 0.1
        if chunk == 2:
            k[:, 32:64] = direction * 4
        _feed(memory, k)
    layer = memory.layers[0]
    assert layer.evicted and memory.n_tokens == 640 == layer.store.n_tokens
    for _ in range(3):  # turn 2 grows the context with unrelated text
        _feed(memory, torch.randn(1, 64, 16, generator=gen) * 0.1)
    memory.record.clear()
    query = direction.expand(2, 1, 16) * 4
    for _ in range(6):  # turn 3 decodes with a query that matches the planted block
        _feed(memory, torch.randn(1, 1, 16, generator=gen) * 0.1, q=query)
    assert bool((layer.selection == 5).any())
    assert memory.record.top(1)[0]["start_token"] == 160


def test_memory_config_rejects_a_budget_too_small_for_its_tiers():
    with pytest.raises(UsageError, match="budget"):
        MemoryConfig(budget_tokens=300)
    with pytest.raises(UsageError, match="positions"):
        MemoryConfig(positions="relative")
    assert MemoryConfig.for_budget(512).n_retain > 0


def test_block_store_round_trips_across_segments():
    store = HostBlockStore(n_kv_heads=2, head_dim=8, block_size=4, device=torch.device("cpu"), host_dtype=torch.float32)
    store.segment_blocks = 3  # 12 tokens per segment, so appends cross segments
    k = torch.randn(2, 30, 8)
    for s in range(0, 30, 7):
        store.append(k[:, s : s + 7], -k[:, s : s + 7])
    assert store.n_tokens == 30 and store.n_blocks == 7 and len(store.segments) == 3
    bk, bv = store.block(4)
    assert torch.equal(bk, k[:, 16:20]) and torch.equal(bv, -k[:, 16:20])
    tk, _ = store.tokens(5, 27)
    assert torch.equal(tk, k[:, 5:27])
    assert torch.allclose(store.representatives[2].float(), k[:, 8:12].mean(dim=1), atol=1e-3)
    store.truncate(13)
    assert store.n_blocks == 3 and len(store.segments) == 2 and store.representatives.shape[0] == 3
    with pytest.raises(IndexError):
        store.block(3)


def test_causal_prefill_from_empty_matches_the_masked_kernel():
    from edgectx.model.kv import causal_attention, causal_mask, grouped_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, 300, 16, generator=gen) for h in (6, 2, 2))
    expected = grouped_attention(q, k, v, causal_mask(0, 300, 0, torch.device("cpu")))
    assert torch.allclose(causal_attention(q, k, v), expected, atol=1e-5)
    # The first token sees only itself: a kernel that ignored causality would not give back its value.
    assert torch.allclose(causal_attention(q, k, v)[:, 0], v.repeat_interleave(3, dim=0)[:, 0], atol=1e-5)


def test_one_chunk_prefill_matches_chunked_full_attention(engine, monkeypatch):
    # A float32 cache: the kernels differ by ~1e-5, which a float16 cache would round to its own step (0.02 here).
    monkeypatch.setenv("EDGECTX_KV_DTYPE", "float32")
    ids = corpus_tokens(engine.tokenizer, 300)
    engine.configure_memory(None)
    whole = _teacher_forced(engine, ids, 300)  # one chunk from empty: the unmasked causal kernel
    chunked = _teacher_forced(engine, ids, 100)  # later chunks: the masked kernel over past + new keys
    assert torch.allclose(whole, chunked, atol=1e-3), (whole - chunked).abs().max()


def _greedy_logits(engine, ids, n):
    """Prefill `ids`, then n greedy steps: the tokens chosen and the logits each was chosen from."""
    engine.reset()
    logits, tokens, rows = engine.prefill(ids), [], []
    for _ in range(n):
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        logits = engine.forward([tokens[-1]])[-1]
    return tokens, torch.stack(rows)


def test_cpu_kv_is_float16_and_decodes_as_float32_kv_does(engine, monkeypatch):
    """The CPU computes in float32 and keeps K and V in float16 (half the bytes, as llama.cpp's f16 KV); greedy
    decoding picks the same tokens as a float32 cache (measured over 32 steps: logits within 0.03)."""
    ids = corpus_tokens(engine.tokenizer, 300)
    runs = {}
    for kv in ("float32", "auto"):
        monkeypatch.setenv("EDGECTX_KV_DTYPE", kv)
        engine.configure_memory(None)
        runs[kv] = _greedy_logits(engine, ids, 32)
        layer = engine.memory.layers[0]
        assert layer.k.dtype == layer.v.dtype == (torch.float32 if kv == "float32" else torch.float16)
        elem_bytes = layer.k.element_size()
        assert engine.stats()["device_kv_bytes"] == (300 + 32) * engine.spec.kv_bytes_per_token(elem_bytes)
    (tokens32, logits32), (tokens16, logits16) = runs["float32"], runs["auto"]
    assert tokens16 == tokens32
    diff = float((logits16 - logits32).abs().max())
    assert 0 < diff < 0.1, diff  # rounded (not the float32 cache under another name), and close


def test_memory_tiers_are_float16_on_the_cpu_and_decode_as_float32_tiers_do(engine, monkeypatch):
    ids = corpus_tokens(engine.tokenizer, 640)
    runs, stats = {}, {}
    for kv in ("float32", "auto"):
        monkeypatch.setenv("EDGECTX_KV_DTYPE", kv)
        engine.configure_memory(SMALL)
        runs[kv] = _greedy_logits(engine, ids, 24)  # evicts on the way and retrieves every 4 steps
        stats[kv] = engine.stats()
        layer, want = engine.memory.layers[0], torch.float32 if kv == "float32" else torch.float16
        assert layer.evicted and layer.cache.slots is not None
        assert layer.resident.k.dtype == layer.resident.v.dtype == layer.cache.slots.dtype == want
        # the assembled context attention reads is float32 either way; activations and RoPE stay float32
        assert layer.asm.k.dtype == layer.asm.v.dtype == engine.memory.dtype == torch.float32
    assert runs["auto"][0] == runs["float32"][0]
    # The tiers' K and V halve (their token indices and scores do not); the assembled context does not.
    for name in ("device_resident_bytes", "device_block_cache_bytes"):
        assert stats["auto"][name] < 0.6 * stats["float32"][name], name
    assert stats["auto"]["device_work_bytes"] == stats["float32"]["device_work_bytes"]
    print("device KV bytes, float16 tiers / float32:", stats["auto"]["device_kv_bytes"] / stats["float32"]["device_kv_bytes"])
    assert stats["auto"]["host_kv_bytes"] == stats["float32"]["host_kv_bytes"]  # the host store was float16 already


def test_kv_dtype_setting():
    from edgectx.model.kv import kv_storage_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_storage_dtype("auto", cpu, torch.float32) == torch.float16
    assert kv_storage_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16  # a GPU's compute dtype is 16-bit already
    assert kv_storage_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    assert kv_storage_dtype("float32", cpu, torch.float32) == torch.float32
    with pytest.raises(UsageError, match="kv_dtype must be one of"):
        kv_storage_dtype("int8", cpu, torch.float32)


def test_a_rebuilt_context_takes_over_the_buffers_it_replaces():
    """Assembly(reuse=old): the same buffers (addresses a captured CUDA graph baked in), the data a fresh build
    has; a validity buffer kept all true where no column needs masking, and fresh buffers when the old are small."""
    from edgectx.memory.tiers import Assembly

    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 40, 8, generator=gen), torch.randn(2, 40, 8, generator=gen)
    idx = torch.arange(40).expand(2, 40)
    valid = torch.rand(2, 40, generator=gen) > 0.3
    first = Assembly(k, v, idx, valid, 40, ("a",), n_resident=30, headroom=10)
    first.write(40, k[:, :3], v[:, :3], idx[:, :3])  # scratch the next build overwrites
    second = Assembly(k[:, :32] * 2, v[:, :32], idx[:, :32], None, 32, ("b",), n_resident=20, headroom=10, reuse=first,
                      always_valid=True)
    fresh = Assembly(k[:, :32] * 2, v[:, :32], idx[:, :32], None, 32, ("b",), n_resident=20, headroom=10)
    assert second.k.data_ptr() == first.k.data_ptr() and second.capacity == first.capacity == 50
    assert torch.equal(second.k[:, :32], fresh.k[:, :32]) and torch.equal(second.v[:, :32], fresh.v[:, :32])
    assert second.valid is None and fresh.valid is None  # attention needs no mask: none is made
    assert second.valid_buffer.data_ptr() == first.valid.data_ptr() and bool(second.valid_buffer.all())
    third = Assembly(k, v, idx, valid, 40, ("c",), n_resident=30, headroom=10, reuse=second)
    assert third.valid.data_ptr() == first.valid.data_ptr() and torch.equal(third.valid[:, :40], valid)
    assert bool(third.valid[:, 40:].all())
    bigger = Assembly(torch.randn(2, 60, 8), torch.randn(2, 60, 8), torch.arange(60).expand(2, 60), None, 60, ("d",),
                      n_resident=60, headroom=10, reuse=third)
    assert bigger.k.data_ptr() != first.k.data_ptr() and bigger.capacity == 70


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_eviction_observes_every_strideth_recent_query(engine, stride, monkeypatch):
    """`observe_stride`: each softmax row sums to 1, so the mass an evicting chunk observes per KV head sums to the
    observed query rows: group x ceil(n_observe / stride)."""
    config = MemoryConfig(**{**SMALL.to_dict(), "scorer": "attention", "observe_stride": stride})
    engine.configure_memory(config)
    seen = []
    layer = engine.memory.layers[0]
    observe = type(layer)._observe
    monkeypatch.setattr(type(layer), "_observe", lambda self, q, asm, n: seen.append(observe(self, q, asm, n)) or seen[-1])
    engine.forward(corpus_tokens(engine.tokenizer, 400)[:384])
    assert len(seen) >= engine.spec.n_layers, "no chunk evicted: the test proves nothing"
    group = engine.spec.n_heads // engine.spec.n_kv_heads
    expected = group * -(-config.n_observe // stride)
    for mass in seen:
        assert torch.allclose(mass.sum(dim=1), torch.full((engine.spec.n_kv_heads,), float(expected)), atol=1e-3)


def test_a_decode_steps_eviction_observes_only_the_steps_since_the_last(engine, monkeypatch):
    """A one-token step's eviction observes the last `evict_every` queries (every `observe_stride`th), not the whole
    `n_observe` window: the older ones were observed by the eviction before."""
    config = MemoryConfig(**{**SMALL.to_dict(), "scorer": "attention", "n_observe": 64, "observe_stride": 2,
                             "evict_every": 8})
    engine.configure_memory(config)
    engine.forward(corpus_tokens(engine.tokenizer, 400)[:384])  # chunks of 64 past the budget: evicting
    seen = []
    layer = engine.memory.layers[0]
    observe = type(layer)._observe
    monkeypatch.setattr(type(layer), "_observe", lambda self, q, asm, n: seen.append(observe(self, q, asm, n)) or seen[-1])
    _greedy(engine, 2 * config.evict_every + 2)
    assert len(seen) >= 2, "no decode step evicted: the test proves nothing"
    group = engine.spec.n_heads // engine.spec.n_kv_heads
    expected = group * config.evict_every // config.observe_stride  # not n_observe // observe_stride
    for mass in seen:
        assert torch.allclose(mass.sum(dim=1), torch.full((engine.spec.n_kv_heads,), float(expected)), atol=1e-3)


def test_a_decode_steps_eviction_is_one_of_its_retrievals(engine, monkeypatch):
    """Decode steps evict every `evict_every`th step, and that step's rebuild retrieves: with `retrieve_every` dividing
    `evict_every`, every rebuild of the context is a retrieval's (no second rebuild a few steps after an eviction)."""
    engine.configure_memory(SMALL)
    engine.forward(corpus_tokens(engine.tokenizer, 400)[:384])  # chunks of 64 past the budget: evicting
    layer = engine.memory.layers[0]
    events = []
    def watch(name):
        method = getattr(type(layer), name)

        def watched(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            if self is layer and (name != "_retrieve" or self._record_now):  # a retrieval that selected blocks
                events.append((name, engine.memory.n_tokens))
            return out
        monkeypatch.setattr(type(layer), name, watched)
    for name in ("_build", "_evict", "_retrieve"):
        watch(name)
    _greedy(engine, 3 * SMALL.evict_every + 1)
    evictions = [n for name, n in events if name == "_evict"]  # at a commit: the step's retrieval counts one more
    assert len(evictions) >= 2, "no decode step evicted: the test proves nothing"
    assert all(b - a == SMALL.evict_every for a, b in zip(evictions, evictions[1:]))
    retrievals = [n for name, n in events if name == "_retrieve"]
    assert {n + 1 for n in evictions} <= set(retrievals), "an eviction that did not retrieve"
    # the first step rebuilds the context the prefill's last chunk evicted from; after it, only retrievals rebuild
    builds = [n for name, n in events if name == "_build"][1:]
    assert set(builds) <= set(retrievals), "a rebuild without a retrieval"


def test_decode_steps_rebuild_their_context_in_the_same_buffers(engine):
    """Every retrieval and eviction among decode steps rebuilds each layer's context; from the prefill's end on, they
    all take over the buffers already there (room for the tokens decode adds before the next eviction), rather than
    allocating a context per retrieval."""
    engine.configure_memory(SMALL)
    engine.prefill(corpus_tokens(engine.tokenizer, 400)[:384])
    layers = engine.memory.layers
    builds, buffers = [], set()
    build = type(layers[0])._build

    def counting(self, *args, **kwargs):
        builds.append(1)
        return build(self, *args, **kwargs)

    type(layers[0])._build = counting
    try:
        for _ in range(3 * SMALL.evict_every):
            _greedy(engine, 1)
            buffers.update(layer.asm.k.data_ptr() for layer in layers)
    finally:
        type(layers[0])._build = build
    assert len(builds) >= 4 * len(layers), "few rebuilds: the test proves nothing"
    assert len(buffers) == len(layers)


def test_observe_stride_must_be_positive():
    with pytest.raises(UsageError, match="observe_stride must be positive"):
        MemoryConfig(observe_stride=0)
