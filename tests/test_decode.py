"""The compiled decode step against the eager model, on a tiny GGUF model (it compiles in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from edgectx.model.decode import cpp_compiler_available
from edgectx.engine import Engine
from tiny_gguf import write_tiny_gguf


def _engines(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2")  # qwen2: the QKV bias goes through the packed op too
    return Engine.load(path, device="cpu"), Engine.load(path, device="cpu")


@pytest.mark.skipif(not cpp_compiler_available(), reason="TorchInductor needs a C++ compiler")
# The CPU's float16 cache rounds each new key, where compiled and eager arithmetic (~1e-6 apart) now and then round
# to neighbouring float16 values: measured, the logits then differ by up to 4e-3, while float16 instead of float32
# moves them by 1e-2 to 3e-2 (logits up to 42).
@pytest.mark.parametrize("kv_dtype, atol, rtol", [("float32", 1e-4, 1e-4), ("auto", 1e-2, 0.0)])
def test_compiled_decode_matches_eager_across_depths_without_recompiling(tmp_path, monkeypatch, kv_dtype, atol, rtol):
    monkeypatch.setenv("EDGECTX_KV_DTYPE", kv_dtype)
    eager, fast = _engines(tmp_path)
    assert fast.memory.layers[0].k.dtype == (torch.float32 if kv_dtype == "float32" else torch.float16)
    decode = fast.compile_decode()
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 250)]
    torch.testing.assert_close(fast.prefill(ids), eager.prefill(ids))
    graphs_before = counters["stats"]["unique_graphs"]
    for token in ids[:12]:  # positions 250..261 cross the cache's growth at 256 tokens (an eager step)
        torch.testing.assert_close(fast.forward([token]), eager.forward([token]), atol=atol, rtol=rtol)
    assert decode.compile_s is not None
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # one graph for every depth and capacity
    assert fast.memory.n_tokens == eager.memory.n_tokens == 262


def test_failed_compile_falls_back_to_eager_and_keeps_memory(tmp_path, monkeypatch):
    eager, fast = _engines(tmp_path)
    decode = fast.compile_decode()

    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(decode, "_compiled", broken)
    ids = list(range(3, 40))
    fast.prefill(ids), eager.prefill(ids)
    for token in (5, 6):
        torch.testing.assert_close(fast.forward([token]), eager.forward([token]))
    assert decode.compile_s is None and not decode.supports(fast.memory, 1)
    assert fast.memory.n_tokens == eager.memory.n_tokens == len(ids) + 2
