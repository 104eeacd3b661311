"""What the host issues per long-context decode step on the GPU path, counted on a CPU (issue 21; docs/gpu-host-ops.md).

A decode step replayed from a CUDA graph costs the host only what it dispatches outside the replay; retrieval and
eviction add host work of their own. This counts it without a GPU: synthetic Llama-3.1-8B's layer shape (32 layers,
32 query heads over 8 KV heads) made narrow (dim 256, head_dim 16) so that a CPU runs it, the GPU's memory defaults
(2,048-token chunks), the memory's device path (`device_bookkeeping`), the CUDA-graph runner replaying with
`capture_eager`, and the decode kernel's torch reference in the kernel's place (Triton's interpreter takes seconds
a launch). Every aten op dispatched outside the replay is counted, views aside: on CUDA each is a launch or a copy.
These are counts, not times. Prints one JSON object: per kind of step (steady, retrieval, evicting, capture), how
many there were and the median and largest count, and the runner's counters.

    python packaging/host_ops.py --context 8192 --steps 160 > host-ops.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgectx import kernels
from edgectx.engine import Engine
from edgectx.kernels.reference import decode_attention_reference
from edgectx.memory.config import MemoryConfig, default_chunk_tokens
from edgectx.memory.context import ContextMemory
from edgectx.model.cuda_graph import CudaGraphStep, capture_eager
from edgectx.model.synthetic import SYNTHETIC, build_synthetic

# Llama-3.1-8B's layers and heads, narrow; the GPU's memory defaults (tests/test_gpu_rehearsal.py runs them too)
SHAPE = dataclasses.replace(SYNTHETIC["llama-3.1-8b"], dim=256, ffn_dim=512, vocab_size=1024, head_dim=16, rope_dim=0,
                            rope_freq_factors=None)
GPU_DEFAULTS = MemoryConfig(chunk_tokens=default_chunk_tokens("cuda"))
VIEWS = {"slice", "view", "alias", "as_strided", "expand", "transpose", "t", "select", "unsqueeze", "squeeze",
         "_unsafe_view", "permute", "detach", "detach_", "unbind", "split", "narrow", "reshape", "lift_fresh"}


class HostOps(TorchDispatchMode):
    """The ops dispatched while `inside` is 0 (a replay raises it), views and the wrapping of host lists aside."""

    def __init__(self):
        super().__init__()
        self.n, self.inside = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.inside == 0 and func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))

    def around(self, capture):
        """`capture` (edgectx.model.cuda_graph's protocol) whose replays are not counted: on a GPU what a graph
        replays costs the host nothing."""

        def counting(run):
            replay, out = capture(run)

            def counted():
                self.inside += 1
                try:
                    replay()
                finally:
                    self.inside -= 1

            return counted, out

        return counting


def reference_decode(q, k, v, **options):
    """The decode kernel's torch reference with the kernel's call (its tiling options dropped)."""
    return decode_attention_reference(q, k, v, **{a: b for a, b in options.items() if a not in ("n_splits", "block_n")})


def gpu_path_engine(model, spec, device_path: bool = True, capture=capture_eager) -> Engine:
    """A CPU engine for `model` with the GPU's memory defaults; `device_path`: its memory as on CUDA (bookkeeping on
    the device) and one-token steps through the CUDA-graph runner with `capture`. Else the CPU's plain path."""
    engine = Engine(Path("synthetic-llama-3.1-8b"), model, spec, None, None, torch.device("cpu"), torch.float32,
                    memory_config=GPU_DEFAULTS)
    if device_path:
        engine.memory = ContextMemory(spec, engine.rope, engine.device, engine.dtype, GPU_DEFAULTS,
                                      kv_dtype=engine.kv_dtype, scorer=engine.memory.scorer, device_bookkeeping=True)
        engine.step = CudaGraphStep(engine.model, capture=capture)
    return engine


def count(context: int, steps: int, seed: int = 0) -> dict:
    kernels.available, kernels.decode = (lambda device: True), reference_decode  # the GPU's attention and graph steps
    torch.manual_seed(seed)
    model, spec = build_synthetic(SHAPE, torch.device("cpu"), torch.float32, weights="fp16")
    log = HostOps()
    engine = gpu_path_engine(model, spec, capture=log.around(capture_eager))
    runner, config = engine.step, GPU_DEFAULTS
    ids = torch.randint(0, spec.vocab_size, (context + steps,), generator=torch.Generator().manual_seed(seed)).tolist()
    kinds: dict[str, list[int]] = {}
    with torch.inference_mode():
        engine.prefill(ids[:context])
        for token in ids[context:]:
            memory = engine.memory
            before = (runner.n_replays, runner.n_captures, memory.record.n_retrievals, memory.stats()["evicted_tokens"])
            log.n = 0
            with log:
                engine.forward([token])
            if runner.n_captures > before[1]:
                kind = "capture"
            elif runner.n_replays == before[0]:
                kind = "eager"
            elif memory.stats()["evicted_tokens"] != before[3]:
                kind = "evicting"
            elif memory.record.n_retrievals > before[2]:
                kind = "retrieval"
            else:
                kind = "steady"
            kinds.setdefault(kind, []).append(log.n)
    return {"model": "synthetic llama-3.1-8b layer shape (dim 256, head_dim 16)", "context": context, "steps": steps,
            "chunk_tokens": config.chunk_tokens, "retrieve_every": config.retrieve_every,
            "evict_every": config.evict_every,
            "host_ops": {kind: {"steps": len(n), "median": statistics.median(n), "max": max(n)}
                         for kind, n in kinds.items()},
            "graphs": runner.stats()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=160, help="decode steps counted")
    args = parser.parse_args()
    print(json.dumps(count(args.context, args.steps), indent=1))


if __name__ == "__main__":
    main()
