"""`edgectx bench conformance`: teacher-forced next-token predictions, edgectx vs llama.cpp, same GGUF, and both
against a 32-bit reference.

Every engine reads the same token ids; at every position we compare the top-1 prediction and the negative
log-likelihood (NLL) of the true next token. llama.cpp is not exact either: for quantized weights its CPU
kernels quantize activations to 8 bits. So by default a third engine runs, the same weights requantized to
F32 by llama.cpp's quantizer (edgectx.bench.f32_reference) and run by llama.cpp with an F32 KV cache; each
engine is scored against it (top-1, NLL, mean KL(reference || engine)) and `nearer_reference` names the one
with the higher top-1 agreement. The self-check (on with the reference) runs llama.cpp a second time with
n_batch 64 and another thread count: how far llama.cpp is from itself.

The engines run in lockstep over chunks of 512 positions, and only a chunk's logits are held (about 100 MB an
engine for a 49K vocabulary), so memory does not grow with `n_tokens`: llama-cpp-python's own all-logits array
would be 800 MB an engine at 4K tokens.

    edgectx bench conformance --json   # {"n_tokens": 4096, "top1_agreement": ..., "nll_rel_diff": ...,
                                       #  "edgectx_vs_reference": {"top1": ..., "nll_rel_diff": ..., "kl_mean": ...},
                                       #  "llama_cpp_vs_reference": {...}, "nearer_reference": "edgectx"}
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.f32_reference import f32_reference
from edgectx.bench.reference import LlamaCppReference
from edgectx.bench.rss import peak_rss_bytes
from edgectx.bench.teacher import logits_chunks
from edgectx.engine import Engine

REFERENCE_KIND = "llama.cpp F32 requantization"
EDGECTX, LLAMA, REFERENCE, LLAMA_AGAIN = "edgectx", "llama_cpp", "reference", "llama_cpp_again"
SELF_CHECK_BATCH = 64  # against the default 512: llama.cpp splits the same positions into other matrix shapes
SLICE_ROWS = 64  # positions per slice of the float64 math, in three buffers kept for the whole run (25 MB each)


class Tally:
    """Per-position figures gathered chunk by chunk: each engine's top-1 and NLL of the true next token, its
    KL from the reference, and the largest logit difference between llama.cpp's two runs.

    The float64 work reuses three (SLICE_ROWS, vocab) buffers: fresh tensors of that size on every slice sit
    under glibc's mmap threshold and fragment the heap (RSS grew by about 500 MB a chunk when they did)."""

    def __init__(self) -> None:
        self.top1: dict[str, list[np.ndarray]] = defaultdict(list)
        self.nll: dict[str, list[np.ndarray]] = defaultdict(list)
        self.kl: dict[str, list[np.ndarray]] = defaultdict(list)
        self.max_abs_logit_diff = 0.0
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def score(self, name: str, logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """One engine's chunk: `logits` (n, vocab) float32 for n positions whose true next ids are `targets`;
        with the reference's logits of the same positions, also KL(reference || engine) per position."""
        self._ensure_buffers(logits.shape[1])
        for lo in range(0, len(targets), SLICE_ROWS):
            expected = targets[lo : lo + SLICE_ROWS]
            rows = slice(lo, lo + len(expected))
            logp, ref_logp, scratch = (b[: len(expected)] for b in self._buffers)  # (rows, vocab) each
            _log_softmax_into(logp, logits[rows], scratch)
            self.top1[name].append(logits[rows].argmax(-1).numpy())
            self.nll[name].append((-logp[torch.arange(len(expected)), expected]).numpy())
            if reference is not None:
                _log_softmax_into(ref_logp, reference[rows], scratch)
                torch.sub(ref_logp, logp, out=scratch)
                self.kl[name].append(scratch.mul_(ref_logp.exp_()).sum(-1).numpy())

    def compare_runs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Two runs of one engine over the same positions (n, vocab): keep the largest logit difference."""
        self._ensure_buffers(a.shape[1])
        for lo in range(0, len(a), SLICE_ROWS):
            rows = slice(lo, lo + SLICE_ROWS)
            gap = self._buffers[2][: len(a[rows])]
            gap.copy_(a[rows]).sub_(b[rows]).abs_()
            self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(gap.max()))

    def _ensure_buffers(self, n_vocab: int) -> None:
        if self._buffers is None or self._buffers[0].shape[1] != n_vocab:
            self._buffers = tuple(torch.empty(SLICE_ROWS, n_vocab, dtype=torch.float64) for _ in range(3))

    def agreement(self, a: str, b: str) -> float:
        return float((np.concatenate(self.top1[a]) == np.concatenate(self.top1[b])).mean())

    def mean_nll(self, name: str) -> float:
        return float(np.concatenate(self.nll[name]).mean())

    def against_reference(self, name: str) -> dict:
        ref_nll = self.mean_nll(REFERENCE)
        return {"top1": self.agreement(name, REFERENCE), "nll_rel_diff": (self.mean_nll(name) - ref_nll) / ref_nll,
                "kl_mean": float(np.concatenate(self.kl[name]).mean())}


def _log_softmax_into(out: torch.Tensor, logits: torch.Tensor, scratch: torch.Tensor) -> None:
    """log_softmax of float32 `logits` in float64, written into `out`, with `scratch` (same shape) as its
    only working memory."""
    out.copy_(logits)
    out.sub_(out.amax(-1, keepdim=True))
    torch.exp(out, out=scratch)
    out.sub_(scratch.sum(-1, keepdim=True).log_())


def run_conformance(engine: Engine, n_tokens: int = 4096, text_file: str | None = None, n_threads: int = 2,
                    corpus: str = "stdlib", reference: str = "f32", self_check: bool | None = None) -> dict:
    """`reference`: "f32" or "none". `self_check` defaults to on with the reference (it adds about a quarter to
    the run time) and off without it, so `reference="none"` is the old, fast comparison."""
    started = time.perf_counter()
    self_check = reference == "f32" if self_check is None else self_check
    ids = corpus_tokens(engine.tokenizer, n_tokens + 1, text_file, corpus)
    targets, inputs = torch.tensor(ids[1:]), ids[:-1]
    f32 = f32_reference(engine.path, engine.fingerprint, engine.spec.num_params) if reference == "f32" else None
    other_threads = 1 if n_threads > 1 else 2
    n_ctx = n_tokens + 16
    runs: dict[str, LlamaCppReference] = {}
    tally = Tally()
    try:
        runs[LLAMA] = LlamaCppReference(engine.path, n_ctx=n_ctx, n_threads=n_threads)
        if f32:
            runs[REFERENCE] = LlamaCppReference(f32.path, n_ctx=n_ctx, n_threads=n_threads, f32_kv=True)
        if self_check:
            runs[LLAMA_AGAIN] = LlamaCppReference(engine.path, n_ctx=n_ctx, n_threads=other_threads, n_batch=SELF_CHECK_BATCH)
        n_batches = [run.llama.n_batch for name, run in runs.items() if name in (LLAMA, LLAMA_AGAIN)]
        seconds = _lockstep(engine, runs, inputs, targets, tally)
    finally:
        for run in runs.values():
            run.close()
        engine.reset()
    nll_edgectx, nll_llama = tally.mean_nll(EDGECTX), tally.mean_nll(LLAMA)
    result = {
        "model": engine.path.name,
        "text": text_file or f"python-{corpus}",
        "n_tokens": len(inputs),
        "threads": n_threads,
        "weights": engine.weights,
        "top1_agreement": tally.agreement(EDGECTX, LLAMA),
        "nll_edgectx": nll_edgectx,
        "nll_llama_cpp": nll_llama,
        "nll_rel_diff": (nll_edgectx - nll_llama) / nll_llama,
    }
    if f32:
        result["reference"] = {"kind": REFERENCE_KIND, "kv_cache": "f32", "file": str(f32.path), "built": f32.built,
                               "nll": tally.mean_nll(REFERENCE)}
        result["edgectx_vs_reference"] = tally.against_reference(EDGECTX)
        result["llama_cpp_vs_reference"] = tally.against_reference(LLAMA)
        ours, theirs = result["edgectx_vs_reference"]["top1"], result["llama_cpp_vs_reference"]["top1"]
        result["nearer_reference"] = "edgectx" if ours > theirs else "llama.cpp" if theirs > ours else "tie"
    if self_check:
        result["llama_cpp_self"] = {"n_batch": n_batches, "threads": [n_threads, other_threads],
                                    "top1": tally.agreement(LLAMA, LLAMA_AGAIN), "max_abs_logit_diff": tally.max_abs_logit_diff}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["engine_s"] = {name: round(s, 1) for name, s in seconds.items()}  # each engine's forward passes alone
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _lockstep(engine: Engine, runs: dict[str, LlamaCppReference], inputs: list[int], targets: torch.Tensor,
              tally: Tally) -> dict[str, float]:
    """Score every engine chunk by chunk on `inputs`, holding at most two engines' logits of one chunk at a
    time (llama.cpp's read in place from its own output buffers); returns each engine's forward-pass seconds."""
    seconds = dict.fromkeys([EDGECTX, *runs], 0.0)

    def evaluate(name: str, ids: list[int]) -> torch.Tensor:
        clock = time.perf_counter()
        logits = torch.from_numpy(runs[name].eval_logits(ids, copy=False))  # read before that run's next eval
        seconds[name] += time.perf_counter() - clock
        return logits

    clock = time.perf_counter()
    for start, logits in logits_chunks(engine, inputs):
        seconds[EDGECTX] += time.perf_counter() - clock
        chunk, expected = inputs[start : start + len(logits)], targets[start : start + len(logits)]
        reference_logits = evaluate(REFERENCE, chunk) if REFERENCE in runs else None
        if reference_logits is not None:
            tally.score(REFERENCE, reference_logits, expected)
        tally.score(EDGECTX, logits, expected, reference_logits)
        del logits
        llama_logits = evaluate(LLAMA, chunk)
        tally.score(LLAMA, llama_logits, expected, reference_logits)
        del reference_logits
        if LLAMA_AGAIN in runs:
            again = evaluate(LLAMA_AGAIN, chunk)
            tally.score(LLAMA_AGAIN, again, expected)
            tally.compare_runs(llama_logits, again)
            del again
        del llama_logits
        clock = time.perf_counter()
    return seconds
