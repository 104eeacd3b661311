"""The one-token decode step of any memory, compiled once: attention is an opaque op, the rest one graph.

The long-context memory's attention (eviction, retrieval, block copies) is Python and data-dependent; the
rest of a decode step (embedding, norms, projections, RoPE-free SwiGLU, residuals: ~25 small ops a layer)
is the same for every token. `CompiledStep` traces the model once with each layer's `attend` replaced by
the op `edgectx::attend(q, k, v, layer)`, which calls the memory that the running step was handed. No
size in the graph depends on the depth, so one graph serves every depth and every memory (full attention
or ContextMemory); TorchInductor fuses the element-wise work into a few C++ kernels per layer, and the
quantized products stay extern calls (ggml's, fp16-packed or Triton, each an opaque op).

Compiling costs seconds to a minute, so it runs in a background thread (`start()`): until it is ready,
and for every step it does not cover (prefill chunks, all-logits calls), the eager model runs. Inductor's
caches live under edgectx's cache folder, so later runs reuse the compiled kernels.

    step = CompiledStep(model)
    step.start()                        # compiles in the background; eager meanwhile
    logits = step(tokens, memory)       # same result as model(tokens, memory)
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
from torch import nn

from edgectx.model.decode import cpp_compiler_available
from edgectx.model.kv import KVMemory

log = logging.getLogger(__name__)

_memory = threading.local()  # the memory the running compiled step attends with, per thread

_lib = torch.library.Library("edgectx", "FRAGMENT")
_lib.define("attend(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


@torch.library.impl(_lib, "attend", "CompositeExplicitAutograd")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return _memory.current.layers[layer].attend(q, k, v)


@torch.library.register_fake("edgectx::attend", lib=_lib)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


class _OpLayer:
    def __init__(self, index: int):
        self.index = index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgectx.attend(q, k, v, self.index)


class _OpMemory:
    def __init__(self, n_layers: int):
        self.layers = [_OpLayer(i) for i in range(n_layers)]


class _WarmUpLayer:
    """What the warm-up call attends with: the output's shape, no state."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(q, memory_format=torch.contiguous_format)


class _WarmUpMemory:
    def __init__(self, n_layers: int):
        self.layers = [_WarmUpLayer() for _ in range(n_layers)]


def use_edgectx_compile_cache() -> None:
    """Keep Inductor's compiled kernels under edgectx's cache folder (unless the user chose a folder)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from edgectx.config import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class CompiledStep:
    """Call like the model. One-token steps go through the compiled graph once `ready`; the rest run eager."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.n_layers = len(model.layers)
        self.compile_s: float | None = None  # wall time of the compile (the warm-up call included)
        self.ready = threading.Event()
        self.failed = not cpp_compiler_available()
        self._thread: threading.Thread | None = None
        self._ops = _OpMemory(self.n_layers)
        use_edgectx_compile_cache()
        self._compiled = torch.compile(self._run, fullgraph=True, dynamic=False)
        if self.failed:
            log.warning("No C++ compiler found (set CXX, or install g++): decoding without compilation.")

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self._ops)

    def _warm_up(self) -> None:
        t0 = time.perf_counter()
        _memory.current = _WarmUpMemory(self.n_layers)
        try:
            with torch.inference_mode():
                self._compiled(torch.zeros(1, dtype=torch.long, device=_device(self.model)))
        except Exception as e:
            self.failed = True
            log.warning("Compiling the decode step failed (%s); decoding without compilation.", e)
            return
        finally:
            _memory.current = None
        self.compile_s = time.perf_counter() - t0
        self.ready.set()

    def start(self, wait: bool = False) -> "CompiledStep":
        """Compile in a background thread (once); `wait` blocks until it is done (benchmarks)."""
        if not self.failed and self._thread is None:
            self._thread = threading.Thread(target=self._warm_up, name="edgectx-compile", daemon=True)
            self._thread.start()
        if wait and self._thread is not None:
            self._thread.join()
        return self

    def __call__(self, tokens: torch.Tensor, memory: KVMemory, all_logits: bool = False) -> torch.Tensor:
        if tokens.shape[0] != 1 or all_logits or self.failed or not self.ready.is_set():
            return self.model(tokens, memory, all_logits=all_logits)
        _memory.current = memory
        try:
            return self._compiled(tokens)
        finally:
            _memory.current = None


def _device(model: nn.Module) -> torch.device:
    return next(model.norm.parameters()).device
