"""`edgectx bench speed --synthetic NAME`: speed and GPU memory of a real model's shapes, with no download.

Random weights with the real shapes (`edgectx.model.synthetic`, 4-bit on a GPU) and random token ids: no
tokenizer, no GGUF, hence no llama.cpp reference. One prefill runs up to each requested context in turn
(sorted); at each, `decode_tokens` greedy tokens are decoded and timed, and count toward the next
context. Per context and engine: `prefill_s` (prefill time so far, decode excluded), `prefill_tok_s`,
`decode_ms_per_token`, `peak_gpu_bytes` (high-water mark so far, weights included;
`peak_gpu_reserved_bytes`: what PyTorch held), and `decode_floor_ratio`: decode time over the weight-read
floor, the time to read every weight the step reads once at the GPU's memory bandwidth
(`weight_read_bytes / bandwidth`). Full attention (`--full`) runs only
up to the contexts its KV cache fits in: the bytes are estimated before anything is allocated. Both
engines decode eagerly (no compiled decode step), so their decode times compare like for like.

    edgectx bench speed --synthetic llama-3.1-8b --context 32768,131072 --gpu-mem-cap-gib 24 --full --json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from edgectx.memory.device import free_device_bytes, memory_cap, peak_device_bytes, reset_peak, set_memory_cap
from edgectx.engine import Engine, default_dtype, pick_device
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.quant.linear import resolve_weights
from edgectx.model.spec import ModelSpec

WARMUP_TOKENS = 64
# Peak memory bandwidth in GB/s by GPU name, most specific first (vendor datasheets).
BANDWIDTH_GBS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0), ("RTX 4090", 1008.0))


def gpu_bandwidth_gbs(device: torch.device) -> float | None:
    """The table's bandwidth for this GPU, or None (a CPU, or a GPU the table does not know)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in BANDWIDTH_GBS if key in name), None)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every weight, bytes one decode step reads): the step reads one row of an untied embedding, and
    the repacked copy of a weight that has one instead of its blocks (both held: they count once each in the first)."""
    seen: set[int] = set()
    total = repacked = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        raw = getattr(module, "raw_tensors", None)  # GGUF blocks held outside parameters (a tied head shares the table's)
        if raw is not None:
            tensors += raw
            repacked += getattr(module, "repacked_bytes", 0)  # ggml's copies for decode (edgectx.quant.ggml_cpu), read instead
        elif isinstance(getattr(module, "weight_bytes", None), int) and not tensors:  # packed weights (fp16-packed)
            total += module.weight_bytes
        state = getattr(getattr(module, "weight", None), "quant_state", None)  # bitsandbytes 4-bit scales
        tensors += [t for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None))
                    if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    embed = getattr(model, "embed", None)
    table = getattr(embed, "weight", None)  # None for an embedding kept in GGUF blocks, which counts `weight_bytes`
    lm_head = getattr(model, "lm_head", None)
    tied = table is not None and lm_head is not None and getattr(lm_head, "weight", None) is table
    if embed is None or tied:
        embed_bytes = 0
    else:
        embed_bytes = table.numel() * table.element_size() if table is not None else getattr(embed, "weight_bytes", 0)
    return total + repacked, total - embed_bytes


def full_attention_bytes(spec: ModelSpec, n_tokens: int, elem_bytes: int, chunk_tokens: int) -> int:
    """Device bytes full attention needs past the weights at `n_tokens`: the KV cache as FullKVCache grows it
    (capacity doubling from 512, the last layer to grow holding old and new) plus one chunk's attention
    scratch (a mask and scores per query head over the whole capacity)."""
    capacity = 512
    while capacity < n_tokens:
        capacity *= 2
    layer_token_bytes = 2 * spec.kv_dim * elem_bytes  # K and V, one layer
    kv = spec.n_layers * capacity * layer_token_bytes + capacity // 2 * layer_token_bytes
    scratch = spec.n_heads * chunk_tokens * capacity * elem_bytes
    return kv + scratch


def plan_full(spec: ModelSpec, contexts: list[int], decode_tokens: int, elem_bytes: int, chunk_tokens: int,
              free_bytes: int | None) -> tuple[list[int], dict[int, str]]:
    """The contexts full attention can reach within `free_bytes` (None: no limit known), and why it skips the rest."""
    run, skipped = [], {}
    for context in sorted(contexts):
        need = full_attention_bytes(spec, context + decode_tokens, elem_bytes, chunk_tokens)
        if skipped or (free_bytes is not None and need > free_bytes):
            skipped[context] = (f"full attention needs about {need / 2**30:.1f} GiB past the weights, "
                                f"{(free_bytes or 0) / 2**30:.1f} GiB are free")
        else:
            run.append(context)
    return run, skipped


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_ids(n: int, vocab_size: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()


def _run(engine: Engine, contexts: list[int], decode_tokens: int, floor_ms: float | None, rows: list[dict],
         seed: int = 0) -> None:
    """Prefill up to each context in turn, decoding `decode_tokens` at each; appends one row per context."""
    device, vocab = engine.device, engine.spec.vocab_size
    gen = torch.Generator().manual_seed(seed)
    engine.reset()
    engine.prefill(_random_ids(WARMUP_TOKENS, vocab, gen))  # first-call allocations and kernel choices
    engine.forward([0])
    engine.reset()
    reset_peak(device)
    prefill_s, prefilled = 0.0, 0
    for context in sorted(contexts):
        n_new = context - engine.memory.n_tokens
        if n_new > 0:
            ids = _random_ids(n_new, vocab, gen)
            _sync(device)
            t0 = time.perf_counter()
            engine.prefill(ids, progress=_progress(engine.memory.n_tokens, t0))
            _sync(device)
            prefill_s += time.perf_counter() - t0
            prefilled += n_new
        token = int(torch.argmax(engine.next_logits))
        _sync(device)
        graphs_before = _graph_stats(engine)
        t0 = time.perf_counter()
        step_ms = []
        for _ in range(decode_tokens):
            t_step = time.perf_counter()
            token = int(torch.argmax(engine.forward([token])[-1]))  # reading the token waits for the step
            step_ms.append((time.perf_counter() - t_step) * 1e3)
        _sync(device)
        decode_ms = (time.perf_counter() - t0) * 1e3 / max(1, decode_tokens)
        graphs = {k: v - graphs_before.get(k, 0) for k, v in _graph_stats(engine).items() if isinstance(v, int)}
        stats = engine.stats()
        peak = peak_device_bytes(device)
        row = {
            "context": context,
            "prefill_s": prefill_s,
            "prefill_tok_s": prefilled / prefill_s if prefill_s else None,
            "decode_ms_per_token": decode_ms,
            "decode_floor_ratio": decode_ms / floor_ms if floor_ms else None,
            # where the steps' time goes: the median step (a replayed graph, in steady state) against the slowest
            # (retrieval, a rebuilt context, a capture), and the CUDA-graph runner's counts over these steps
            "decode_step_ms": _spread(step_ms), "decode_graphs": graphs or None,
            "peak_gpu_bytes": peak and peak["allocated"],
            "peak_gpu_reserved_bytes": peak and peak["reserved"],
            "device_kv_bytes": stats["device_kv_bytes"],
            "host_kv_bytes": stats["host_kv_bytes"],
        }
        rows.append(row)
        print(f"bench: {json.dumps(row)}", file=sys.stderr, flush=True)
        print(f"bench: decode steps ms {[round(t, 2) for t in step_ms]}", file=sys.stderr, flush=True)  # a run cut short still leaves its rows


def _graph_stats(engine: Engine) -> dict:
    stats = getattr(engine.step, "stats", None)
    return stats() if callable(stats) else {}


def _spread(ms: list[float]) -> dict | None:
    if not ms:
        return None
    ordered = sorted(ms)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1],
            "min": ordered[0]}


def _progress(start: int, t0: float, every: int = 8192):
    """A prefill progress callback printing a line to stderr every `every` tokens (not synchronized: a lower bound)."""
    last = [0]

    def report(done: int, total: int) -> None:
        if done - last[0] >= every or done == total:
            last[0] = done
            print(f"bench: prefill {start + done} tokens, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    return report


def _guarded(engine: Engine, contexts: list[int], decode_tokens: int, floor_ms: float | None) -> tuple[list[dict], str | None]:
    """`_run`'s rows, and one sentence if it ran out of GPU memory before the last context."""
    rows: list[dict] = []
    try:
        _run(engine, contexts, decode_tokens, floor_ms, rows)
    except torch.OutOfMemoryError:
        engine.reset()
        reached = f" after {rows[-1]['context']} tokens" if rows else ""
        return rows, f"out of GPU memory{reached}"
    return rows, None


