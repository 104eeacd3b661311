"""A whole decode step as one ggml graph (edgectx.quant.ggml_decode) against the same step through PyTorch
attention, on the embedded model's real weights (GGUF blocks through ggml, the default on a CPU).

The graph does what the two-graphs-per-layer path does around attention with the same ggml products, and RoPE
and the context writes with the same float32 operations: a layer's new key and value column and its output
are bit-identical. Attention itself runs in C (edgectx.kernels.cpu_attention's ops over a float16 context, or
ggml's flash attention over a float32 one) instead of three PyTorch products: its output differs in the last bits, which the 8-bit activations of later layers amplify (this model's residual stream
reaches ~350, so one rounding step of an activation is large), so the whole model is compared on top-1 tokens
with both paths fed the same tokens."""

from __future__ import annotations

import pytest
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.engine import Engine
from edgectx.kernels import cpu_attention
from edgectx.memory.config import MemoryConfig
from edgectx.quant import ggml_decode
from edgectx.quant.ggml_cpu import ggml_available
from edgectx.quant.ggml_decode import GgmlDecoder

pytestmark = pytest.mark.skipif(not ggml_available(), reason="llama-cpp-python's ggml libraries are not installed")

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, chunk_tokens=128,
                     n_observe=64, retrieve_every=4, evict_every=16)


@pytest.fixture(scope="module")
def engine(embedded_model):
    return Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=MemoryConfig())


def _decode(engine: Engine, ids: list[int], n_steps: int, fused: bool, forced: list[int] | None = None) -> list[int]:
    """Greedy top-1 after each of `n_steps` one-token steps, feeding the greedy token (or `forced`'s: both paths
    then see the same tokens, and one near-tie does not send the rest down another path)."""
    decoder = engine.model.decoder
    if not fused:
        engine.model.decoder = None
    try:
        engine.reset()
        top = [int(torch.argmax(engine.prefill(ids)))]
        for i in range(n_steps):
            top.append(int(torch.argmax(engine.forward([forced[i] if forced else top[-1]])[-1])))
        return top
    finally:
        engine.model.decoder = decoder


def _agreement(engine: Engine, ids: list[int], n_steps: int) -> float:
    fused = _decode(engine, ids, n_steps, True)
    plain = _decode(engine, ids, n_steps, False, forced=fused)
    return sum(a == b for a, b in zip(fused, plain)) / len(fused)


def test_the_embedded_model_decodes_through_one_graph(engine):
    assert isinstance(engine.model.decoder, GgmlDecoder)
    assert engine.model.decoder.vocab == engine.spec.vocab_size  # the output layer is in the graph too


@torch.inference_mode()
def test_first_layers_write_and_output_exactly_what_the_pytorch_path_does(engine):
    model, s = engine.model, engine.spec
    engine.reset()
    engine.prefill(corpus_tokens(engine.tokenizer, 300, None))
    n_layers = 4
    decoder = GgmlDecoder([b.fused for b in model.layers[:n_layers]], s.n_heads, s.n_kv_heads, s.head_dim,
                          model.norm.weight, model.norm.eps, None)
    memory = engine.memory
    x = model.embed(torch.tensor([1234]))
    slots = [memory.layers[i].decode_slot() for i in range(n_layers)]
    assert all(slot is not None and slot.rounded for slot in slots)
    memory.begin(1)
    hidden, qkv = decoder(x, slots)
    written = [(slot.k[:, slot.start].clone(), slot.v[:, slot.start].clone()) for slot in slots]
    h = x
    for i in range(n_layers):
        slots[i].k[:, slots[i].start] = 0  # the PyTorch path must write it again
        h = model.layers[i](h, memory.layers[i])
        asm = memory.layers[i].asm
        assert torch.equal(asm.k[:, slots[i].start], written[i][0]) and torch.equal(asm.v[:, slots[i].start], written[i][1])
        pending = memory.layers[i]._pending
        q, k, v = qkv[i].split((s.q_dim, s.kv_dim, s.kv_dim))
        assert torch.equal(k.view_as(pending.k), pending.k) and torch.equal(v.view_as(pending.v), pending.v)
        assert torch.equal(q.view_as(pending.q), pending.q)
    assert torch.equal(hidden, h)
    memory.truncate(memory.n_tokens)  # nothing committed; drop the plans
    engine.reset()


