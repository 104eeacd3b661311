"""`edgectx bench memory`: device and host KV bytes as the context grows, with one long prefill.

The memory engine reads `max(contexts)` tokens of real text in chunks; when the context reaches each
requested length the memory's stats are taken. Device bytes should stay flat (the budget) and host
bytes grow linearly (every token kept). Also reports the prefill time and the process's peak RSS.

    edgectx bench memory --contexts 8192,32768,131072 --json
"""

from __future__ import annotations

import time

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.longppl import _progress
from edgectx.bench.rss import peak_rss_bytes
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig


def run_memory(engine: Engine, contexts: list[int], config: MemoryConfig, text_file: str | None = None,
               corpus: str = "docs", quiet: bool = False) -> dict:
    ids = corpus_tokens(engine.tokenizer, max(contexts), text_file, corpus=corpus)
    engine.configure_memory(config)
    pending = sorted(set(contexts))
    points = []
    report = None if quiet else _progress("prefill")
    t0 = time.perf_counter()
    done = 0
    # Chunks end exactly at each requested length, so every measurement is taken at its own context.
    for target in pending:
        chunk_end = target
        while done < chunk_end:
            step = min(config.chunk_tokens, chunk_end - done)
            engine.forward(ids[done : done + step])
            done += step
            if report:
                report(done, max(contexts))
        stats = engine.stats()
        points.append({
            "context": target,
            "elapsed_s": time.perf_counter() - t0,
            "device_kv_bytes": stats["device_kv_bytes"],
            "host_kv_bytes": stats["host_kv_bytes"],
            "device_repr_bytes": stats["device_repr_bytes"],
            "evicted_tokens": stats["evicted_tokens"],
            "peak_rss_bytes": peak_rss_bytes(),
        })
    first, last = points[0], points[-1]
    return {
        "model": engine.path.name,
        "budget_tokens": config.budget_tokens,
        "positions": config.positions,
        "runs": points,
        "device_growth": last["device_kv_bytes"] / first["device_kv_bytes"] - 1,
        "host_bytes_per_token": [p["host_kv_bytes"] / p["context"] for p in points],
        "prefill_tok_s": last["context"] / last["elapsed_s"],
        "fp16_kv_bytes_per_token": engine.spec.kv_bytes_per_token(2),
    }
