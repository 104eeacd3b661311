"""Block retrieval through the device cache returns exactly the host store's blocks (one batch of copies per
retrieval, asynchronous on CUDA); "auto" sizes the cache from free device memory; `bench speed --synthetic`."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from edgectx.memory import device as device_memory
from edgectx.bench.synthetic_speed import full_attention_bytes, plan_full
from edgectx.cli.main import run
from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.model.transformer import Transformer
from edgectx.model.spec import ModelSpec
from tiny_gguf import write_tiny_gguf

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)
LLAMA_8B = ModelSpec(arch="llama", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                     vocab_size=128256, context_length=131072)


class PlainCache:
    """The reference: every fetched block copied to its own tensor, each head's blocks concatenated in Python,
    handed back in the compute dtype as BlockCache.kv does (the host store holds fp16; CUDA computes in bf16)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.kv_dtypes: set[torch.dtype] = set()
        self.held: list[torch.Tensor] = []
        self.hits = self.misses = 0
        self.capacity = 1 << 30

    def blocks(self, n_kv_heads):
        return []

    def fetch(self, pairs, store):  # (block, KV head) pairs, `block * n_kv + head`
        first, n_kv = len(self.held), store.n_kv_heads
        self.held += [store.slab(p // n_kv)[:, p % n_kv].clone() for p in pairs]
        return list(range(first, len(self.held)))

    def ready(self):
        pass

    def kv(self, slots):
        pick = [[self.held[s] for s in row] for row in slots.tolist()]  # (2, block_size, d) each
        out = tuple(torch.stack([torch.cat([p[i] for p in row]) for row in pick]).to(slots.device, self.dtype) for i in (0, 1))
        self.kv_dtypes.update(t.dtype for t in out)
        return out

    def kv_into(self, slots, k_out, v_out):  # as BlockCache.kv_into: kv's result written into the context's columns
        k, v = self.kv(slots)
        k_out.copy_(k), v_out.copy_(v)

    def clear(self):
        pass


def _logits(path, device: str, config: MemoryConfig, patch=None) -> tuple[torch.Tensor, Engine]:
    engine = Engine.load(path, device=device, memory_config=config, weights="fp16")
    for layer in engine.memory.layers:
        if patch:
            patch(layer)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 900)]
    out = [engine.forward(ids[s : s + 64], all_logits=True) for s in range(0, len(ids), 64)]
    for _ in range(20):  # decode: retrievals every 4 steps
        out.append(engine.forward([int(out[-1][-1].argmax())], all_logits=True))
    return torch.cat(out).float().cpu(), engine


def _plain(layer):
    layer.cache = PlainCache(layer.cache.dtype)


@pytest.mark.parametrize("kv_dtype", [None, "float32"])  # float32: a compute-dtype cache over the fp16 host store, as on CUDA
def test_retrieval_through_a_churning_cache_equals_plain_copies(tmp_path, monkeypatch, kv_dtype):
    if kv_dtype:
        monkeypatch.setenv("EDGECTX_KV_DTYPE", kv_dtype)
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2)
    cached, engine = _logits(path, "cpu", SMALL)
    plain, plain_engine = _logits(path, "cpu", SMALL, patch=_plain)
    cache = engine.memory.layers[0].cache
    # the reference hands back what the real cache does, its own dtype, not the host store's fp16 (issue 21: on
    # CUDA, bf16 compute against fp16 blocks was SDPA's dtype error)
    assert plain_engine.memory.layers[0].cache.kv_dtypes == {cache.dtype}
    assert cache.dtype == (torch.float32 if kv_dtype else torch.float16)
    assert engine.stats()["evicted_tokens"] > 600 and engine.memory.layers[0].store.n_blocks == 28
    assert cache.capacity == 4 * 2 and cache.hits > 0 and cache.misses > 2 * cache.capacity  # slots were reused
    assert torch.equal(cached, plain)