def test_greedy_decode_matches_the_pytorch_path_within_the_budget(engine):
    # Measured: 14/17. Against the F32 reference (llama.cpp on the requantized weights, 96 teacher-forced steps)
    # the graph agrees 0.94 on top-1 and the PyTorch path 0.92: neither path is the nearer one by much.
    assert _agreement(engine, corpus_tokens(engine.tokenizer, 400, None), 16) >= 12 / 17


@pytest.mark.parametrize("c_ops", [True, False], ids=["float16-context", "flash-attention"])
def test_past_the_budget_steps_between_retrievals_run_fused_and_agree(embedded_model, monkeypatch, c_ops):
    """Evicting, retrieving (with duplicate copies masked) and decoding through the graph between retrievals: over a
    float16 context through edgectx.kernels.cpu_attention's ops, and without them (no C compiler) over a float32
    context through ggml's flash attention."""
    if c_ops and cpu_attention.ops() is None:
        pytest.skip("edgectx.kernels.cpu_attention cannot be built here")
    if not c_ops:
        monkeypatch.setattr(cpu_attention, "ops", lambda: None)
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=SMALL)
    assert engine.context_dtype == (torch.float16 if c_ops else torch.float32)
    calls, masked, dtypes = [], [], set()
    real, real_again = GgmlDecoder.__call__, GgmlDecoder.again

    def counting(self, x, slots, step=None):
        calls.append(1)
        masked.append(any(slot.mask is not None for slot in slots))
        dtypes.update(slot.k.dtype for slot in slots)
        return real(self, x, slots, step)

    def counting_again(self, x, step):  # a steady step: the last graph again, one column on
        out = real_again(self, x, step)
        calls.extend([1] if out is not None else [])
        return out

    monkeypatch.setattr(GgmlDecoder, "__call__", counting)
    monkeypatch.setattr(GgmlDecoder, "again", counting_again)
    n_steps = 24
    agreement = _agreement(engine, corpus_tokens(engine.tokenizer, 700, None), n_steps)
    assert engine.memory.layers[0].evicted
    # every step, the first after the prefill too: retrievals and the rebuilds after an eviction run ahead, and the
    # prefill leaves its last chunk's context rebuilt (ContextMemory.ready)
    assert len(calls) == n_steps, len(calls)
    assert any(masked), "a context with duplicates of retrieved tokens is attended through the mask"
    assert dtypes == {torch.float16 if c_ops else torch.float32}  # the contexts the fused steps attended
    assert agreement >= 0.7, agreement


def test_full_attention_keeps_the_pytorch_step(embedded_model):
    engine = Engine.load(embedded_model, n_ctx=512, n_threads=2)
    calls = []
    real = ggml_decode.GgmlDecoder.__call__
    try:
        ggml_decode.GgmlDecoder.__call__ = lambda self, x, slots, step=None: calls.append(1) or real(self, x, slots, step)
        engine.prefill(corpus_tokens(engine.tokenizer, 64, None))
        engine.forward([5])
    finally:
        ggml_decode.GgmlDecoder.__call__ = real
    assert calls == []


def test_the_switch_keeps_decode_steps_in_pytorch(embedded_model, monkeypatch):
    monkeypatch.setenv("EDGECTX_GGML_DECODE", "0")
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=MemoryConfig())
    assert engine.model.decoder is None and engine.model.layers[0].fused is not None


