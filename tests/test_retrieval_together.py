"""The layers' retrievals ahead of a decode step, done together (issue 21: a retrieval step's host operations).

On the device path (CUDA; here a CPU memory with `device_bookkeeping=True`) every operation the host issues is a
launch it pays for, and a retrieval step issued ~87 of them a layer (docs/gpu-host-ops.md). `ContextMemory.together`
does what every layer does alike once for all of them. Each layer must get exactly what it would alone: the same
blocks, the same context (keys, values, indices, validity, positions) and the same record of what it attended to.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgectx import kernels
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig
from edgectx.memory import together as together_module
from edgectx.memory.context import ContextMemory
from edgectx.model.cuda_graph import CudaGraphStep, capture_eager
from edgectx.model.sampling import Sampler, SamplingParams
from tiny_gguf import write_tiny_gguf

# Two of the three blocks by each layer's own representatives (the lexical match is every layer's)
SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=3, lexical_blocks=1,
                     cache_blocks=4, chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("together") / "m.gguf", arch="llama", n_kv_heads=2, n_layers=4)


def _device_path(engine: Engine, together: bool, config: MemoryConfig) -> Engine:
    engine.memory = ContextMemory(engine.spec, engine.rope, engine.device, engine.dtype, config,
                                  kv_dtype=engine.kv_dtype, scorer=engine.memory.scorer, device_bookkeeping=True)
    engine.memory.together = together
    return engine


def _contexts(memory: ContextMemory) -> list[tuple]:
    out = []
    for layer in memory.layers:
        asm, n = layer.asm, layer.asm.length
        out.append((asm.k[:, :n].clone(), asm.v[:, :n].clone(), asm.idx[:, :n].clone(),
                    None if asm.valid is None else asm.valid[:, :n].clone(), asm.next_pos, layer.selection.clone()))
    return out


@pytest.mark.parametrize("positions,graphs,variant", [("compact", False, ""), ("original", False, ""),
                                                       ("compact", True, ""), ("compact", True, "one by one"),
                                                       ("compact", False, "built one at a time")])
def test_retrieving_every_layer_together_gives_each_what_it_would_alone(tiny, positions, graphs, variant,
                                                                         monkeypatch):
    """`graphs`: decode steps through the CUDA-graph runner (replayed on the CPU with `capture_eager`), as on a GPU:
    an evicting step then observes every layer's recent queries together too (edgectx.memory.together.observe).
    "one by one": working memory for one layer only, so that the layers go in groups of one; "built one at a time":
    the contexts built layer by layer from the blocks selected together (what layers that differ fall back to). Half
    way, the answer is regenerated: the memory cut back to the prompt, decoding on from there."""
    if variant == "one by one":
        monkeypatch.setattr(together_module, "TOGETHER_BYTES", 1)
    elif variant:
        monkeypatch.setattr(together_module, "build", lambda memory, layers, blocks: False)
    config = MemoryConfig(**{**SMALL.to_dict(), "positions": positions})
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 258, 700)]
    runs = []
    for together in (False, True):
        engine = _device_path(Engine.load(tiny, device="cpu", memory_config=config, weights="fp16"), together, config)
        if graphs:
            engine.step = CudaGraphStep(engine.model, capture=capture_eager)
        with kernels.forced() if graphs else contextlib.nullcontext():
            engine.sync(ids[:600])
            sampler = Sampler(SamplingParams(temperature=0))
            logits, contexts = [engine.next_logits], []
            token = sampler.sample(engine.next_logits)
            for step in range(100):
                if step == 60:  # a regenerated answer: the memory cut back to the prompt
                    engine.sync(ids[:600])
                    token = sampler.sample(engine.next_logits)
                logits.append(engine.forward([token])[-1])
                token = sampler.sample(logits[-1])
                contexts.append(_contexts(engine.memory))
        memory = engine.memory
        runs.append((torch.stack(logits), contexts, memory.record.relevance, memory.record.n_retrievals))
        if graphs:
            assert engine.step.n_replays >= 50, engine.step.stats()
    (logits_a, contexts_a, record_a, n_a), (logits_b, contexts_b, record_b, n_b) = runs
    assert n_a == n_b and n_a >= 4 * 8, "the layers hardly retrieved ahead: the test proves little"
    assert torch.equal(logits_a, logits_b)
    for step, (a, b) in enumerate(zip(contexts_a, contexts_b)):
        for layer, (x, y) in enumerate(zip(a, b)):
            for part, (p, q) in enumerate(zip(x, y)):
                same = p == q if not isinstance(p, torch.Tensor) else torch.equal(p, q)
                assert same, (step, layer, ["k", "v", "idx", "valid", "next_pos", "selection"][part])
    assert record_a.keys() == record_b.keys()
    for block in record_a:  # sums of the same float32 masses, in another order in float64
        assert record_a[block] == pytest.approx(record_b[block], rel=1e-12, abs=1e-15)


class _Ops(TorchDispatchMode):
    """Operations dispatched, views aside: on CUDA each is a launch or a copy that the host issues."""

    VIEWS = {"slice", "view", "alias", "as_strided", "expand", "transpose", "t", "select", "unsqueeze", "squeeze",
             "_unsafe_view", "permute", "detach", "unbind", "split", "narrow", "reshape", "lift_fresh", "unflatten"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def _ops_ahead(path, n_layers: int, together: bool, monkeypatch) -> float:
    """Mean operations of the retrievals ahead of a decode step (ContextMemory._prepare_next) that retrieved."""
    engine = Engine.load(path, device="cpu", memory_config=SMALL, weights="fp16")
    assert engine.spec.n_layers == n_layers
    _device_path(engine, together, SMALL)
    counts, inner = [], ContextMemory._prepare_next

    def counted(memory):
        before = memory.record.n_retrievals
        with _Ops() as ops:
            inner(memory)
        if memory.record.n_retrievals > before:
            counts.append(ops.n)

    monkeypatch.setattr(ContextMemory, "_prepare_next", counted)
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 258, 640)]
    engine.prefill(ids[:600])
    for token in ids[600:]:
        engine.forward([token])
    assert len(counts) >= 8
    return sum(counts) / len(counts)


def test_the_layers_retrieving_together_add_few_operations_a_layer(tmp_path, monkeypatch):
    """What a retrieval step costs the host on the GPU path grows with the layers by the few operations each layer's
    buffers need (one gather, one product for the record, its validity), not by everything a layer's retrieval and
    rebuild do (~87 operations a layer one at a time on this CPU, where the gather alone is 9: one kernel on CUDA)."""
    paths = {n: write_tiny_gguf(tmp_path / f"m{n}.gguf", arch="llama", n_kv_heads=2, n_layers=n) for n in (2, 6)}
    per_layer = {}
    for together in (False, True):
        ops = {n: _ops_ahead(path, n, together, monkeypatch) for n, path in paths.items()}
        per_layer[together] = (ops[6] - ops[2]) / 4
    assert per_layer[True] <= 20, per_layer
    assert per_layer[True] < per_layer[False] / 3, per_layer
