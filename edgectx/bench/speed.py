"""`edgectx bench speed`: prefill and decode throughput of edgectx and llama.cpp in the same run.

Same GGUF, same real text, same thread count. Prefill reads `context` tokens from empty; decode then
generates `decode_tokens` greedy tokens one at a time at that depth. Three engines per length:
llama.cpp (full attention, n_ctx just large enough), edgectx with full attention (up to the model's
trained context) and edgectx with the long-context memory (`edgectx_memory`). Each runs in a fresh
child process, so `peak_rss_bytes` is that engine's own (and on CUDA `peak_gpu_bytes`, allocated, and
`peak_gpu_reserved_bytes`, held by PyTorch; None on a CPU). Ratios are edgectx / llama.cpp.
`--gpu-mem-cap-gib` caps each edgectx child's GPU memory; `--synthetic` runs edgectx.bench.synthetic_speed.
`weight_bytes` is what each engine's weights occupy: llama.cpp's tensor bytes, edgectx's loaded weights
(fewer or more than the file's, by the formats it converts to). `busy` CPU-bound processes (edgectx.bench.busy)
run beside each engine from before its load to after its measurement: the figure with other work running.
edgectx decodes as `edgectx chat` does by default: eagerly. With `--compile`, full attention decodes through
`Engine.compile_decode` and the memory through the chat path's compiled step (`Engine.compile_step`, what
`chat --compile` and `tui --compile` run); the compile happens before the timings and is reported as
`decode_compile_s` (None when decode ran eager).
Both run in the environment users have (`omp_wait_policy` in each result: OpenMP's spin-waiting unless set);
edgectx sizes its thread team to the cores other processes leave free (edgectx.cpu_share): `threads_used`,
the team of its last decode step.

    edgectx bench speed --context 512,4096 --json
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from edgectx.bench.busy import busy_processes
from edgectx.bench.corpus import corpus_tokens
from edgectx.bench.reference import LlamaCppReference
from edgectx.bench.rss import peak_rss_bytes
from edgectx.bench.synthetic_speed import weight_bytes
from edgectx.memory.device import peak_device_bytes, set_memory_cap
from edgectx.engine import Engine, pick_device
from edgectx.model.gguf import open_gguf, read_spec
from edgectx.memory.config import MemoryConfig

WARMUP_TOKENS = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _edgectx_run(engine: Engine, ids: list[int], decode_tokens: int) -> dict:
    engine.reset()
    _sync(engine.device)  # nothing queued before the clock starts, all of the prefill's work done before it stops
    t0 = time.perf_counter()
    logits = engine.prefill(ids)
    _sync(engine.device)
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(torch.argmax(engine.forward([token])[-1]))
    _sync(engine.device)
    decode_s = time.perf_counter() - t0
    stats = engine.stats()
    engine.reset()
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode_tokens / decode_s,
            "device_kv_bytes": stats["device_kv_bytes"], "host_kv_bytes": stats["host_kv_bytes"]}


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


def _measure(kind: str, path: str, device: str | None, n_threads: int, context: int, decode_tokens: int,
             memory: dict | None, text_file: str | None, compile_decode: bool, weights: str = "auto",
             gpu_mem_cap_gib: float | None = None) -> dict:
    """One engine at one length, in a child process: returns its throughput, KV bytes and peak RSS (and GPU bytes)."""
    torch.set_num_threads(n_threads)
    dev = pick_device(device) if kind != "llama_cpp" else None  # llama.cpp's memory is not PyTorch's to cap or see
    if gpu_mem_cap_gib is not None and dev is not None:
        set_memory_cap(dev, int(gpu_mem_cap_gib * 2**30))
    n_ctx = context + decode_tokens + 16
    if kind == "llama_cpp":
        from edgectx.model.tokenizer import Tokenizer

        ids = corpus_tokens(Tokenizer(Path(path)), context, text_file)
        ref = LlamaCppReference(Path(path), n_ctx=n_ctx, n_threads=n_threads)
        _llama_run(ref, ids[:WARMUP_TOKENS], 2)  # first-call allocations and page faults, outside the timings
        result = _llama_run(ref, ids, decode_tokens)
        spec = read_spec(open_gguf(Path(path)))
        result["device_kv_bytes"] = spec.kv_bytes_per_token(2) * n_ctx  # llama.cpp's f16 KV cache, allocated for n_ctx
        result["llama_cpp_extra_buffers"] = ref.extra_buffers  # False: AMX would crash here (bench.reference)
        result["weight_bytes"] = ref.weight_bytes()
        ref.close()
    else:
        config = MemoryConfig(**memory) if memory else None
        engine = Engine.load(Path(path), device=device, n_ctx=None if config else n_ctx, n_threads=n_threads, memory_config=config,
                             weights=weights)
        if compile_decode:  # the chat path compiles its step for any memory; full attention its own step
            compiled = engine.compile_decode() if config is None else engine.compile_step(wait=True)
        else:
            compiled = None
        ids = corpus_tokens(engine.tokenizer, context, text_file)
        _edgectx_run(engine, ids[:WARMUP_TOKENS], 2)
        result = _edgectx_run(engine, ids, decode_tokens)
        result["decode_compile_s"] = compiled and compiled.compile_s
        result["weight_bytes"] = weight_bytes(engine.model)[0]
        result["threads_used"] = engine.governor.current if engine.governor else None
    peak = peak_device_bytes(dev) if dev is not None else None
    result["peak_gpu_bytes"], result["peak_gpu_reserved_bytes"] = (peak["allocated"], peak["reserved"]) if peak else (None, None)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return result


def run_speed(path: Path, contexts: list[int], memory: MemoryConfig, decode_tokens: int = 64, n_threads: int = 2,
              device: str | None = None, text_file: str | None = None, compile_decode: bool = False,
              weights: str = "auto", gpu_mem_cap_gib: float | None = None, busy: int = 0) -> dict:
    spec = read_spec(open_gguf(path))
    spawn = multiprocessing.get_context("spawn")
    runs = []
    for context in contexts:
        row: dict = {"context": context}
        kinds = ["llama_cpp", "edgectx_memory"]
        if context + decode_tokens <= spec.context_length:
            kinds.insert(1, "edgectx")  # full attention past the trained context is neither sane nor fast
        for kind in kinds:
            with busy_processes(busy), spawn.Pool(1) as pool:
                row[kind] = pool.apply(_measure, (kind, str(path), device, n_threads, context, decode_tokens,
                                                  memory.to_dict() if kind == "edgectx_memory" else None, text_file,
                                                  compile_decode, weights, gpu_mem_cap_gib))
        theirs = row["llama_cpp"]
        for kind, prefix in (("edgectx", ""), ("edgectx_memory", "memory_")):
            mine = row.get(kind)
            row[f"{prefix}prefill_ratio"] = mine["prefill_tok_s"] / theirs["prefill_tok_s"] if mine else None
            row[f"{prefix}decode_ratio"] = mine["decode_tok_s"] / theirs["decode_tok_s"] if mine else None
        row.setdefault("edgectx", None)
        runs.append(row)
    return {"model": path.name, "threads": n_threads, "decode_tokens": decode_tokens,
            "budget_tokens": memory.budget_tokens, "busy": busy, "runs": runs}