def _state_after_steps(engine: Engine, ids: list[int], n_steps: int) -> dict:
    engine.reset()
    token = int(torch.argmax(engine.prefill(ids)))
    for _ in range(n_steps):
        token = int(torch.argmax(engine.forward([token])[-1]))
    layer = engine.memory.layers[3]
    r, store = layer.resident, layer.store
    return {"k": r.k[:, : r.n].clone(), "v": r.v[:, : r.n].clone(), "idx": r.idx[:, : r.n].clone(),
            "score": r.score[:, : r.n].clone(), "recent": layer.q_recent.clone(), "n_tokens": store.n_tokens,
            "store": torch.cat(store.tokens(0, store.n_tokens), dim=1),
            "reps": store.representatives.clone(), "token": token}


def test_a_fused_step_writes_the_tiers_the_store_and_the_queries_as_the_memory_would(embedded_model, monkeypatch):
    """The fused step copies its K, V and Q into the resident tier, the host store and the recent queries itself
    (DecodeSlot.writes); with those writes off the memory copies them at commit. Both leave the same state,
    past the budget (evictions, retrievals, completed blocks and their representatives included)."""
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=SMALL)
    ids = corpus_tokens(engine.tokenizer, 600, None)
    written = []
    real = GgmlDecoder.__call__

    def recording(self, x, slots, step=None):
        out = real(self, x, slots, step)
        written.append(all(slot.writes is not None for slot in slots))
        return out

    monkeypatch.setattr(GgmlDecoder, "__call__", recording)
    fused = _state_after_steps(engine, ids, 40)
    assert written and all(written), "every fused step wrote in place"
    from edgectx.memory import context
    monkeypatch.setattr(context, "_GRAPH_WRITES", ())
    written.clear()
    copied = _state_after_steps(engine, ids, 40)
    assert written and not any(written)
    assert engine.memory.layers[3].evicted and fused["n_tokens"] > 600 + 32
    for name in fused:
        a, b = fused[name], copied[name]
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name


def _steps(engine: Engine, ids: list[int], n_steps: int) -> torch.Tensor:
    engine.reset()
    logits = [engine.prefill(ids)]
    for _ in range(n_steps):
        logits.append(engine.forward([int(torch.argmax(logits[-1]))])[-1])
    return torch.stack(logits)


def test_steady_steps_are_the_planned_steps_one_column_on(embedded_model, monkeypatch):
    """Between anything that changes a layer but counts (a retrieval, an eviction, a completed host block, a grown
    buffer), a step runs the last step's graph again with every pointer one column on (ContextMemory.steady_key,
    GgmlDecoder.again) instead of planning 30 slots. Logits and the memory's state are the planned steps' exactly,
    past the budget."""
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=SMALL)
    ids = corpus_tokens(engine.tokenizer, 600, None)
    steady = []
    real_again = GgmlDecoder.again

    def counting_again(self, x, step):
        out = real_again(self, x, step)
        steady.append(out is not None)
        return out

    monkeypatch.setattr(GgmlDecoder, "again", counting_again)
    n_steps = 60
    fast = _steps(engine, ids, n_steps)
    assert 10 <= sum(steady) < n_steps, sum(steady)  # steady runs, and planned steps between them
    fast_state = _state_after_steps(engine, ids, n_steps)
    assert engine.memory.layers[0].evicted
    from edgectx.memory import context
    monkeypatch.setattr(context.ContextMemory, "steady_key", lambda self: None)
    steady.clear()
    planned = _steps(engine, ids, n_steps)
    planned_state = _state_after_steps(engine, ids, n_steps)
    assert not steady
    assert torch.equal(fast, planned)
    for name in fast_state:
        a, b = fast_state[name], planned_state[name]
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name


