"""The memory arithmetic of a load and a prefill, before anything loads: will this model and context fit this GPU?

Adds up what a load and a prefill to N tokens would hold, from a ModelSpec alone: the weights in the
chosen format (ModelSpec.weight_bytes), the long-context memory's device tiers as ContextMemory allocates
them (edgectx.memory.tiers.Resident, edgectx.memory.retrieval.BlockCache, the attention Assembly, block
representatives), its recent-query buffer and retrieval's staging pool, a prefill chunk's activations, the CUDA
runtime and the allocator's slack, and the host block store (every token's K and V in fp16, as pinned memory
rounds it) against the RAM available now.
Full attention's KV comes with it for comparison. `edgectx plan` (edgectx.cli.plan) prints the plan.

    plan = plan_memory(synthetic_spec("llama-3.1-8b"), 131072, 24 * GIB, MemoryConfig(), "nf4", host_ram_bytes())
    plan.fits_device, plan.device_total_bytes
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from edgectx.errors import EdgectxError
from edgectx.memory.config import MemoryConfig
from edgectx.model.spec import ModelSpec

GIB = 2**30
# The CUDA context, cuBLAS workspaces and loaded kernel modules (cuBLAS, Triton's), outside torch's own count: about
# 500-800 MiB on recent GPUs; 600 MiB was optimistic (issue 21). gpu-check.sh sets this against a measured peak.
RUNTIME_BYTES = 1 << 30
ALLOCATOR_SLACK = 0.05  # PyTorch's caching allocator: 2 MiB rounding and split blocks it cannot hand back out
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


CPU_CACHE_BLOCKS = 0  # edgectx.memory.device.CPU_CACHE_BLOCKS (that module imports torch): none
DECODE_ROOM = 64  # edgectx.memory.tiers.REUSE_SLACK: a context's room for the decode steps up to the next eviction


def device_kv(spec: ModelSpec, config: MemoryConfig, n_tokens: int, elem_bytes: int = 2,
              cache_blocks: int | None = None) -> DeviceKV:
    """Device bytes of a ContextMemory holding `n_tokens` (past the budget, after a prefill in chunks, its context
    ready for decode steps: Engine.prefill). `cache_blocks`: what an "auto" block cache came to (default: the CPU's
    none)."""
    c, n_kv, d, layers = config, spec.n_kv_heads, spec.head_dim, spec.n_layers
    headroom = max(c.chunk_tokens, c.evict_every) + 1  # what Resident.keep and Assembly leave for the next chunk
    if n_tokens <= c.budget_tokens:  # nothing evicted yet: every token resident, no retrieval
        resident_tokens, retrieved, capacity, room = n_tokens, 0, 0, 0
    else:
        resident_tokens, retrieved = c.resident_tokens, c.top_k_blocks * c.block_size
        room = min(DECODE_ROOM, c.evict_every)  # ContextMemory.ready's rebuild, for the decode steps
        chosen = c.cache_blocks if c.cache_blocks != "auto" else CPU_CACHE_BLOCKS if cache_blocks is None else cache_blocks
        # ContextMemory.cache_blocks: blocks' worth of (block, KV head) pairs, none for a CPU's "auto"
        capacity = max(chosen, c.top_k_blocks) if chosen else 0
    kv_token = 2 * d * elem_bytes  # one token's K and V in one KV head
    resident = layers * n_kv * (resident_tokens + headroom) * (kv_token + INDEX_BYTES + SCORE_BYTES)
    cache = layers * capacity * n_kv * c.block_size * kv_token
    work = layers * n_kv * (resident_tokens + retrieved + headroom + room) \
        * (kv_token + INDEX_BYTES + (VALID_BYTES if retrieved else 0))
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
    # every observe_stride-th of up to n_observe recent queries (an evicting decode step observes them too), in
    # place: float32 logits and a bool mask per (query head, observed query, key)
    observe = 5 * s.n_heads * -(-config.n_observe // config.observe_stride) * context_keys if config else 0
    ffn = 4 * t * s.ffn_dim * elem_bytes
    dequantized = max(o * i for o, i in s.block_linear_shapes) * elem_bytes if weights != "fp16" else 0
    logits = s.vocab_size * 4
    return stream + qkv + mask + max(observe, ffn) + dequantized + logits


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def host_store_bytes(spec: ModelSpec, config: MemoryConfig, n_tokens: int, pinned: bool) -> tuple[int, int]:
    """(bytes of whole segments, bytes they occupy in RAM) for the host block store holding `n_tokens`: every layer
    allocates segments of SEGMENT_BLOCKS blocks as the context grows. Pinned (on CUDA), torch's host allocator rounds
    each allocation up to a power of two (a 48 MiB segment pins 64 MiB) and keeps it cached after it is freed."""
    from edgectx.memory.block_store import SEGMENT_BLOCKS  # imports torch: not at the CLI's start

    segment_tokens = SEGMENT_BLOCKS * config.block_size
    n_segments = -(-n_tokens // segment_tokens)
    segment_bytes = segment_tokens * spec.kv_bytes_per_token(2) // spec.n_layers  # one layer's segment, fp16
    held = next_power_of_two(segment_bytes) if pinned else segment_bytes
    return n_segments * segment_bytes * spec.n_layers, n_segments * held * spec.n_layers


def overhead_bytes(spec: ModelSpec, config: MemoryConfig | None, elem_bytes: int = 2) -> tuple[int, int]:
    """(recent-query buffer, copy stream's pool) of the long-context memory on a GPU: every layer keeps its last
    `n_observe` pre-RoPE queries for eviction scores; a retrieval stages the blocks it copies (up to top_k_blocks
    per KV head, one (2, n_kv, block_size, d) slab each) in host dtype and converts them, in buffers the copy
    stream's own allocator pool keeps."""
    if config is None:
        return 0, 0
    queries = spec.n_layers * spec.n_heads * config.n_observe * spec.head_dim * elem_bytes
    slab = 2 * spec.n_kv_heads * config.block_size * spec.head_dim
    copies = config.top_k_blocks * spec.n_kv_heads * slab * (2 + elem_bytes)  # fp16 staged + converted
    return queries, copies


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
    host_ram_bytes: int  # what the host store may take: RAM available now (`edgectx plan`), not all of it
    query_buffer_bytes: int = 0  # the memory's recent queries (eviction scores), every layer
    copy_pool_bytes: int = 0  # retrieval's staging buffers in the copy stream's pool
    allocator_slack_bytes: int = 0  # the caching allocator's rounding and fragments (ALLOCATOR_SLACK of the rest)
    host_pinned_bytes: int = 0  # the host segments as pinned memory holds them (power-of-two rounding on CUDA)
    chunk_tokens: int = 512  # the prefill chunk the activations are planned for

    @property
    def device_total_bytes(self) -> int:
        return (self.weight_bytes + self.device_kv_bytes + self.activation_bytes + self.runtime_bytes
                + self.query_buffer_bytes + self.copy_pool_bytes + self.allocator_slack_bytes)

    @property
    def fits_device(self) -> bool:
        return self.device_total_bytes <= self.gpu_bytes

    @property
    def fits_host(self) -> bool:
        return max(self.host_reserved_bytes, self.host_pinned_bytes) <= self.host_ram_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(device_total_bytes=self.device_total_bytes, fits_device=self.fits_device, fits_host=self.fits_host)
        if self.device_kv is not None:
            out["device_kv"]["total_bytes"] = self.device_kv.total_bytes
        return out


def plan_memory(spec: ModelSpec, context_tokens: int, gpu_bytes: int, config: MemoryConfig | None, weights: str,
                host_ram_bytes: int, model: str = "", elem_bytes: int = 2, pinned: bool = True,
                file_weight_bytes: int | None = None) -> MemoryPlan:
    """`pinned`: the host store is pinned memory (a CUDA device), whose allocations round up to powers of two.
    `file_weight_bytes`: under `weights="gguf"` the GGUF file's own tensor bytes, which the device holds as they are
    (edgectx.quant.gguf_cuda keeps the file's blocks on CUDA; ModelSpec cannot know the file's mix of types)."""
    if weights == "gguf" and file_weight_bytes is None:
        raise ValueError("planning a GGUF file's own blocks needs its tensor bytes (file_weight_bytes)")
    weight_bytes = file_weight_bytes if weights == "gguf" else spec.weight_bytes(weights, dense_bytes=elem_bytes)
    chunk = config.chunk_tokens if config else 512
    kv_token = spec.kv_bytes_per_token(2)
    if config is None:
        tiers, kv_bytes, host, reserved, held, keys = None, context_tokens * spec.kv_bytes_per_token(elem_bytes), 0, 0, 0, context_tokens
    else:
        from edgectx.memory.device import auto_cache_blocks  # imports torch: not at the CLI's start

        free_after_weights = gpu_bytes - weight_bytes - RUNTIME_BYTES
        tiers = device_kv(spec, config, context_tokens, elem_bytes, auto_cache_blocks(config, spec, free_after_weights, elem_bytes))
        kv_bytes, host = tiers.total_bytes, context_tokens * kv_token
        reserved, held = host_store_bytes(spec, config, context_tokens, pinned)
        keys = config.budget_tokens + chunk
    activations = activation_bytes(spec, config, min(chunk, context_tokens), keys, weights, elem_bytes)
    queries, copies = overhead_bytes(spec, config, elem_bytes)
    return MemoryPlan(
        model=model, weights=weights, context_tokens=context_tokens,
        budget_tokens=config.budget_tokens if config else None,
        weight_bytes=weight_bytes, device_kv=tiers, device_kv_bytes=kv_bytes,
        activation_bytes=activations, runtime_bytes=RUNTIME_BYTES, full_kv_bytes=context_tokens * kv_token,
        host_kv_bytes=host, host_reserved_bytes=reserved, gpu_bytes=gpu_bytes, host_ram_bytes=host_ram_bytes,
        query_buffer_bytes=queries, copy_pool_bytes=copies,
        allocator_slack_bytes=int(ALLOCATOR_SLACK * (kv_bytes + activations + queries + copies)), host_pinned_bytes=held,
        chunk_tokens=min(chunk, context_tokens),
    )


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_ram_bytes() -> int:
    """RAM that can be had now without swapping: the kernel's MemAvailable, else all of it (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return host_ram_bytes()
