"""CUDA graphs for the decode step (issue 21): edgectx.model.cuda_graph, edgectx.model.graph_step and
edgectx.memory.graph_step.

On a CPU the runner replays with `capture_eager`: each "replay" runs the step captured at capture time again, with
the step object of that time, so a step that read anything but the device tensors it holds (the static token and
the memory's column/position tensor, written in place) would go wrong on later steps. That proves, without a GPU,
the step's logits against the eager path's over many steps, which steps are graph steps and which fall back, when
a new capture happens, that the per-step inputs stay at one address, and that a graph step makes no host sync.
The `gpu` test does the same with real captures (skipped without CUDA).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgectx import kernels
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig
from edgectx.memory.context import ContextMemory
from edgectx.model.cuda_graph import CudaGraphStep, capture_eager, with_cuda_graphs
from edgectx.model.graph_step import graph_step_of
from edgectx.model.kv import FullKVCache
from edgectx.model.sampling import Sampler, SamplingParams
from sync_counter import SyncCounter
from tiny_gguf import write_tiny_gguf

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("graphs") / "m.gguf", arch="llama", n_kv_heads=2, context_length=4096)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, 258, n)]


def _device_path(engine: Engine) -> Engine:
    """A fresh memory that keeps its bookkeeping on the device, as on CUDA (tests/test_host_syncs.py)."""
    engine.memory = ContextMemory(engine.spec, engine.rope, engine.device, engine.dtype, engine.memory_config,
                                  kv_dtype=engine.kv_dtype, scorer=engine.memory.scorer, device_bookkeeping=True)
    return engine


def _decode(engine: Engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Prefill `prompt`, then feed `tokens` one at a time (teacher-forced: both engines see the same steps)."""
    engine.prefill(prompt)
    return torch.stack([engine.next_logits] + [engine.forward([t])[-1] for t in tokens])


def _same_decode(eager: Engine, graphed: Engine, ids: list[int], prompt: int) -> None:
    """Both engines read ids[:prompt], then decode the rest teacher-forced with the kernels on: the same logits."""
    with kernels.forced():
        want, got = _decode(eager, ids[:prompt], ids[prompt:]), _decode(graphed, ids[:prompt], ids[prompt:])
    # summation order moves a few stored float16 keys by an ulp, and later steps see those keys: 1e-3, not 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _pair(tiny, memory_config=None, **load):
    eager = Engine.load(tiny, device="cpu", memory_config=memory_config, weights="fp16", **load)
    graphed = Engine.load(tiny, device="cpu", memory_config=memory_config, weights="fp16", **load)
    if memory_config is not None:
        _device_path(eager), _device_path(graphed)
    graphed.step = CudaGraphStep(graphed.model, capture=capture_eager)
    return eager, graphed


def test_full_attention_graph_steps_match_eager_and_capture_once_per_capacity(tiny):
    eager, graphed = _pair(tiny, n_ctx=2048)
    ids = _ids(300)
    want, got = _decode(eager, ids[:200], ids[200:]), _decode(graphed, ids[:200], ids[200:])
    # float32 sums in another order (the graph attends over the capacity, masked): 2.4e-5 at logits near 7 on one
    # machine's CPU, so a relative bound besides the absolute one
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    runner = graphed.step
    # 100 one-token steps: the cache grows once (256 -> 512 columns) at token 257, so two shape classes
    assert (runner.n_replays, runner.n_captures, runner.n_eager) == (100, 2, 1), runner.stats()
    # The graph wrote the same keys and values: bit for bit in the first layer (its inputs are the same); later
    # layers' inputs carry the attention's summation order (the masked columns past the token).
    first_eager, first_graphed = eager.memory.layers[0], graphed.memory.layers[0]
    assert torch.equal(first_eager.k[:, :300], first_graphed.k[:, :300])
    assert torch.equal(first_eager.v[:, :300], first_graphed.v[:, :300])
    for a, b in zip(eager.memory.layers, graphed.memory.layers):
        torch.testing.assert_close(b.k[:, :300], a.k[:, :300], rtol=0, atol=1e-3)
        torch.testing.assert_close(b.v[:, :300], a.v[:, :300], rtol=0, atol=1e-3)


def test_graph_step_inputs_are_written_in_place(tiny):
    """The token buffer, the column tensor and the static logits keep their addresses from step to step (the
    graph baked them in); the engine gets a copy of the logits, which the next replay does not touch."""
    _, graphed = _pair(tiny, n_ctx=2048)
    graphed.prefill(_ids(100))
    runner, addresses, kept = graphed.step, set(), []
    for t in _ids(20, seed=1):
        kept.append((graphed.forward([t])[-1], graphed.next_logits.clone()))
        (captured,) = runner.graphs.values()
        addresses.add((runner.tokens.data_ptr(), graphed.memory.graph_scalars.data_ptr(), captured.logits.data_ptr()))
        assert graphed.memory.graph_scalars[0].tolist() == [graphed.memory.n_tokens - 1] * 3
    assert len(addresses) == 1 and runner.n_captures == 1
    assert all(torch.equal(a, b) for a, b in kept)  # copies: later replays left them alone
    assert kept[-1][0].data_ptr() != captured.logits.data_ptr()


