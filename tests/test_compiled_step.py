"""The compiled one-token step (edgectx.model.step): the same logits as the eager model through the long-context
memory and through full attention, one graph for every depth, compiled in the background."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig
from edgectx.model.decode import cpp_compiler_available
from edgectx.model.step import CompiledStep

pytestmark = pytest.mark.skipif(not cpp_compiler_available(), reason="TorchInductor needs a C++ compiler")

TEXT = "A long document about rivers, bridges and the people who build them. " * 80


def _twins(embedded_model, memory_config, weights="fp16"):
    eager = Engine.load(embedded_model, device="cpu", memory_config=memory_config, weights=weights)
    fast = Engine.load(embedded_model, device="cpu", memory_config=memory_config, weights=weights)
    return eager, fast


SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4, chunk_tokens=128)


def test_compiled_step_matches_eager_through_the_memory(embedded_model):
    eager, fast = _twins(embedded_model, SMALL)
    step = fast.compile_step(wait=True)
    assert step.ready.is_set() and step.compile_s is not None
    ids = eager.tokenizer.encode(TEXT)[:700]
    torch.testing.assert_close(fast.prefill(ids), eager.prefill(ids))
    graphs = counters["stats"]["unique_graphs"]
    token_e = token_f = 13
    for _ in range(20):  # past eviction and several retrievals (every 8th step) with the memory
        a, b = eager.forward([token_e])[-1], fast.forward([token_f])[-1]
        # fused float32 sums, then K and V rounded to 16 bits: a last-bit difference can move a stored key by
        # one fp16 step; logits span ~30, a wrong attention would move them by whole units
        torch.testing.assert_close(b, a, atol=5e-2, rtol=0)
        assert int(a.argmax()) == int(b.argmax())
        token_e, token_f = int(a.argmax()), int(b.argmax())
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation at new depths
    assert fast.memory.n_tokens == eager.memory.n_tokens == len(ids) + 20


def test_compiled_step_on_the_files_blocks_moves_logits_only_at_the_rounding_level(embedded_model):
    # ggml rounds each product's input to 8 bits, and eager runs whole layers as ggml graphs (ggml's RMSNorm)
    # where the compiled step calls the products between PyTorch ops: a rounding flips now and then, which
    # moves logits by ~0.1 (near-ties may swap), where a wrong step would move them by whole units
    # Eviction by recency: TEXT repeats one sentence, so attention mass (the default scorer) ties tokens whose
    # order a rounding flip may swap, and the two memories would then keep different tokens: another test
    eager, fast = _twins(embedded_model, MemoryConfig(**{**SMALL.to_dict(), "scorer": "window"}), "gguf")
    fast.compile_step(wait=True)
    ids = eager.tokenizer.encode(TEXT)[:400]
    eager.prefill(ids), fast.prefill(ids)
    token = 13
    for _ in range(8):
        a, b = eager.forward([token])[-1], fast.forward([token])[-1]
        assert float(a[int(b.argmax())]) > float(a.max()) - 0.3  # the compiled choice is eager's or a near-tie
        assert float(torch.corrcoef(torch.stack((a, b)))[0, 1]) > 0.999
        token = int(a.argmax())


def test_steps_before_the_compile_is_ready_run_eager(embedded_model):
    engine = Engine.load(embedded_model, device="cpu")
    step = CompiledStep(engine.model)  # never started
    ids = engine.tokenizer.encode("Hello there, how are you?")
    engine.step = step
    out = engine.forward(ids)
    assert out.shape[-1] == engine.spec.vocab_size and not step.ready.is_set()
    assert engine.forward([int(out[-1].argmax())]).shape == (1, engine.spec.vocab_size)
