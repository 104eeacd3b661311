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

VIEWS = {"slice", "view", "alias", "as_strided", "expand", "transpose", "t", "select", "unsqueeze", "squeeze",
         "_unsafe_view", "permute", "detach", "detach_", "unbind", "split", "narrow", "reshape", "lift_fresh"}


class HostOps(TorchDispatchMode):
    """The ops dispatched while `inside` is 0 (a replay raises it), views aside."""

    def __init__(self):
        super().__init__()
        self.n, self.inside = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.inside == 0 and func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


def _reference_decode(q, k, v, **options):
    from edgectx.kernels.reference import decode_attention_reference

    return decode_attention_reference(q, k, v, **{a: b for a, b in options.items() if a not in ("n_splits", "block_n")})


def count(context: int, steps: int, seed: int = 0) -> dict:
    from edgectx import kernels
    from edgectx.engine import Engine
    from edgectx.memory.config import MemoryConfig, default_chunk_tokens
    from edgectx.memory.context import ContextMemory
    from edgectx.model.cuda_graph import CudaGraphStep, capture_eager
    from edgectx.model.synthetic import SYNTHETIC, build_synthetic

    kernels.available, kernels.decode = (lambda device: True), _reference_decode  # the GPU's attention and graph steps
    base = SYNTHETIC["llama-3.1-8b"]
    spec = dataclasses.replace(base, dim=256, ffn_dim=512, vocab_size=1024, head_dim=16, rope_dim=0,
                               rope_freq_factors=None)
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    model, spec = build_synthetic(spec, cpu, torch.float32, weights="fp16")
    config = MemoryConfig(chunk_tokens=default_chunk_tokens("cuda"))
    engine = Engine(Path("synthetic-llama-3.1-8b"), model, spec, None, None, cpu, torch.float32, memory_config=config)
    engine.memory = ContextMemory(spec, engine.rope, cpu, engine.dtype, config, kv_dtype=engine.kv_dtype,
                                  scorer=engine.memory.scorer, device_bookkeeping=True)
    log = HostOps()

    def capture(run):
        replay, out = capture_eager(run)

        def counted():  # what a graph replays: no host op on a GPU
            log.inside += 1
            try:
                replay()
            finally:
                log.inside -= 1

        return counted, out

    runner = engine.step = CudaGraphStep(engine.model, capture=capture)
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