def test_which_full_attention_steps_are_graph_steps(tiny):
    engine = Engine.load(tiny, device="cpu", n_ctx=2048, weights="fp16")
    memory = engine.memory
    memory.begin(8)  # a chunk
    assert graph_step_of(memory) is None
    memory.begin(1)
    step = graph_step_of(memory)  # the first token of all: nothing to attend to but itself, still a graph step
    assert step is not None and step.values == [[0, 0, 0]]
    runner = CudaGraphStep(engine.model, capture=capture_eager)
    tokens = torch.tensor([5])
    assert runner.graph_step(tokens, memory, all_logits=True) is None
    assert runner.graph_step(torch.tensor([5, 6]), memory) is None
    assert runner.graph_step(tokens, memory) is not None
    runner.failed = "a capture failed"
    assert runner.graph_step(tokens, memory) is None
    # A sliding window past its length needs a mask: eager; within it, a graph step.
    windowed = FullKVCache(dataclasses.replace(engine.spec, sliding_window=64), engine.rope, engine.device, engine.dtype)
    windowed.begin(63)
    windowed.commit()
    windowed.begin(1)
    assert graph_step_of(windowed) is not None
    windowed.commit()
    windowed.begin(1)
    assert graph_step_of(windowed) is None


def test_the_key_changes_exactly_when_a_buffer_moves(tiny):
    engine = Engine.load(tiny, device="cpu", n_ctx=2048, weights="fp16")
    engine.prefill(_ids(250))
    keys = []
    for t in _ids(10, seed=2):
        engine.memory.begin(1)
        keys.append(graph_step_of(engine.memory).key)
        engine.memory.commit()
    # columns 250..255 fit the 256-column cache; token 257 grows it (new buffers, new key)
    assert len(set(keys[:6])) == 1 and len(set(keys[6:])) == 1 and keys[5] != keys[6]


def test_cuda_graphs_only_on_cuda_and_the_env_switch(monkeypatch):
    model = torch.nn.Linear(2, 2)
    assert with_cuda_graphs(model, torch.device("cpu")) is model
    assert isinstance(with_cuda_graphs(model, torch.device("cuda")), CudaGraphStep)
    monkeypatch.setenv("EDGECTX_CUDA_GRAPHS", "0")
    assert with_cuda_graphs(model, torch.device("cuda")) is model


def test_a_failed_capture_falls_back_to_eager_for_good(tiny, caplog):
    eager, graphed = _pair(tiny, n_ctx=2048)

    def broken(run):
        run()  # as the warm-up would: the eager step must not mind the column it wrote
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed.step = CudaGraphStep(graphed.model, capture=broken)
    ids = _ids(130)
    with caplog.at_level("WARNING", logger="edgectx.model.cuda_graph"):
        got = _decode(graphed, ids[:100], ids[100:])
    torch.testing.assert_close(got, _decode(eager, ids[:100], ids[100:]), rtol=0, atol=0)
    assert graphed.step.failed and graphed.step.n_captures == 0 and "CUDA graph failed" in caplog.text