@pytest.mark.gpu
def test_async_retrieval_on_cuda_matches_synchronous_copies(tmp_path, monkeypatch):
    """On CUDA retrieval reads the pinned store with the gather kernel (no block pool allocated); where the kernel
    cannot (forced here), through the cache's asynchronous copies, which equal synchronous and plain ones exactly,
    and the kernel's logits to rounding (its contexts mask duplicates without reading whether there are any)."""
    from edgectx.memory.block_store import HostBlockStore

    path = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2)
    gathered, engine = _logits(path, "cuda", SMALL)
    assert all(layer.gathers_on_device and layer.cache.slots is None for layer in engine.memory.layers)
    assert engine.retrieved_blocks(), "nothing was retrieved: the test proves nothing"
    monkeypatch.setattr(HostBlockStore, "device_gather", property(lambda self: False))
    asynchronous, engine = _logits(path, "cuda", SMALL)
    assert bool(gathered.isfinite().all()) and (gathered - asynchronous).abs().max() <= 0.02 * asynchronous.abs().max()
    assert (gathered.argmax(-1) == asynchronous.argmax(-1)).float().mean() >= 0.95
    layer = engine.memory.layers[0]
    assert layer.store.segments[0].is_pinned() and layer.cache.copy_stream is not None and layer.cache.misses > 8

    def synchronous(layer):
        layer.cache.copy_stream = None  # plain copies on the compute stream

    synced, _ = _logits(path, "cuda", SMALL, patch=synchronous)
    plain, _ = _logits(path, "cuda", SMALL, patch=_plain)
    assert bool(asynchronous.isfinite().all())
    assert torch.equal(asynchronous, synced) and torch.equal(asynchronous, plain)


@pytest.mark.gpu
def test_a_snapshot_restores_on_cuda_and_decodes_on_as_the_live_memory(tmp_path):
    """The restore path on CUDA (never run on a GPU before 2026-12-05's review): the store loaded straight into
    pinned segments and the staging buffer, no block pool, the contexts rebuilt on the device; the restored memory
    then decodes, through eviction, retrieval and the CUDA graph, as the live one does."""
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2)
    live = Engine.load(path, device="cuda", memory_config=SMALL, weights="fp16")
    ids = [int(i) for i in np.random.default_rng(6).integers(0, 258, 790)]
    live.prefill(ids[:700])
    info = live.snapshot(tmp_path / "doc.edgectxs", codec="fp16")
    restored = Engine.load(path, device="cuda", weights="fp16")
    restored.restore(info.path)
    memory = restored.memory
    assert memory.device_bookkeeping and memory.layers[0].store.segments[0].is_pinned()
    assert all(layer.cache.slots is None for layer in memory.layers)
    assert torch.equal(restored.next_logits, live.next_logits)
    for token in ids[700:]:
        want, got = live.forward([token])[-1], restored.forward([token])[-1]
        assert bool(got.isfinite().all()) and (got - want).abs().max() <= 0.02 * want.abs().max()
        assert int(got.argmax()) == int(want.argmax())
    assert restored.stats()["evicted_tokens"] == live.stats()["evicted_tokens"]
    assert restored.memory.layers[0].store.tokens(0, 790)[0].equal(live.memory.layers[0].store.tokens(0, 790)[0])


def test_auto_cache_is_none_on_cpu_and_sized_from_free_memory_on_cuda(monkeypatch):
    from edgectx.memory.context import ContextMemory
    from edgectx.model.rope import Rope

    spec = ModelSpec(arch="llama", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=10,
                     context_length=4096)
    cpu = torch.device("cpu")
    memory = ContextMemory(spec, Rope(spec, cpu), cpu, torch.float32, MemoryConfig())
    # on a CPU the host store is in the memory the context is built in: retrieval gathers from it, no cache
    assert MemoryConfig().cache_blocks == "auto" and memory.cache_blocks == 0 == memory.layers[1].cache.capacity
    assert memory.stats()["cache_capacity_blocks"] == 0
    fixed = ContextMemory(spec, Rope(spec, cpu), cpu, torch.float32, MemoryConfig(cache_blocks=40))
    assert fixed.cache_blocks == 40
    # Many KV heads: a pool of top_k blocks' worth of pairs holds a retrieval (was top_k x n_kv blocks at least)
    wide = ModelSpec(arch="llama", n_layers=2, dim=32, n_heads=32, n_kv_heads=32, head_dim=8, ffn_dim=64, vocab_size=10,
                     context_length=4096)
    small = ContextMemory(wide, Rope(wide, cpu), cpu, torch.float32, MemoryConfig(cache_blocks=4))
    assert small.cache_blocks == 4 and small.layers[0].cache.capacity == 4 * 32

    cuda = torch.device("cuda", 0)
    free = {"bytes": 8 << 30}
    monkeypatch.setattr(device_memory, "free_device_bytes", lambda device: free["bytes"])
    # 8 GiB - 3 * (2048 + 512) tokens * 128 KiB - 1 GiB headroom, a quarter of it, in 16 MiB blocks (all layers)
    assert device_memory.cache_capacity_blocks(MemoryConfig(), LLAMA_8B, cuda, torch.bfloat16) == 97
    free["bytes"] = 40 << 30
    assert device_memory.cache_capacity_blocks(MemoryConfig(), LLAMA_8B, cuda, torch.bfloat16) == device_memory.AUTO_CACHE_MAX_BLOCKS == 128
    free["bytes"] = 1 << 30
    assert device_memory.cache_capacity_blocks(MemoryConfig(), LLAMA_8B, cuda, torch.bfloat16) == 4  # top_k_blocks


