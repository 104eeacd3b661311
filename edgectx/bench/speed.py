"""`edgectx bench speed`: prefill and decode throughput of edgectx and llama.cpp in the same run.

Same GGUF, same real text, same thread count. Prefill reads `context` tokens from empty; decode then
generates `decode_tokens` greedy tokens one at a time at that depth. Ratios are edgectx / llama.cpp.
Decode runs compiled (`Engine.compile_decode`) unless `compile_decode=False`; the warm-up pays the
compile, reported as `decode_compile_s` (None when compilation was unavailable and decode ran eager).

    edgectx bench speed --context 512,4096 --json
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.reference import LlamaCppReference
from edgectx.engine import Engine


def _edgectx_run(engine: Engine, ids: list[int], decode_tokens: int) -> dict:
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(torch.argmax(engine.forward([token])[-1]))
    decode_s = time.perf_counter() - t0
    engine.reset()
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode_tokens / decode_s}


def _llama_run(ref: LlamaCppReference, ids: list[int], decode_tokens: int) -> dict:
    ref.reset()
    t0 = time.perf_counter()
    ref.eval(ids)
    prefill_s = time.perf_counter() - t0
    token = int(np.argmax(ref.last_logits()))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        ref.eval([token])
        token = int(np.argmax(ref.last_logits()))
    decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode_tokens / decode_s}


def run_speed(engine: Engine, contexts: list[int], decode_tokens: int = 64, n_threads: int = 2,
              text_file: str | None = None, compile_decode: bool = True) -> dict:
    torch.set_num_threads(n_threads)
    compiled = engine.compile_decode() if compile_decode else None
    ids_all = corpus_tokens(engine.tokenizer, max(contexts), text_file)
    ref = LlamaCppReference(engine.path, n_ctx=max(contexts) + decode_tokens + 16, n_threads=n_threads)
    # Warm both up (first-call allocations, page faults on the weights) outside the timings.
    _edgectx_run(engine, ids_all[:64], 2)
    _llama_run(ref, ids_all[:64], 2)
    runs = []
    for context in contexts:
        ids = ids_all[:context]
        mine = _edgectx_run(engine, ids, decode_tokens)
        theirs = _llama_run(ref, ids, decode_tokens)
        runs.append({
            "context": context,
            "edgectx": mine,
            "llama_cpp": theirs,
            "prefill_ratio": mine["prefill_tok_s"] / theirs["prefill_tok_s"],
            "decode_ratio": mine["decode_tok_s"] / theirs["decode_tok_s"],
        })
    ref.close()
    return {"model": engine.path.name, "threads": n_threads, "decode_tokens": decode_tokens,
            "decode_compile_s": compiled and compiled.compile_s, "runs": runs}
