"""Device memory on CUDA: what this process may still allocate, an optional cap on it, and its peak.

These figures size the block cache when `MemoryConfig.cache_blocks == "auto"` and fill the benchmarks'
`peak_gpu_bytes`. A cap (`set_memory_cap`) makes a large GPU behave like a smaller one: PyTorch's caching
allocator refuses to grow past it, and `free_device_bytes` reports what is left under it. On a CPU
device every figure is None and there is no cache. Host RAM: glibc's heap (`return_free_heap`,
`empty_host_cache`).

    set_memory_cap(torch.device("cuda"), 24 * 2**30)   # emulate a 24 GiB RTX 4090 on an H100
    free_device_bytes(torch.device("cuda"))           # bytes still allocatable, under the cap
    peak_device_bytes(torch.device("cuda"))           # {"allocated": ..., "reserved": ...}
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

import torch

from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.model.spec import ModelSpec

# The block cache per layer on a CPU: none. The host store is in the memory a context is built in, so a retrieval
# gathers its blocks from it directly; a cache there held a third copy of them (235 MB for Qwen3-0.6B).
CPU_CACHE_BLOCKS = 0
OTHER_CACHE_BLOCKS = 16  # a device with no free-memory figure (not CUDA): four retrievals' worth at the default top-k
AUTO_CACHE_FRACTION = 0.25  # of the memory left once the memory's tiers and the activations have room
AUTO_CACHE_MAX_BLOCKS = 128  # 16K tokens per layer at block_size 128 (2 GiB for an 8B model): 4 retrievals of every KV head
ACTIVATION_HEADROOM_BYTES = 1 << 30  # a prefill chunk's activations, logits and attention scratch

_caps: dict[int, int] = {}  # device index -> the cap set on it, in bytes


def device_scope(device: torch.device):
    """A block run with `device` as the calling thread's current CUDA device, where it names one by index. Triton
    launches its kernels on the current device whatever their tensors' device, and CUDA's current device is per
    thread: the TUI's jobs and the server's worker start on device 0 whatever the thread that loaded chose."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def set_memory_cap(device: torch.device, cap_bytes: int) -> None:
    """Limit this process's CUDA allocations on `device` to `cap_bytes`; call it before loading anything."""
    if device.type != "cuda":
        raise UsageError("A GPU memory cap needs a CUDA device: drop --gpu-mem-cap-gib or use --device cuda.")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < cap_bytes <= total:
        raise UsageError(f"The GPU memory cap must be between 0 and the GPU's {total / 2**30:.1f} GiB, "
                         f"not {cap_bytes / 2**30:.1f} GiB.")
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, _index(device))  # an index: torch 2.11 refuses a bare 'cuda'
    _caps[_index(device)] = cap_bytes


def memory_cap(device: torch.device) -> int | None:
    return _caps.get(_index(device)) if device.type == "cuda" else None


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: the driver's free memory plus what PyTorch holds
    unused in its cache, and no more than the cap leaves. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    cap = memory_cap(device)
    return max(0, available if cap is None else min(available, cap - allocated))


def peak_device_bytes(device: torch.device) -> dict | None:
    """The high-water marks since the last `reset_peak`: bytes in tensors and bytes PyTorch held; None off CUDA."""
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}


def empty_host_cache(device: torch.device) -> None:
    """Give the host RAM of a released memory (its block store) back to the system. On CUDA, unpin what
    PyTorch's caching host allocator keeps of freed pinned blocks (pinned pages are RAM nothing else can use).
    On glibc, return the C heap's free pages: a block store is a thousand 3 MB segments at 128K tokens for the
    embedded model, below glibc's mmap threshold, and glibc keeps freed heap memory in its arenas. Without this
    the 128K recall grid, reading one document after another in one process, grew by a whole store per
    document until it filled the machine's 24 GB (a 12K-token restore loop: 1.9 GB and rising by ~40 MB a
    turn, against a steady 1.1 GB with it)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)  # copies may still read those pages
        torch._C._host_emptyCache()
    return_free_heap()


def return_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc; a no-op elsewhere): after each prefill chunk on a CPU.
    glibc's mmap threshold rises to the size of each large block freed (up to 32 MiB), after which a chunk's
    transient tensors (a layer's activations and attention scores, a few MB each) come from the heap; freed between
    the memory's long-lived tensors, they stayed in RSS. Trimmed once a chunk, the chunk's own layers still reuse
    those pages: Qwen3-0.6B's memory at 4,096 tokens peaks 0.3-0.5 GB lower at the same speed (in-process), where
    fixing the threshold at 4 MiB (a mapping, zeroed, for every transient) saved ~0.1 GB more but cost a 512-token
    prefill ~7% (docs/host-ram-2026-12-05.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None elsewhere (macOS, musl: their allocators return memory their own way)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cache_capacity_blocks(config: MemoryConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> int:
    """Blocks per layer for the LRU block cache: the config's count, or for "auto" none on a CPU and on CUDA a
    quarter of the memory left (after the weights, the memory's own tiers and activation headroom), at most 128."""
    if config.cache_blocks != "auto":
        return config.cache_blocks
    if device.type == "cpu":
        return CPU_CACHE_BLOCKS
    free = free_device_bytes(device)
    if free is None:
        return OTHER_CACHE_BLOCKS
    return auto_cache_blocks(config, spec, free, dtype.itemsize)


def auto_cache_blocks(config: MemoryConfig, spec: ModelSpec, free_bytes: int, elem_bytes: int = 2) -> int:
    """The "auto" cache on a GPU with `free_bytes` left once the weights are loaded (also what `edgectx plan`
    assumes)."""
    token_bytes = spec.kv_bytes_per_token(elem_bytes)  # K and V, every layer
    # The resident tiers and the assembled context hold about a budget and a chunk each, with room to grow.
    tiers_bytes = 3 * (config.budget_tokens + config.chunk_tokens) * token_bytes
    usable = free_bytes - tiers_bytes - ACTIVATION_HEADROOM_BYTES
    n_blocks = int(AUTO_CACHE_FRACTION * usable) // (config.block_size * token_bytes)
    return max(config.top_k_blocks, min(n_blocks, AUTO_CACHE_MAX_BLOCKS))