def test_full_attention_estimate_matches_the_kv_cache_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECTX_KV_DTYPE", "float32")  # the estimate at 4 bytes an element, as a float32 cache holds
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2)
    engine = Engine.load(path, device="cpu", n_ctx=1024)
    engine.prefill([i % 258 for i in range(700)], chunk_tokens=64)
    engine.forward([1])
    held = sum(t.numel() * t.element_size() for layer in engine.memory.layers for t in (layer.k, layer.v))
    s = engine.spec
    layer_token_bytes = 2 * s.kv_dim * 4
    scratch = s.n_heads * 64 * 1024 * 4
    assert held == s.n_layers * 1024 * layer_token_bytes  # capacity doubled to 1024
    assert full_attention_bytes(s, 701, 4, 64) == held + 512 * layer_token_bytes + scratch

    # Llama-3.1-8B in bf16: 32K (+64 decoded) grows the cache to 64K tokens, 8 GiB; 128K would need 32 GiB.
    assert full_attention_bytes(LLAMA_8B, 32768 + 64, 2, 512) == (8 << 30) + (128 << 20) + (2 << 30)
    run_contexts, skipped = plan_full(LLAMA_8B, [131072, 32768], 64, 2, 512, free_bytes=19 << 30)
    assert run_contexts == [32768] and list(skipped) == [131072] and "GiB" in skipped[131072]


TINY = ModelSpec(arch="llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=300,
                 context_length=512)


def _fake_synthetic(monkeypatch):
    """A stand-in for edgectx.model.synthetic: one tiny spec, a Transformer with random weights."""
    def build_synthetic(name, device, dtype, weights=None):
        torch.manual_seed(0)
        return Transformer(TINY).to(device, dtype).eval(), TINY

    module = types.ModuleType("edgectx.model.synthetic")
    module.SYNTHETIC, module.build_synthetic = {"tiny": TINY}, build_synthetic
    monkeypatch.setitem(sys.modules, "edgectx.model.synthetic", module)


