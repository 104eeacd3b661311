"""`edgectx plan`: will this model and context fit this GPU? Answered before loading anything.

Reads the shapes from GGUF metadata (or the synthetic table) and adds up what a load and a prefill to
N tokens would hold: the weights in the chosen format (ModelSpec.weight_bytes), the long-context
memory's device tiers as ContextMemory allocates them (memory_tiers.Resident, retrieval.BlockCache,
the attention Assembly, block representatives), a prefill chunk's activations, and the host block
store (every token's K and V in fp16). Full attention's KV is shown for comparison. Exits 0 when the
plan fits `--gpu-mem-gib` (and the host's RAM), 1 with one sentence when it does not.

    edgectx plan --synthetic llama-3.1-8b --context 131072 --gpu-mem-gib 24 --weights nf4
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from edgectx.errors import EdgectxError, UsageError
from edgectx.memory_config import MemoryConfig
from edgectx.spec import ModelSpec

GIB = 2**30
RUNTIME_BYTES = 600 * 2**20  # CUDA context, cuBLAS workspaces and allocator slack: outside torch's own count
INDEX_BYTES, SCORE_BYTES, VALID_BYTES = 8, 4, 1  # int64 token indices, float32 scores, bool duplicate mask


class PlanDoesNotFit(EdgectxError):
    """The model, context and budget asked for need more memory than the machine has."""


@dataclass(frozen=True)
class DeviceKV:
    """The long-context memory's device bytes after a prefill to `n_tokens`, as ContextMemory.stats() reports them."""

    resident_kv_bytes: int  # K and V of sinks + window + retained tokens (stats: sink + window + retained bytes)
    resident_bytes: int  # the Resident buffers as allocated: + indices, scores, room for a chunk
    block_cache_bytes: int  # the LRU pool of retrieved blocks, allocated whole at the first retrieval
    work_bytes: int  # the assembled attention context (rotated keys): resident + retrieved blocks + a chunk
    repr_bytes: int  # one fp16 representative key per block and KV head (grows with the context)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.block_cache_bytes + self.work_bytes + self.repr_bytes


CPU_CACHE_BLOCKS = 16  # edgectx.device_memory.CPU_CACHE_BLOCKS (that module imports torch)


