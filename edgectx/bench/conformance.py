"""`edgectx bench conformance`: teacher-forced next-token predictions, edgectx vs llama.cpp, same GGUF.

Both read the same token ids; at every position we compare the top-1 prediction and the negative
log-likelihood of the true next token.

    edgectx bench conformance --json   # {"n_tokens": 4096, "top1_agreement": ..., "nll_rel_diff": ...}
"""

from __future__ import annotations

import numpy as np
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.reference import LlamaCppReference
from edgectx.bench.teacher import logits_chunks, score
from edgectx.engine import Engine


def run_conformance(engine: Engine, n_tokens: int = 4096, text_file: str | None = None, n_threads: int = 2) -> dict:
    ids = corpus_tokens(engine.tokenizer, n_tokens + 1, text_file)
    targets = np.asarray(ids[1:], dtype=np.int64)
    inputs = ids[:-1]
    ref = LlamaCppReference(engine.path, n_ctx=n_tokens + 16, n_threads=n_threads, all_logits=True)
    ref.eval(inputs)
    top_e, nll_e, top_r, nll_r = [], [], [], []
    for start, logits in logits_chunks(engine, inputs):
        end = start + len(logits)
        expected = torch.from_numpy(targets[start:end])
        a, n = score(logits, expected)
        b, m = score(torch.from_numpy(ref.logits(start, end)), expected)
        top_e.append(a), nll_e.append(n), top_r.append(b), nll_r.append(m)
    ref.close()
    engine.reset()
    top_e, top_r = np.concatenate(top_e), np.concatenate(top_r)
    nll_edgectx, nll_llama = float(np.concatenate(nll_e).mean()), float(np.concatenate(nll_r).mean())
    return {
        "model": engine.path.name,
        "text": text_file or "python-stdlib",
        "n_tokens": int(len(targets)),
        "top1_agreement": float((top_e == top_r).mean()),
        "nll_edgectx": nll_edgectx,
        "nll_llama_cpp": nll_llama,
        "nll_rel_diff": (nll_edgectx - nll_llama) / nll_llama,
    }