def test_bench_speed_synthetic_on_cpu_reports_speed_floor_and_memory(monkeypatch, capsys):
    monkeypatch.setenv("EDGECTX_KV_DTYPE", "float32")  # the KV byte counts below at 4 bytes an element
    _fake_synthetic(monkeypatch)
    assert run(["bench", "speed", "--synthetic", "tiny", "--context", "700,300", "--decode-tokens", "4", "--budget", "256",
                "--chunk", "128", "--full", "--device", "cpu", "--threads", "1", "--bandwidth-gbs", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = Transformer(TINY)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert result["weight_bytes"] == params and result["weight_read_bytes"] == params - TINY.vocab_size * TINY.dim * 4
    assert result["weight_read_floor_ms"] == pytest.approx(result["weight_read_bytes"] / 10e9 * 1e3)
    assert result["bandwidth_source"] == "flag" and result["cache_capacity_blocks"] == 0  # a CPU's: none
    assert result["retrieval_gathers_on_device"] is False  # a CPU memory reads its block ids on the host
    assert [r["context"] for r in result["runs"]] == [300, 700]
    for r in result["runs"]:
        for engine in ("edgectx_memory", "edgectx"):
            e = r[engine]
            assert e["peak_gpu_bytes"] is None and e["peak_gpu_reserved_bytes"] is None
            assert e["decode_ms_per_token"] > 0 and e["prefill_s"] > 0
            assert e["decode_floor_ratio"] == pytest.approx(e["decode_ms_per_token"] / result["weight_read_floor_ms"])
        # each engine holds the context and the 4 tokens decoded there: the memory on the host (fp16), full
        # attention on the device (float32 on a CPU)
        assert r["edgectx_memory"]["host_kv_bytes"] == (r["context"] + 4) * TINY.kv_bytes_per_token(2)
        assert r["edgectx"]["device_kv_bytes"] == (r["context"] + 4) * TINY.kv_bytes_per_token(4)
    last = result["runs"][-1]
    # prefilled: 300, then 700 - 304 (the 4 decoded tokens count toward the next context)
    assert last["edgectx_memory"]["prefill_tok_s"] == pytest.approx(696 / last["edgectx_memory"]["prefill_s"])


def test_bench_speed_synthetic_rejects_unknown_names_and_caps_without_cuda(monkeypatch):
    _fake_synthetic(monkeypatch)
    with pytest.raises(UsageError, match="No synthetic model named 'llama-9': choose one of tiny"):
        run(["bench", "speed", "--synthetic", "llama-9", "--device", "cpu"])
    with pytest.raises(UsageError, match="needs a CUDA device"):
        run(["bench", "speed", "--synthetic", "tiny", "--device", "cpu", "--gpu-mem-cap-gib", "24"])
    with pytest.raises(UsageError, match="--full goes with --synthetic"):
        run(["bench", "speed", "--full"])


def test_bench_speed_synthetic_with_the_real_tiny_model(capsys):
    from edgectx.model.synthetic import SYNTHETIC

    assert run(["bench", "speed", "--synthetic", "tiny", "--context", "300", "--decode-tokens", "2", "--budget", "256",
                "--device", "cpu", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    spec = SYNTHETIC["tiny"]
    assert result["weights"] == "fp16" and result["bandwidth_gbs"] is None and result["weight_read_floor_ms"] is None
    assert result["weight_bytes"] == spec.weight_bytes("fp16", dense_bytes=4)  # the spec's own figure, on a CPU
    row = result["runs"][0]
    assert row["edgectx"] is None and row["edgectx_memory"]["decode_floor_ratio"] is None
    assert row["edgectx_memory"]["host_kv_bytes"] == 302 * spec.kv_bytes_per_token(2)


def test_the_cap_names_the_device_by_its_index(monkeypatch):
    """torch 2.11 refuses `set_per_process_memory_fraction(f, torch.device("cuda"))` (no index): the first GPU run
    failed there, so the cap passes the current device's index."""
    seen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: seen.append((fraction, device)))
    monkeypatch.setattr(device_memory, "_caps", {})
    device_memory.set_memory_cap(torch.device("cuda"), 20 << 30)
    assert seen == [(0.25, 0)] and device_memory.memory_cap(torch.device("cuda", 0)) == 20 << 30


def test_a_gpu_named_by_its_index_becomes_the_current_device(monkeypatch):
    """Found by review: Triton launches on the current device whatever its tensors' device, so with --device cuda:1
    the kernels' probe failed on device 0 and the kernels and CUDA graphs turned themselves off."""
    from edgectx.engine import pick_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    assert pick_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert pick_device("cuda") == torch.device("cuda") and len(current) == 1  # no index: the current one stays
    with pytest.raises(UsageError, match="no cuda:2: PyTorch sees 2 CUDA GPU"):
        pick_device("cuda:2")
    with pytest.raises(UsageError, match="Unknown device 'gpu'"):
        pick_device("gpu")


@pytest.mark.gpu
def test_bench_speed_synthetic_on_cuda_under_a_memory_cap(capsys):
    try:
        assert run(["bench", "speed", "--synthetic", "tiny", "--context", "600,1200", "--decode-tokens", "4", "--budget", "256",
                    "--full", "--device", "cuda", "--gpu-mem-cap-gib", "2", "--json"]) == 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        device_memory._caps.clear()
    result = json.loads(capsys.readouterr().out)
    assert result["gpu_mem_cap_bytes"] == 2 << 30 and result["weights"] in ("nf4", "fp16")
    from edgectx.model.synthetic import SYNTHETIC

    assert result["weight_bytes"] == pytest.approx(SYNTHETIC["tiny"].weight_bytes(result["weights"], 2), rel=0.01)
    assert 4 <= result["cache_capacity_blocks"] <= device_memory.AUTO_CACHE_MAX_BLOCKS
    for r in result["runs"]:
        for engine in ("edgectx_memory", "edgectx"):
            e = r[engine]
            assert 0 < e["peak_gpu_bytes"] <= e["peak_gpu_reserved_bytes"] <= 2 << 30
            assert e["decode_ms_per_token"] > 0


def test_bench_speed_synthetic_keeps_the_contexts_measured_before_running_out_of_memory(monkeypatch, capsys):
    _fake_synthetic(monkeypatch)
    prefill = Engine.prefill

    def tight(engine, ids, **kwargs):  # full attention "runs out of GPU memory" past 500 tokens
        if engine.memory_config is None and engine.memory.n_tokens + len(ids) > 500:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return prefill(engine, ids, **kwargs)

    monkeypatch.setattr(Engine, "prefill", tight)
    assert run(["bench", "speed", "--synthetic", "tiny", "--context", "300,700", "--decode-tokens", "2", "--budget", "256",
                "--full", "--device", "cpu", "--threads", "1", "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)["runs"]
    assert first["edgectx"]["context"] == 300 and "edgectx_skipped" not in first
    assert second["edgectx"] is None and second["edgectx_skipped"] == "out of GPU memory after 300 tokens"
    assert second["edgectx_memory"]["context"] == 700 and "edgectx_memory_error" not in second


def test_reset_gives_back_the_store_segments_and_unpins_them(tmp_path, monkeypatch):
    """Issue 21, defect 7: a reset memory's pinned segments stayed pinned (PyTorch's host allocator caches freed
    pinned blocks). The old memory drops its segments and pools at once, and the engine empties the pinned cache
    (a no-op off CUDA; counted here)."""
    emptied = []
    monkeypatch.setattr(device_memory, "empty_host_cache", lambda device: emptied.append(device))
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2)
    engine = Engine.load(path, device="cpu", memory_config=SMALL, weights="fp16")
    engine.prefill([i % 258 for i in range(700)], chunk_tokens=64)
    old = engine.memory
    assert old.layers[0].store.segments and old.layers[0].cache.slots is not None
    emptied.clear()  # the load resets once too
    engine.reset()
    assert all(not layer.store.segments and layer.cache.slots is None for layer in old.layers)
    assert emptied == [engine.device] and engine.memory is not old and engine.memory.n_tokens == 0


def test_the_engine_runs_its_chunks_on_its_gpu_in_any_thread(tmp_path, monkeypatch):
    """Review of the CUDA path: CUDA's current device is per thread, and the TUI's jobs and the server's worker
    start on device 0, where Triton would launch a cuda:1 model's kernels. A chunk runs inside `device_scope`,
    which makes a GPU named by index the thread's current device (and leaves the others alone)."""
    entered = []

    class Scope:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Scope)
    for device in (torch.device("cuda", 1), torch.device("cuda"), torch.device("cpu")):
        with device_memory.device_scope(device):
            pass
    assert entered == [torch.device("cuda", 1)]
    seen = []
    real = device_memory.device_scope
    monkeypatch.setattr(device_memory, "device_scope", lambda device: seen.append(device) or real(device))
    engine = Engine.load(write_tiny_gguf(tmp_path / "m.gguf", arch="llama"), device="cpu", weights="fp16")
    engine.forward([1, 2, 3])
    assert seen == [engine.device]


def test_a_spilled_conversation_gives_its_host_ram_back(tmp_path, monkeypatch):
    """Review of the CUDA path: the server's pool spilled a conversation to disk to bring its RAM under
    --ram-gib, then only dropped its reference: its pinned segments stayed pinned in PyTorch's host cache (and on
    the CPU, glibc kept the freed store), so spilling freed nothing. The spilled memory is now released."""
    from edgectx.memory.context import ContextMemory
    from edgectx.server.pool import MemoryPool

    engine = Engine.load(write_tiny_gguf(tmp_path / "m.gguf", arch="llama", n_kv_heads=2), device="cpu",
                         memory_config=SMALL, weights="fp16")
    pool = MemoryPool(engine, tmp_path / "spill", max_in_ram=1)
    pool.apply(pool.choose("the first conversation, long enough to fill blocks " * 12))
    first = engine.memory
    assert first.layers[0].store.segments
    released, emptied = [], []
    release = ContextMemory.release
    monkeypatch.setattr(ContextMemory, "release", lambda self: released.append(self) or release(self))
    monkeypatch.setattr(device_memory, "empty_host_cache", lambda device: emptied.append(device))
    pool.apply(pool.choose("a second one about something else entirely " * 12))
    assert pool.stats()["on_disk"] == 1 and engine.memory is not first
    assert any(m is first for m in released) and all(not layer.store.segments for layer in first.layers)
    assert emptied