def test_conversations_taking_turns_do_not_run_each_others_graph(embedded_model):
    """Two conversations on one engine, a step each in turn (a server's): the graph the decoder last ran is the
    other's, so neither runs it again one column on; each gets the logits it gets alone."""
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=SMALL)
    ids_a, ids_b = corpus_tokens(engine.tokenizer, 400, None), corpus_tokens(engine.tokenizer, 300, None, corpus="stdlib")
    alone_a, alone_b = _steps(engine, ids_a, 12), _steps(engine, ids_b, 12)
    engine.reset()
    a = [engine.prefill(ids_a)]
    held_a = engine.take_memory()
    b = [engine.prefill(ids_b)]
    held_b = engine.take_memory()
    for _ in range(12):
        for held, out in ((held_a, a), (held_b, b)):
            engine.put_memory(held)
            out.append(engine.forward([int(torch.argmax(out[-1]))])[-1])
            engine.take_memory()
    assert torch.equal(torch.stack(a), alone_a) and torch.equal(torch.stack(b), alone_b)


@torch.inference_mode()
def test_the_observation_and_the_record_from_c_match_pytorchs(embedded_model):
    """Over the float16 context, the eviction's observation and a decode retrieval's record take their attention mass
    from C (edgectx.kernels.cpu_attention.attention_mass); PyTorch, from a widened copy, gives the same figures."""
    if cpu_attention.ops() is None:
        pytest.skip("edgectx.kernels.cpu_attention cannot be built here")
    engine = Engine.load(embedded_model, n_ctx=None, n_threads=2, memory_config=SMALL)
    engine.reset()
    token = int(torch.argmax(engine.prefill(corpus_tokens(engine.tokenizer, 700, None))))
    for _ in range(5):
        token = int(torch.argmax(engine.forward([token])[-1]))
    memory = engine.memory
    assert memory.c_ops and memory.layers[0].evicted
    for layer in memory.layers[:4]:
        asm, q = layer.asm, layer.q_recent[:, -1:].contiguous()
        q_rot = memory.rope.rotate(q, *memory.rope.range_tables(asm.next_pos - 1, 1, memory.dtype))
        results = []
        for c_ops in (True, False):
            memory.c_ops = c_ops
            results.append((layer._observe(q, asm, asm.length), layer._attended(q_rot, asm, asm.length - 1, 1)))
        memory.c_ops = True
        (observed, attended), (observed_torch, attended_torch) = results
        torch.testing.assert_close(observed, observed_torch, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attended, attended_torch, rtol=1e-4, atol=1e-6)
        assert observed.shape == (engine.spec.n_kv_heads, asm.length) and attended.sum() > 0


def test_qwen3_steps_normalize_q_and_k_in_the_graph(tmp_path):
    """Qwen3's per-head Q/K norms run inside the whole-step graph (PyTorch applies them after the layer's first
    graph): decode steps past the budget through the graph give the PyTorch path's logits, and a graph without
    the norms does not."""
    import gguf
    import numpy as np

    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3", qtype=gguf.GGMLQuantizationType.Q8_0, dim=128,
                           n_heads=4, n_kv_heads=2, ffn_dim=256, head_dim=64, tied=False, context_length=4096)
    engine = Engine.load(path, device="cpu", memory_config=SMALL)
    assert isinstance(engine.model.decoder, GgmlDecoder)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 560)]

    def run(fused: bool) -> torch.Tensor:
        decoder = engine.model.decoder
        engine.model.decoder = decoder if fused else None
        try:
            engine.reset()
            out = [engine.prefill(ids[:500])]
            out += [engine.forward([t])[-1] for t in ids[500:]]
            return torch.stack(out)
        finally:
            engine.model.decoder = decoder

    plain, fused = run(False), run(True)
    assert engine.memory.stats()["evicted_tokens"] > 0
    assert float((fused - plain).abs().max()) < 0.02 * float(plain.std())
    for block in engine.model.layers:
        block.fused.q_norm = block.fused.k_norm = None
    engine.model.decoder._graphs.clear()
    assert float((run(True) - plain).abs().max()) > 0.2 * float(plain.std())