def test_memory_decode_steps_replay_evicting_and_retrieving_ones_too(tiny):
    """The long-context memory past its budget: every decode step replays, those that evict (planned after the
    replay) and those after a retrieval or a rebuild (done ahead, at the commit before), with the eager path's logits
    (the decode kernel over the context's capacity, split differently, through Triton's interpreter) and the same
    memory afterwards."""
    eager, graphed = _pair(tiny, SMALL)
    _same_decode(eager, graphed, _ids(700, seed=3), 600)
    runner = graphed.step
    n_prefill = -(-600 // SMALL.chunk_tokens)
    # of 100 steps: retrievals (every 4th) and rebuilds are done ahead, in the commit before (prepare_next), and the
    # steps that evict (every 16th) plan their eviction after the replay: every step replays (before: the evicting
    # steps ran eagerly, 94 replays; before that, 40-75)
    assert runner.n_replays == 100 and runner.n_eager == n_prefill, runner.stats()
    # a rebuilt context takes over the buffers of the one it replaces: the key stays, one capture serves every
    # steady step (before: a capture after most rebuilds, 25 in 200 steps; each costs an eager step and more)
    assert runner.n_captures <= 4, runner.stats()  # a context growing past the reused buffers by 64 columns is a new one
    for a, b in zip(eager.memory.layers, graphed.memory.layers):
        assert torch.equal(a.resident.idx[:, : a.resident.n], b.resident.idx[:, : b.resident.n])
        # keys project hidden states that attention's summation order (the kernel split over the context or over its
        # capacity) moved in the last bits: a few may round to the neighbouring float16
        ka, kb = a.resident.k[:, : a.resident.n].float(), b.resident.k[:, : b.resident.n].float()
        diff = (ka - kb).abs()
        assert (diff > 0).float().mean() < 0.01 and diff.max() <= 2**-10 * ka.abs().max().clamp(min=1)
        assert a.selection.tolist() == b.selection.tolist() and a.store.n_tokens == b.store.n_tokens
    assert eager.memory.stats()["evicted_tokens"] > 0


def test_memory_graph_step_declines_without_the_kernel(tiny):
    """Off the decode kernel the masked path would read the context's unwritten scratch columns: eager."""
    engine = _device_path(Engine.load(tiny, device="cpu", memory_config=SMALL, weights="fp16"))
    engine.prefill(_ids(100))
    engine.memory.begin(1)
    assert graph_step_of(engine.memory) is None  # kernels are off on a CPU unless forced
    with kernels.forced():
        assert graph_step_of(engine.memory) is not None


def test_a_memory_graph_step_writes_the_commit_and_the_host_issues_next_to_nothing(tiny):
    """Issue 21: the steady step's commit copied K and V into the resident tier and the host store's staging buffer,
    the query into the recent queries, and the token's index and score: 7 copies and an index a layer issued by the
    host after each replay (224 on an 8B model). The captured step writes them itself; the commit counts. Outside
    the replay the host issues the token's and the inputs' uploads and the logits' copy, whatever the layers (a
    layer's index and zero score are written 64 columns ahead, a block flushed every 32nd step here)."""
    from test_gpu_rehearsal import host_ops  # packaging/host_ops.py: its counter, views aside

    _, graphed = _pair(tiny, SMALL)
    runner, log = graphed.step, host_ops.HostOps()
    runner.capture = log.around(runner.capture)  # a replay's ops are the graph's: none of the host's on a GPU
    ids, steady = _ids(760, seed=6), []
    with kernels.forced():
        graphed.prefill(ids[:600])
        for token in ids[600:]:
            before, retrievals = (runner.n_replays, runner.n_captures), graphed.memory.record.n_retrievals
            log.n = 0
            with log:
                graphed.forward([token])
            replayed = runner.n_replays > before[0] and runner.n_captures == before[1]  # (a capture runs the step)
            if replayed and graphed.memory.record.n_retrievals == retrievals:
                steady.append(log.n)
    assert len(steady) >= 80, len(steady)
    # the token's and the inputs' uploads, the logits' copy (was 7 a layer more: 17 on this 2-layer model)
    assert sorted(steady)[len(steady) // 2] == 3, steady
    assert max(steady) <= 3 + 8 * len(graphed.memory.layers), steady
    # evictions (every 16th step) refill the resident tier's buffers in place: the graph's key stays
    assert graphed.memory.stats()["evicted_tokens"] > 0 and runner.n_captures <= 2, runner.stats()


@pytest.mark.parametrize("memory", [False, True])
def test_a_graph_step_makes_no_host_sync(tiny, memory):
    _, graphed = _pair(tiny, SMALL if memory else None)
    sampler = Sampler(SamplingParams(temperature=0))
    with kernels.forced():
        graphed.prefill(_ids(600 if memory else 200, seed=4))
        token, counts = sampler.sample(graphed.next_logits), []
        for _ in range(8):
            before, retrievals = graphed.step.n_replays, graphed.memory.record.n_retrievals if memory else 0
            with SyncCounter() as syncs:
                logits = graphed.forward([token])
            # a commit that retrieves ahead for the next step reads the block ids (tests/test_host_syncs.py)
            retrieved = memory and graphed.memory.record.n_retrievals > retrievals
            if graphed.step.n_replays > before and not retrieved:
                counts.append(syncs)
            token = sampler.sample(logits[-1])
    assert counts and [c.total for c in counts] == [0] * len(counts), [dict(c.sites) for c in counts]


@pytest.mark.gpu
@pytest.mark.parametrize("memory", [None, SMALL])
def test_captured_cuda_graphs_match_eager(tiny, memory, monkeypatch):
    """On a GPU: real captures, float32 so that eager and the graph differ only by summation order."""
    ids = _ids(700, seed=5)
    prompt, steps = (ids[:600], ids[600:]) if memory else (ids[:200], ids[200:])
    monkeypatch.setattr("edgectx.engine.default_dtype", lambda device: torch.float32)
    runs = []
    for graphs in (False, True):
        engine = Engine.load(tiny, device="cuda", memory_config=memory, weights="fp16")
        engine.step = CudaGraphStep(engine.model) if graphs else engine.model
        runs.append((_decode(engine, prompt, steps).cpu(), engine.step))
    (want, _), (got, runner) = runs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert runner.failed is None and runner.n_replays >= (40 if memory else len(steps)), runner.stats()
    # full attention: one capture per capacity the cache grows through from 200 to 700 tokens (256, 512, 1024)
    assert runner.n_captures <= (runner.n_replays // 2 if memory else 3), runner.stats()


@pytest.mark.gpu
def test_on_a_gpu_the_layers_retrieving_together_decode_as_one_at_a_time(tiny, monkeypatch):
    """On a GPU: the layers' retrievals ahead done together (edgectx.memory.together: stacked selection, rebuild with
    the Triton gather a layer, record, and an evicting step's observation after a real replay) against the same memory
    one layer at a time, in float32 so that the two differ at most by the order of a sum."""
    monkeypatch.setattr("edgectx.engine.default_dtype", lambda device: torch.float32)
    ids = _ids(700, seed=6)
    runs = []
    for together in (False, True):
        engine = Engine.load(tiny, device="cuda", memory_config=SMALL, weights="fp16")
        engine.memory.together = together
        engine.step = CudaGraphStep(engine.model)
        runs.append((_decode(engine, ids[:600], ids[600:]).cpu(), engine.memory.record.n_retrievals, engine.step))
    (want, n_want, _), (got, n_got, runner) = runs
    assert n_want == n_got and n_got >= 2 * 20, (n_want, n_got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert runner.failed is None and runner.n_replays >= 40, runner.stats()


def test_without_retrieving_ahead_retrieval_steps_run_eagerly(tiny, monkeypatch):
    """EDGECTX_RETRIEVE_AHEAD=0: each retrieval runs at its own step, with its own query, eagerly."""
    from edgectx.memory import context

    monkeypatch.setattr(context, "RETRIEVE_AHEAD", False)
    _, graphed = _pair(tiny, SMALL)
    ids = _ids(700, seed=3)
    with kernels.forced():
        _decode(graphed, ids[:600], ids[600:])
    runner = graphed.step
    # every 4th step retrieves, and runs eagerly with the step after it (its context rebuilt): 76 of 100 replay
    assert 40 <= runner.n_replays <= 80 and runner.n_captures <= 4, runner.stats()


def test_a_capture_that_fails_leaves_the_thread_on_its_own_stream(monkeypatch):
    """Review of the CUDA path: torch's `graph.__exit__` ends the capture before it switches the stream back, so a
    capture that failed to end left the engine's thread issuing on the capture stream (the TUI's next job, another
    thread, then ran unordered with it); a warm-up that raised skipped the default stream's wait on its work.
    Stand-ins for torch.cuda's streams and graph log what the capture does to the thread's current stream."""
    from contextlib import contextmanager

    from edgectx.model import cuda_graph

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append((self.name, "waits for", other.name))

    default = Stream("default")
    state = {"current": default}

    @contextmanager
    def stream(s):
        before, state["current"] = state["current"], s
        try:
            yield
        finally:
            state["current"] = before

    class Graph:  # as torch's: the capture stream on entry; the capture ended (here: refused) before switching back
        def __init__(self, graph, capture_error_mode):
            pass

        def __enter__(self):
            state["current"] = Stream("capture")

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: Stream("side"))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    with pytest.raises(RuntimeError, match="capturing"):
        cuda_graph.capture_cuda(lambda: torch.zeros(1))
    assert state["current"] is default

    def warm_up_fails():
        raise RuntimeError("the warm-up failed")

    log.clear()
    with pytest.raises(RuntimeError, match="warm-up"):
        cuda_graph.capture_cuda(warm_up_fails)
    assert log == [("side", "waits for", "default"), ("default", "waits for", "side")] and state["current"] is default


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3"])  # Q/K/V biases; per-head Q/K norms; fused QKV and FFN
def test_every_architecture_decodes_through_the_memory_graph_step_as_eagerly(tmp_path, arch):
    """The captured memory step takes each layer's Q, K and V where the architecture's attention hands them to the
    memory (after Qwen2's biases, Qwen3's per-head norms, Phi-3's fused projection): the same logits as the eager
    device path through eviction and retrieval, every decode step replayed."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, n_kv_heads=2 if arch != "phi3" else 4,
                           context_length=4096, head_dim=32 if arch == "qwen3" else None)
    eager, graphed = _pair(path, SMALL)
    _same_decode(eager, graphed, _ids(460, seed=5), 420)
    assert graphed.step.n_replays == 40 and eager.memory.stats()["evicted_tokens"] > 0, graphed.step.stats()
