"""`edgectx bench reopen`: what a snapshot saves when a long document is reopened, and what it costs in quality.

Prefills `context` tokens of real text with the memory engine (timed), snapshots the memory, restores it
into a second engine (sharing the weights, with a fresh memory; timed), then teacher-forces the next
`next_tokens` tokens through both the live and the restored memory: top-1 agreement and the NLL of the
true next token. The first scored prediction comes from the logits saved in the snapshot. Sizes are
compared with fp16 K and V of every token (`spec.kv_bytes_per_token(2) * context`).

    edgectx bench reopen --context 32768 --codec int4 --json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.teacher import run_header, score
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig


def _twin(engine: Engine) -> Engine:
    """A second engine over the same weights, with no memory of its own yet (full attention until restored)."""
    return Engine(engine.path, engine.model, engine.spec, engine.tokenizer, engine.template, engine.device, engine.dtype,
                  fingerprint=engine.fingerprint, heads_path=engine.heads_path)


def _next_logits(engine: Engine, ids: list[int], chunk_tokens: int) -> torch.Tensor:
    """Logits predicting each of `ids` (n, vocab): the memory's next-token logits, then teacher-forced chunks."""
    rows = [engine.next_logits.float().cpu()[None]]
    for start in range(0, len(ids) - 1, chunk_tokens):
        rows.append(engine.forward(ids[start : min(start + chunk_tokens, len(ids) - 1)], all_logits=True).float().cpu())
    return torch.cat(rows)


def run_reopen(engine: Engine, context: int, config: MemoryConfig, codec: str = "int4", next_tokens: int = 512,
               text_file: str | None = None, corpus: str = "docs", snapshot_path: str | None = None) -> dict:
    ids = corpus_tokens(engine.tokenizer, context + next_tokens, text_file, corpus=corpus)
    doc, nxt = ids[:context], ids[context:]
    engine.configure_memory(config)
    t0 = time.perf_counter()
    engine.prefill(doc)
    prefill_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(snapshot_path) if snapshot_path else Path(tmp) / "reopen.edgectxs"
        snap = engine.snapshot(path, codec=codec)
        restored = _twin(engine)
        info = restored.restore(path)
    evicted_tokens = engine.stats()["evicted_tokens"]
    live_logits = _next_logits(engine, nxt, config.chunk_tokens)
    restored_logits = _next_logits(restored, nxt, config.chunk_tokens)
    targets = torch.tensor(nxt)
    top_live, nll_live = score(live_logits, targets)
    top_restored, nll_restored = score(restored_logits, targets)
    fp16_kv_bytes = engine.spec.kv_bytes_per_token(2) * context
    return {
        **run_header(engine, context, config, text_file, corpus),
        "codec": codec,
        "threads": torch.get_num_threads(),
        "prefill_s": prefill_s,
        "snapshot_s": snap.elapsed_s,
        "snapshot_bytes": snap.snapshot_bytes,
        "fp16_kv_bytes": fp16_kv_bytes,
        "size_ratio": snap.snapshot_bytes / fp16_kv_bytes,
        "restore_s": info.elapsed_s,
        "speedup": prefill_s / info.elapsed_s,
        "next_tokens": len(nxt),
        "top1_agreement": float((top_live == top_restored).mean()),
        "nll_live": float(nll_live.mean()),
        "nll_restored": float(nll_restored.mean()),
        "max_abs_logit_diff": float((live_logits - restored_logits).abs().max()),
        "evicted_tokens": evicted_tokens,
        "memory_config": config.to_dict(),
    }
