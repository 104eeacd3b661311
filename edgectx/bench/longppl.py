"""`edgectx bench longppl`: NLL by position bucket, far past the model's trained context.

The memory engine reads the whole text in chunks and scores every next token; full attention scores
the same text up to `full_max` tokens (its cost grows with the square of the length, and past the
trained context its positions leave the range the model knows: the contrast this benchmark shows).
`memory_by_context` records the memory's device and host bytes, elapsed time and peak RSS as the
context passes each bucket edge. The default text is `python-docs` (the language reference and module docstrings: English prose of
even difficulty throughout), so a rising NLL means the memory, not the text, got worse.

    edgectx bench longppl --context 131072 --budget 2048 --json
"""

from __future__ import annotations

import sys
import time

import numpy as np

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.rss import peak_rss_bytes
from edgectx.bench.teacher import run_header, teacher_forced
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig


def bucket_edges(context: int) -> list[int]:
    """0, 4K, 8K, 16K, ... doubling up to `context`."""
    edges = [0, 4096]
    while edges[-1] < context:
        edges.append(min(edges[-1] * 2, context))
    return edges if context > 4096 else [0, context]


def _label(start: int, end: int) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n % 1024 == 0 else str(n)

    return f"{k(start) if start else 0}-{k(end)}"


def _bucket_means(nll: np.ndarray, edges: list[int]) -> list[float | None]:
    return [float(nll[a:b].mean()) if len(nll) >= b else None for a, b in zip(edges, edges[1:])]


def _progress(label: str):
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - t0)
        print(f"\r{label}: {done:,}/{total:,} tokens, {rate:,.0f} tok/s", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)

    return report


def run_longppl(engine: Engine, context: int, config: MemoryConfig, full_max: int = 16384,
                text_file: str | None = None, corpus: str = "docs", quiet: bool = False) -> dict:
    ids = corpus_tokens(engine.tokenizer, context + 1, text_file, corpus=corpus)
    edges = bucket_edges(context)
    engine.configure_memory(config)
    points, show = [], None if quiet else _progress("memory")
    t0 = time.perf_counter()

    def on_chunk(done: int, total: int) -> None:
        if done in edges:  # the memory's bytes as the context passes each bucket edge (as `bench memory` does)
            s = engine.stats()
            points.append({"context": done, "elapsed_s": time.perf_counter() - t0, "device_kv_bytes": s["device_kv_bytes"],
                           "host_kv_bytes": s["host_kv_bytes"], "peak_rss_bytes": peak_rss_bytes()})
        if show:
            show(done, total)

    _, nll_mem, stats = teacher_forced(engine, ids, config.chunk_tokens, progress=on_chunk)
    memory_s = time.perf_counter() - t0
    full_tokens = min(full_max, context)
    nll_full = np.empty(0)
    if full_tokens > 0:
        engine.configure_memory(None, n_ctx=full_tokens + 1)
        _, nll_full, _ = teacher_forced(engine, ids[: full_tokens + 1], config.chunk_tokens,
                                        progress=None if quiet else _progress("full attention"))
    memory_buckets = _bucket_means(nll_mem, edges)
    return {
        **run_header(engine, context, config, text_file, corpus),
        "trained_context": engine.spec.context_length,
        "buckets": [_label(a, b) for a, b in zip(edges, edges[1:])],
        "nll_memory": memory_buckets,
        "nll_full": _bucket_means(nll_full, edges),
        "memory_vs_first_bucket": [m / memory_buckets[0] - 1 for m in memory_buckets],
        "full_attention_tokens": full_tokens,
        "memory_s": memory_s,
        "memory_by_context": points,
        "device_kv_bytes": stats["device_kv_bytes"],
        "host_kv_bytes": stats["host_kv_bytes"],
        "peak_rss_bytes": peak_rss_bytes(),
    }