def run_synthetic_speed(name: str, contexts: list[int], memory: MemoryConfig, decode_tokens: int = 64,
                        device: str | None = None, n_threads: int | None = None, gpu_mem_cap_gib: float | None = None,
                        bandwidth_gbs: float | None = None, full: bool = False, weights: str = "auto") -> dict:
    from edgectx.model.synthetic import SYNTHETIC, build_synthetic

    if name not in SYNTHETIC:
        raise UsageError(f"No synthetic model named {name!r}: choose one of {', '.join(sorted(SYNTHETIC))}.")
    if n_threads:
        torch.set_num_threads(n_threads)
    dev = pick_device(device)
    if gpu_mem_cap_gib is not None:
        set_memory_cap(dev, int(gpu_mem_cap_gib * 2**30))  # before anything is allocated
    dtype = default_dtype(dev)
    # "auto": nf4 on CUDA (bitsandbytes) for a model past AUTO_NF4_MIN_BYTES, 16-bit elsewhere
    weights = resolve_weights(dev, weights, fp16_bytes=SYNTHETIC[name].weight_bytes("fp16"))
    model, spec = build_synthetic(name, dev, dtype, weights=weights)
    all_bytes, read_bytes = weight_bytes(model)
    bandwidth = bandwidth_gbs or gpu_bandwidth_gbs(dev)
    floor_ms = read_bytes / (bandwidth * 1e9) * 1e3 if bandwidth else None
    # Engine without tokenizer or template: this benchmark feeds token ids and reads logits only.
    engine = Engine(Path(f"synthetic-{name}"), model, spec, None, None, dev, dtype, memory_config=memory)
    engine.weights = weights
    memory_rows, memory_error = _guarded(engine, contexts, decode_tokens, floor_ms)
    cache_blocks = engine.memory.cache_blocks  # as "auto" sized it, after the weights
    # Whether retrieval read the pinned host store with the gather kernel (CUDA, its probe passed): no block cache
    gathers = engine.memory.layers[0].gathers_on_device
    full_rows, full_error, skipped = [], None, {}
    if full:
        engine.configure_memory(None, n_ctx=max(contexts) + decode_tokens * len(contexts) + 16)
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        elem = torch.empty(0, dtype=dtype).element_size()
        run_contexts, skipped = plan_full(spec, contexts, decode_tokens, elem, memory.chunk_tokens, free_device_bytes(dev))
        if run_contexts:
            full_rows, full_error = _guarded(engine, run_contexts, decode_tokens, floor_ms)
    runs = []
    for context in sorted(contexts):
        row = {"context": context, "edgectx_memory": _row(memory_rows, context), "edgectx": _row(full_rows, context)}
        if row["edgectx_memory"] is None:
            row["edgectx_memory_error"] = memory_error
        if full and row["edgectx"] is None:
            row["edgectx_skipped"] = skipped.get(context) or full_error
        runs.append(row)
    return {
        "model": f"synthetic {name}", "synthetic": name, "spec": spec.describe(), "weights": weights,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "decode_tokens": decode_tokens, "budget_tokens": memory.budget_tokens, "cache_capacity_blocks": cache_blocks,
        "retrieval_gathers_on_device": gathers,
        "gpu_mem_cap_bytes": memory_cap(dev), "weight_bytes": all_bytes, "weight_read_bytes": read_bytes,
        "bandwidth_gbs": bandwidth, "bandwidth_source": "flag" if bandwidth_gbs else ("table" if bandwidth else None),
        "weight_read_floor_ms": floor_ms, "runs": runs,
    }


def _row(rows: list[dict], context: int) -> dict | None:
    return next((r for r in rows if r["context"] == context), None)
