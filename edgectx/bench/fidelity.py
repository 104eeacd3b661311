"""`edgectx bench fidelity`: the long-context memory vs full attention on the same model and text.

Teacher-forced over real text: the same ids go through plain full attention and through ContextMemory
with a device budget; we compare top-1 predictions and the NLL of the true next token. Positions before
the budget fills are identical by construction, so agreement is also reported past the budget alone.

    edgectx bench fidelity --context 8192 --budget 2048 --json
    edgectx bench fidelity --budget 2048,1024,512 --scorer window,attention,heads --json  # nine runs, one full pass
    edgectx bench fidelity --budget 512 --scorer heads,oracle --json  # the heads vs the labels they learn
"""

from __future__ import annotations

import time

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.oracle import oracle_scorer
from edgectx.bench.teacher import run_header, teacher_forced
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig


def run_fidelity(engine: Engine, context: int, configs: MemoryConfig | list[MemoryConfig], text_file: str | None = None,
                 corpus: str = "stdlib", oracles: list[str | None] | None = None, decode_tail: int = 0) -> dict:
    """One config: a flat result. Several (budgets x scorers): full attention runs once, then `runs` has one each.
    `oracles[i]`, when given, names an edgectx.bench.oracle scorer that replaces config i's. `decode_tail`: the last
    that many positions go through one-token steps, in both engines (the path generation takes: decode-time
    retrieval every `retrieve_every`th step, eviction every `evict_every`th), scored apart as `decode_*`."""
    configs = [configs] if isinstance(configs, MemoryConfig) else list(configs)
    oracles = oracles or [None] * len(configs)
    ids = corpus_tokens(engine.tokenizer, context + 1, text_file, corpus=corpus)
    engine.configure_memory(None, n_ctx=context + 1)
    top_full, nll_full, _ = teacher_forced(engine, ids, configs[0].chunk_tokens, decode_tail=decode_tail)
    oracle_scorers = {name: oracle_scorer(engine, ids[:-1], name) for name in dict.fromkeys(oracles) if name}
    runs = []
    for config, oracle in zip(configs, oracles):
        engine.configure_memory(config, scorer=oracle_scorers.get(oracle))
        t0 = time.perf_counter()
        top_mem, nll_mem, stats = teacher_forced(engine, ids, config.chunk_tokens, decode_tail=decode_tail)
        elapsed = time.perf_counter() - t0
        agree = top_full == top_mem
        past = slice(config.budget_tokens, None)
        full_mean, mem_mean = float(nll_full.mean()), float(nll_mem.mean())
        runs.append({
            **run_header(engine, context, config, text_file, corpus),
            **({"scorer": oracle} if oracle else {}),
            "top1_agreement": float(agree.mean()),
            "top1_agreement_past_budget": float(agree[past].mean()) if context > config.budget_tokens else 1.0,
            "nll_full": full_mean,
            "nll_memory": mem_mean,
            "nll_rel_diff": (mem_mean - full_mean) / full_mean,
            "nll_rel_diff_past_budget": float((nll_mem[past].mean() - nll_full[past].mean()) / nll_full[past].mean())
            if context > config.budget_tokens else 0.0,
            **(_decode_tail_scores(agree, nll_full, nll_mem, decode_tail) if decode_tail else {}),
            "evicted_tokens": stats["evicted_tokens"],
            "device_kv_bytes": stats["device_kv_bytes"],
            "elapsed_s": round(elapsed, 2),  # the teacher-forced pass: what the scorer's own work costs shows here
            "memory_config": config.to_dict(),
        })
    if len(runs) == 1:
        return runs[0]
    keep = ("model", "text", "context", "positions", "nll_full")
    return {**{k: runs[0][k] for k in keep}, "runs": runs}


def _decode_tail_scores(agree, nll_full, nll_mem, decode_tail: int) -> dict:
    """Agreement and NLL over the positions fed one token at a time (the last `decode_tail`)."""
    tail = slice(len(agree) - min(decode_tail, len(agree)), None)
    full_tail, mem_tail = float(nll_full[tail].mean()), float(nll_mem[tail].mean())
    return {"decode_tail": decode_tail, "decode_top1_agreement": float(agree[tail].mean()),
            "decode_nll_rel_diff": (mem_tail - full_tail) / full_tail}
