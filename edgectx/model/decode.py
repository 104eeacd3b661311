"""One-token decode over a `FullKVCache`, compiled whole (all layers, one graph) with TorchInductor.

Eager decode of a small model on a CPU spends about a third of each step in per-op overhead: ~40
small ops per layer, each paying Python and dispatcher costs (measured 14 of 44 ms on SmolLM2-135M). Compiling the whole step fuses the norms,
RoPE, cache writes and SwiGLU into a few C++ kernels per layer; the fp16 GEMVs and SDPA stay extern
calls. The model is unchanged: the compiled function runs `model(tokens, memory)` with a `LayerKV`
that writes straight into the cache's buffers. The cache length and capacity are symbolic sizes, so
one graph serves every depth (compiled once per process; Inductor caches the kernels on disk).

Anything else (a chunk of several tokens, a sliding-window mask, a step that fills or grows the cache,
another memory) runs the eager model, as does everything after a failed compile (no C++ compiler).

    decode = CompiledDecode(model)
    memory.begin(len(tokens))
    logits = decode(tokens, memory)  # same result as model(tokens, memory)
    memory.commit()
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from edgectx.model.kv import FullKVCache, KVMemory, grouped_attention
from edgectx.model.rope import Rope

log = logging.getLogger(__name__)


class _StepLayer:
    """`_FullLayer.attend` for one token written at `end - 1` of preallocated buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rope: Rope, cos: torch.Tensor, signed_sin: torch.Tensor, end: int):
        self.k, self.v, self.rope, self.cos, self.signed_sin, self.end = k, v, rope, cos, signed_sin, end

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_heads, end = q.shape[0], self.end
        k = k.to(self.k.dtype).to(q.dtype)  # the key as stored, then rotated (edgectx.model.kv)
        qk = self.rope.rotate(torch.cat((q, k)), self.cos, self.signed_sin)
        self.k[:, end - 1 : end] = qk[n_heads:]
        self.v[:, end - 1 : end] = v
        # A 16-bit cache is widened inside the graph: Inductor plans that buffer itself.
        k_all, v_all = self.k[:, :end].to(q.dtype), self.v[:, :end].to(q.dtype)
        return grouped_attention(qk[:n_heads], k_all, v_all, None)


class _StepMemory:
    def __init__(self, layers: list[_StepLayer]):
        self.layers = layers


def _decode_step(model: nn.Module, tokens: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                 rope: Rope, cos: torch.Tensor, signed_sin: torch.Tensor, end: int) -> torch.Tensor:
    layers = [_StepLayer(k, v, rope, cos, signed_sin, end) for k, v in zip(ks, vs)]
    return model(tokens, _StepMemory(layers))


def cpp_compiler_available() -> bool:
    """Inductor's CPU kernels are C++ built at run time: without a compiler, decode stays eager."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # a missing compiler, or a torch without this (private) helper
        return False
    return True


class CompiledDecode:
    """Call like the model; runs one-token steps over a FullKVCache through the compiled graph."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.compile_s: float | None = None  # wall time of the first compiled call, compile included
        self._compiled = torch.compile(_decode_step, dynamic=True, fullgraph=True)
        self._failed = not cpp_compiler_available()
        if self._failed:
            log.warning("No C++ compiler found (set CXX, or install g++): decoding without compilation.")

    def supports(self, memory: KVMemory, n_new: int) -> bool:
        if self._failed or n_new != 1 or not isinstance(memory, FullKVCache) or memory.mask is not None:
            return False
        # Dynamo specializes a length of 1 and a slice to the full capacity: each would be a second
        # compile, so those rare steps (the first token, one per cache growth) run eager.
        end = memory.n_tokens + 1
        return end >= 2 and memory.layers[0].k.shape[1] > end

    def __call__(self, tokens: torch.Tensor, memory: KVMemory, all_logits: bool = False) -> torch.Tensor:
        if not self.supports(memory, tokens.shape[0]):
            return self.model(tokens, memory, all_logits=all_logits)
        m: FullKVCache = memory
        args = (self.model, tokens, [l.k for l in m.layers], [l.v for l in m.layers], m.rope, *m.rope_tables, m.n_tokens + 1)
        if self.compile_s is not None:
            return self._compiled(*args)
        t0 = time.perf_counter()
        try:
            logits = self._compiled(*args)
        except Exception as e:  # it wrote past the committed tokens only, so the memory is as it was
            self._failed = True
            log.warning("Compiling the decode step failed (%s); decoding without compilation.", e)
            return self.model(tokens, memory, all_logits=all_logits)
        self.compile_s = time.perf_counter() - t0
        return logits
