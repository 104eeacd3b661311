"""Teacher-forced scoring shared by the quality benchmarks: per-position top-1 and NLL of the true next token.

    top1, nll, stats = teacher_forced(engine, ids)  # numpy arrays of len(ids) - 1, engine.stats() at the end
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig


def score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, nll of targets) per row of `logits` (n, vocab)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp[torch.arange(len(targets)), targets]
    return logits.argmax(-1).numpy(), nll.numpy()


def logits_chunks(engine: Engine, ids: list[int], chunk_tokens: int = 512,
                  decode_tail: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits (n, vocab)) for teacher-forced chunks of `ids`, from an empty memory; the last
    `decode_tail` ids go in one at a time, as generation feeds them (the one-token step: on a CPU the fused ggml
    step, and the memory's decode-time retrievals and evictions)."""
    engine.reset()
    n_chunked = len(ids) - min(decode_tail, len(ids))
    for start in range(0, n_chunked, chunk_tokens):
        yield start, engine.forward(ids[start : min(start + chunk_tokens, n_chunked)], all_logits=True).float().cpu()
    for start in range(n_chunked, len(ids)):
        yield start, engine.forward([ids[start]]).float().cpu()  # (1, vocab): the step generation takes


def teacher_forced(engine: Engine, ids: list[int], chunk_tokens: int = 512,
                   progress: Callable[[int, int], None] | None = None,
                   decode_tail: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-1 predictions and NLL for positions 0..len(ids)-2 (each predicting the next id), and the
    memory's stats once every id is in; the last `decode_tail` positions one token at a time (logits_chunks)."""
    targets = torch.tensor(ids[1:])
    inputs = ids[:-1]
    tops, nlls = [], []
    for start, logits in logits_chunks(engine, inputs, chunk_tokens, decode_tail):
        top, nll = score(logits, targets[start : start + len(logits)])
        tops.append(top), nlls.append(nll)
        if progress:
            progress(start + len(logits), len(inputs))
    stats = engine.stats()
    engine.reset()
    return np.concatenate(tops), np.concatenate(nlls), stats


def run_header(engine: Engine, context: int, config: MemoryConfig, text_file: str | None, corpus: str) -> dict:
    """The fields every long-context benchmark result starts with."""
    return {"model": engine.path.name, "text": text_file or f"python-{corpus}", "context": context,
            "budget_tokens": config.budget_tokens, "positions": config.positions,
            "scorer": engine.scorer(config.scorer).name}
