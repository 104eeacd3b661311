"""CUDA graphs for the one-token decode step: captured once per shape class, replayed every step, eager otherwise.

Eager decode on a GPU is bound by kernel launches, not arithmetic: ~50 small ops a layer, each a few microseconds
of Python and driver work, about 1,900 launches a token on an 8B model (issue 21). A CUDA graph records a step's
launches once and replays them in one call. `CudaGraphStep` wraps the model as `Engine.step`: for a one-token step
whose memory offers a graph step (edgectx.model.graph_step: full attention always, unless a sliding-window mask
applies; the long-context memory in its steady state, edgectx.memory.graph_step) it

1. looks the step's shape-class key up among the graphs it holds (the last few: a memory that rebuilds its
   context into buffers at alternating addresses hits them again);
2. if none matches, runs the step once eagerly on a side stream (Triton compiles, cuBLAS settles) and captures it
   with `torch.cuda.graph`, reading the token from a static buffer and writing static logits;
3. writes this step's column and position into the memory's static device tensor and the token into the static
   buffer (in place: the addresses the graph baked in), replays, lets the memory do its host bookkeeping, and
   returns a copy of the logits (the engine keeps logits across steps; the static ones change at the next replay).

Every other forward runs the model eagerly, the reference the graph is tested against: prefill chunks,
all-logits calls, steps a memory declines (retrieval, eviction, a rebuilt context's first step), and everything
after a capture failed (one warning). `EDGECTX_CUDA_GRAPHS=0` turns graphs off; they are never used off CUDA.
A captured graph holds no reference to the memory's buffers: it is valid for any step whose key, which names
every buffer's address and shape, is equal, and a memory that reallocates a buffer gets a new key.

    step = with_cuda_graphs(model, device)   # the model itself off CUDA or with EDGECTX_CUDA_GRAPHS=0
    memory.begin(1); logits = step(token, memory); memory.commit()
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from edgectx.model.graph_step import GraphStep, graph_step_of
from edgectx.model.kv import KVMemory

log = logging.getLogger(__name__)

ENV = "EDGECTX_CUDA_GRAPHS"
MAX_GRAPHS = 4  # shape classes held at once; each keeps a private pool of one step's activations

Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV, "1") != "0"


def with_cuda_graphs(model: nn.Module, device: torch.device):
    """What should run the engine's chunks on `device`: a `CudaGraphStep` on CUDA, else the model itself."""
    return CudaGraphStep(model) if graphs_enabled(device) else model


def capture_cuda(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm `run` up once on a side stream, capture it, and return (replay, its static output)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            run()  # first launches (Triton compiles, cuBLAS workspaces) happen outside the capture
    finally:
        current.wait_stream(side)  # also when it failed: the eager step that follows comes after its work
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: a CUDA call another thread makes meanwhile (the TUI, a copy stream) does not void the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = run()
    finally:
        # torch's `graph.__exit__` ends the capture before it restores the stream: a capture that fails to end
        # would leave this thread issuing everything after it on the capture stream, unordered with the rest
        torch.cuda.set_stream(current)
    return graph.replay, out


def capture_eager(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """The same protocol without CUDA: every replay runs the captured step again, into the same output tensor.
    Tests on the CPU use it to check the runner's keys, buffers and bookkeeping against the eager step."""
    out = run()

    def replay() -> None:
        out.copy_(run())

    return replay, out


@dataclass
class _Captured:
    replay: Callable[[], None]
    logits: torch.Tensor  # the graph's static output
    outputs: list  # what the captured step's layers recorded (static too), for the memory's `finish`


class CudaGraphStep:
    """Call like the model. One-token steps that a memory offers as graph steps replay a captured graph."""

    def __init__(self, model: nn.Module, capture: Capture = capture_cuda, max_graphs: int = MAX_GRAPHS):
        self.model, self.capture, self.max_graphs = model, capture, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()  # by shape-class key, least recently used first
        self.tokens: torch.Tensor | None = None  # (1,) the token a graph reads: one buffer for every graph
        self.failed: str | None = None  # why capturing failed; from then on every step runs eagerly
        self.n_captures = self.n_replays = self.n_eager = 0
        self._memory = None  # weakref to the memory the held graphs were captured for

    def __call__(self, tokens: torch.Tensor, memory: KVMemory, all_logits: bool = False) -> torch.Tensor:
        step = self.graph_step(tokens, memory, all_logits)
        if step is None:
            self.n_eager += 1
            return self.model(tokens, memory, all_logits=all_logits)
        step.prepare()
        if self.tokens is None or self.tokens.device != tokens.device:
            self.tokens = torch.zeros(1, dtype=tokens.dtype, device=tokens.device)
        self.tokens.copy_(tokens)
        captured = self.graphs.get(step.key)
        if captured is None:
            try:
                captured = self._capture(step)
            except Exception as e:  # noqa: BLE001 - whatever capture raises, the eager step is still right
                # The graph step wrote only the new token's column, which the eager step writes again.
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.graphs.clear()
                log.warning("Capturing the decode step in a CUDA graph failed (%s); decoding eagerly. "
                            "Set %s=0 to skip the attempt.", self.failed, ENV)
                self.n_eager += 1
                return self.model(tokens, memory, all_logits=all_logits)
        self.graphs.move_to_end(step.key)
        captured.replay()
        self.n_replays += 1
        step.finish(captured.outputs)
        return captured.logits.clone()

    def graph_step(self, tokens: torch.Tensor, memory: KVMemory, all_logits: bool = False) -> GraphStep | None:
        """The graph step for this call, or None where it runs eagerly."""
        if tokens.shape[0] != 1 or all_logits or self.failed is not None:
            return None
        if self._memory is None or self._memory() is not memory:
            self.graphs.clear()  # another conversation: its buffers are elsewhere; free the old graphs' pools
            self._memory = weakref.ref(memory)
        return graph_step_of(memory)

    def _capture(self, step: GraphStep) -> _Captured:
        tokens = self.tokens

        def run() -> torch.Tensor:
            return self.model(tokens, step)

        replay, logits = self.capture(run)
        captured = _Captured(replay, logits, step.outputs)
        self.graphs[step.key] = captured
        self.n_captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured

    def stats(self) -> dict:
        return {"captures": self.n_captures, "replays": self.n_replays, "eager": self.n_eager,
                "held": len(self.graphs), "failed": self.failed}