def device_kv(spec: ModelSpec, config: MemoryConfig, n_tokens: int, elem_bytes: int = 2,
              cache_blocks: int | None = None) -> DeviceKV:
    """Device bytes of a ContextMemory holding `n_tokens` (past the budget, after a prefill in chunks).
    `cache_blocks`: what an "auto" block cache came to (default: the CPU's fixed count)."""
    c, n_kv, d, layers = config, spec.n_kv_heads, spec.head_dim, spec.n_layers
    headroom = max(c.chunk_tokens, c.evict_every) + 1  # what Resident.keep and Assembly leave for the next chunk
    if n_tokens <= c.budget_tokens:  # nothing evicted yet: every token resident, no retrieval
        resident_tokens, retrieved, capacity = n_tokens, 0, 0
    else:
        resident_tokens, retrieved = c.resident_tokens, c.top_k_blocks * c.block_size
        chosen = c.cache_blocks if c.cache_blocks != "auto" else cache_blocks or CPU_CACHE_BLOCKS
        capacity = max(chosen, c.top_k_blocks * n_kv)  # LayerMemory's BlockCache size
    kv_token = 2 * d * elem_bytes  # one token's K and V in one KV head
    resident = layers * n_kv * (resident_tokens + headroom) * (kv_token + INDEX_BYTES + SCORE_BYTES)
    cache = layers * capacity * n_kv * c.block_size * kv_token
    work = layers * n_kv * (resident_tokens + retrieved + headroom) * (kv_token + INDEX_BYTES + (VALID_BYTES if retrieved else 0))
    reprs = layers * (n_tokens // c.block_size) * n_kv * d * 2
    return DeviceKV(resident_tokens * spec.kv_bytes_per_token(elem_bytes), resident, cache, work, reprs)


def activation_bytes(spec: ModelSpec, config: MemoryConfig | None, chunk_tokens: int, context_keys: int,
                     weights: str, elem_bytes: int = 2) -> int:
    """Peak working memory of one layer's forward over a prefill chunk (an estimate of the largest live set):
    residual stream and norm, Q/K/V and their rotations, the attention mask, the eviction scorer's float32
    attention mass over the observation window, the SwiGLU intermediates, and under nf4/int8 one weight
    dequantized to 16 bits (bitsandbytes does so for multi-token inputs)."""
    s, t = spec, chunk_tokens
    stream = 3 * t * s.dim * elem_bytes
    qkv = t * (2 * s.q_dim + 3 * s.kv_dim) * elem_bytes
    mask = (s.n_heads if config else s.group_size) * t * context_keys  # per-KV-head masks are expanded to every head
    observe = 3 * s.n_heads * min(config.n_observe, t) * context_keys * 4 if config else 0
    ffn = 4 * t * s.ffn_dim * elem_bytes
    dequantized = max(o * i for o, i in s.block_linear_shapes) * elem_bytes if weights != "fp16" else 0
    logits = s.vocab_size * 4
    return stream + qkv + mask + max(observe, ffn) + dequantized + logits


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    weights: str  # fp16 | nf4 | int8
    context_tokens: int
    budget_tokens: int | None  # None: full attention
    weight_bytes: int
    device_kv: DeviceKV | None
    device_kv_bytes: int  # the memory's device tiers, or full attention's cache
    activation_bytes: int
    runtime_bytes: int
    full_kv_bytes: int  # full attention's fp16 KV at this context, for comparison
    host_kv_bytes: int  # the host block store: every token's K and V in fp16
    host_reserved_bytes: int  # the same in whole 4096-token segments, as allocated
    gpu_bytes: int
    host_ram_bytes: int

    @property
    def device_total_bytes(self) -> int:
        return self.weight_bytes + self.device_kv_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def fits_device(self) -> bool:
        return self.device_total_bytes <= self.gpu_bytes

    @property
    def fits_host(self) -> bool:
        return self.host_reserved_bytes <= self.host_ram_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(device_total_bytes=self.device_total_bytes, fits_device=self.fits_device, fits_host=self.fits_host)
        if self.device_kv is not None:
            out["device_kv"]["total_bytes"] = self.device_kv.total_bytes
        return out


def plan_memory(spec: ModelSpec, context_tokens: int, gpu_bytes: int, config: MemoryConfig | None, weights: str,
                host_ram_bytes: int, model: str = "", elem_bytes: int = 2) -> MemoryPlan:
    chunk = config.chunk_tokens if config else 512
    kv_token = spec.kv_bytes_per_token(2)
    if config is None:
        tiers, kv_bytes, host, reserved, keys = None, context_tokens * spec.kv_bytes_per_token(elem_bytes), 0, 0, context_tokens
    else:
        from edgectx.device_memory import auto_cache_blocks  # imports torch: not at the CLI's start

        free_after_weights = gpu_bytes - spec.weight_bytes(weights, dense_bytes=elem_bytes) - RUNTIME_BYTES
        tiers = device_kv(spec, config, context_tokens, elem_bytes, auto_cache_blocks(config, spec, free_after_weights, elem_bytes))
        kv_bytes, host = tiers.total_bytes, context_tokens * kv_token
        from edgectx.block_store import SEGMENT_BLOCKS  # imports torch: not at the CLI's start

        segment = SEGMENT_BLOCKS * config.block_size
        reserved = -(-context_tokens // segment) * segment * kv_token
        keys = config.budget_tokens + chunk
    return MemoryPlan(
        model=model, weights=weights, context_tokens=context_tokens,
        budget_tokens=config.budget_tokens if config else None,
        weight_bytes=spec.weight_bytes(weights, dense_bytes=elem_bytes), device_kv=tiers, device_kv_bytes=kv_bytes,
        activation_bytes=activation_bytes(spec, config, min(chunk, context_tokens), keys, weights, elem_bytes),
        runtime_bytes=RUNTIME_BYTES, full_kv_bytes=context_tokens * kv_token, host_kv_bytes=host,
        host_reserved_bytes=reserved, gpu_bytes=gpu_bytes, host_ram_bytes=host_ram_bytes,
    )


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def add_parser(sub, memory_args) -> None:
    p = sub.add_parser("plan", help="will a model and context fit a GPU? device and host memory, before loading anything")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", "-m", help="a .gguf file, a Hugging Face checkpoint directory or a listed name (default: the embedded SmolLM2); only its metadata is read")
    source.add_argument("--synthetic", metavar="NAME", help="a synthetic model's shapes: llama-3.1-8b, phi-3-mini-128k, qwen2.5-7b")
    p.add_argument("--context", type=int, required=True, help="tokens the conversation will hold")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="GPU memory to plan for, in GiB")
    p.add_argument("--host-mem-gib", type=float, help="host RAM for the block store, in GiB (default: this machine's)")
    p.add_argument("--weights", choices=("auto", "fp16", "nf4", "int8"), help="weight format (default auto: nf4 when bitsandbytes is installed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    memory_args(p)


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from edgectx.cli import memory_config_from
    from edgectx.config import load_config
    from edgectx.quant import resolve_weights

    if args.context < 1 or args.gpu_mem_gib <= 0 or (args.host_mem_gib is not None and args.host_mem_gib <= 0):
        raise UsageError("--context, --gpu-mem-gib and --host-mem-gib must be positive.")
    config = load_config()
    if args.synthetic:
        from edgectx.synthetic import synthetic_spec

        spec, name = synthetic_spec(args.synthetic), args.synthetic
    else:
        from edgectx.model_source import open_model
        from edgectx.models import resolve_model

        path = resolve_model(args.model, config)
        spec, name = open_model(path).spec, path.name  # a GGUF's metadata or a directory's config.json
    weights = args.weights or config.weights or "auto"
    if weights == "auto":  # a format asked for by name is planned without bitsandbytes installed here
        weights = resolve_weights(torch.device("cuda"), weights, spec.weight_bytes("fp16"))
    host = int(args.host_mem_gib * GIB) if args.host_mem_gib else host_ram_bytes()
    plan = plan_memory(spec, args.context, int(args.gpu_mem_gib * GIB), memory_config_from(args, config), weights, host, name)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    if not plan.fits_device:
        nf4 = "" if plan.weights == "nf4" else "--weights nf4, "
        raise PlanDoesNotFit(
            f"{name} at {args.context:,} tokens needs {plan.device_total_bytes / GIB:.1f} GiB on the GPU but {args.gpu_mem_gib:g} GiB "
            f"were given: try {nf4}a smaller --budget, or a shorter --context.")
    if not plan.fits_host:
        raise PlanDoesNotFit(
            f"The host block store for {args.context:,} tokens needs {plan.host_reserved_bytes / GIB:.1f} GiB of RAM but "
            f"{host / GIB:.1f} GiB are available: use a shorter --context.")
    return 0


def print_plan(plan: MemoryPlan) -> None:
    def gib(n: int) -> str:
        return f"{n / GIB:8.2f} GiB"

    budget = f"budget {plan.budget_tokens:,} tokens" if plan.budget_tokens else "full attention"
    print(f"{plan.model}: {plan.context_tokens:,} tokens, {plan.weights} weights, {budget}")
    print(f"  weights                        {gib(plan.weight_bytes)}")
    if plan.device_kv is not None:
        kv = plan.device_kv
        print(f"  device KV (memory tiers)       {gib(kv.total_bytes)}")
        print(f"    sinks + window + retained    {gib(kv.resident_kv_bytes)}  ({gib(kv.resident_bytes).strip()} allocated)")
        print(f"    block cache                  {gib(kv.block_cache_bytes)}")
        print(f"    attention context            {gib(kv.work_bytes)}")
        print(f"    block representatives        {gib(kv.repr_bytes)}")
    else:
        print(f"  device KV (full attention)     {gib(plan.device_kv_bytes)}")
    print(f"  activations (one chunk)        {gib(plan.activation_bytes)}")
    print(f"  CUDA runtime                   {gib(plan.runtime_bytes)}")
    print(f"  device total                   {gib(plan.device_total_bytes)}  of {plan.gpu_bytes / GIB:g} GiB: "
          f"{'fits' if plan.fits_device else 'does NOT fit'}")
    print(f"  full attention KV (comparison) {gib(plan.full_kv_bytes)}")
    if plan.budget_tokens:
        print(f"  host block store (fp16)        {gib(plan.host_kv_bytes)}  ({gib(plan.host_reserved_bytes).strip()} in segments) "
              f"of {plan.host_ram_bytes / GIB:.0f} GiB RAM: {'fits' if plan.fits_host else 'does NOT fit'}")
