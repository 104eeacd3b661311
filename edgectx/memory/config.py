"""The long-context memory's settings, in one place, with the reason for each default.

`budget_tokens` is what the device holds per layer and KV head for attention: sinks + local window +
retained tokens + retrieved blocks. The rest of the context lives in the host block store and comes
back through retrieval. Defaults follow Locret (chunk 512 ... budget a few K) and InfLLM (128-token
blocks, a handful of retrieved blocks, an LRU block cache), scaled to a small model on a CPU.

    config = MemoryConfig(budget_tokens=2048)
    config.n_retain  # 2048 - 64 sinks - 512 window - 4 * 128 retrieved = 960
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgectx.errors import UsageError

POSITIONS = ("compact", "original")
SCORERS = ("auto", "heads", "attention", "window")
HOST_DTYPES = ("float16", "bfloat16", "float32")
# The largest value each count may take. A config also arrives inside snapshot files from anywhere, and these
# counts size buffers before any token is read: far above any setting that helps, far below what exhausts a
# machine (a chunk of 8192 tokens already needs GBs of attention scratch on an 8B model).
LIMITS = {"budget_tokens": 1 << 20, "n_sink": 1 << 20, "n_local": 1 << 20, "block_size": 4096, "top_k_blocks": 256, "lexical_blocks": 256,
          "cache_blocks": 1 << 16, "chunk_tokens": 8192, "n_observe": 8192, "observe_stride": 8192, "retrieve_every": 4096, "evict_every": 4096}

# The prefill chunk when none is asked for, by device type. On a CPU a chunk's products are most of its time, and
# 512 keeps eviction fine-grained. On a GPU the products of a chunk are a small part of it: the host issues some
# 14,000 small operations a chunk past the budget on an 8B model (32 layers' retrieval, assembly, attention,
# observation and eviction), whatever the chunk's length, and the GPU waits on them (131,072 tokens took 59 s on an
# H200 in 512-token chunks, ~0.2 s a chunk; the products of one take ~0.02 s). 2,048-token chunks issue a quarter
# as many. On held-out text (8192 tokens, budget 2048, the last 512 decoded one token at a time) 2,048 decoded as
# near full attention as 512 or nearer: top-1 0.883 / 0.982 against 0.879 / 0.975 (nll +1.2% / -2.3% against
# +1.5% / -0.8%) on the Vim manual's chapters 20-29 and Textual's sources.
DEFAULT_CHUNK_TOKENS = {"cpu": 512, "cuda": 2048}


def default_chunk_tokens(device_type: str) -> int:
    """The prefill chunk for a device of `device_type` ("cpu", "cuda", ...) when none is asked for."""
    return DEFAULT_CHUNK_TOKENS.get(device_type, DEFAULT_CHUNK_TOKENS["cpu"])


@dataclass(frozen=True)
class MemoryConfig:
    budget_tokens: int = 2048  # device tokens per layer and KV head that attention reads (not counting the chunk)
    n_sink: int = 64  # first tokens, always kept: attention sinks (StreamingLLM) and the system prompt's start
    n_local: int = 512  # newest tokens, always kept: local coherence
    block_size: int = 128  # host-store block and retrieval unit (InfLLM)
    top_k_blocks: int = 4  # blocks retrieved per layer for each query chunk or decode step
    # of those (at most), blocks chosen for every layer and KV head by the query's rare tokens (edgectx.memory.lexical):
    # the only signal that found a one-line fact in a 16K document on the embedded model (docs/recall.md)
    lexical_blocks: int = 2
    # LRU block cache per layer on the device, in blocks (>= top_k_blocks); "auto": none on a CPU, sized from the
    # free memory on a GPU (edgectx.memory.device.cache_capacity_blocks)
    cache_blocks: int | str = "auto"
    # prefill chunk; eviction runs after each one. A CPU's default: the command line and the server take the
    # device's (default_chunk_tokens)
    chunk_tokens: int = 512
    positions: str = "compact"  # "compact": selected context renumbered 0..N-1; "original": true indices
    n_observe: int = 512  # recent queries whose attention mass scores eviction candidates: a whole chunk
    # (measured at 4096 tokens, budget 1024: top-1 agreement 0.962 with 512 vs 0.956 with SnapKV's 32)
    # of those, every `observe_stride`th (counted back from the newest) is observed: on held-out prose and code
    # (8192 tokens, budget 2048), every 4th matched all 512 in top-1 agreement (0.948 / 0.973 against 0.948 /
    # 0.973) at a quarter of the cost, which is a fifth of an evicting chunk's prefill with all of them.
    # A decode step's eviction observes only the last `evict_every` (the steps since the one before).
    observe_stride: int = 4
    # decode steps that reuse one retrieval (consecutive queries are alike). On held-out text (8192 tokens, the last 512
    # one token at a time), every 16th step decoded as near full attention as every 8th (top-1 0.885 / 0.977 against
    # 0.877 / 0.977 on the Vim manual's chapters 20-29 and Textual's sources; docs/speed-2026-12-06.md), and each
    # retrieval rebuilds every layer's context: half as many cost a tenth of decode time at 4,096 tokens
    retrieve_every: int = 16
    # decode steps between evictions (the window overflows by at most that many tokens); the evicting step retrieves
    # for its rebuilt context and restarts the retrieval count: keep it a multiple of retrieve_every
    evict_every: int = 64
    host_dtype: str = "float16"  # the host store's precision: halves its RAM at 128K with no measured loss
    scorer: str = "auto"  # eviction scores: "heads" (Locret retaining heads), "attention" (attention mass from
    # the observation window), "window" (recency, as StreamingLLM); "auto" = attention: on held-out prose and
    # code it beat the shipped heads in top-1 agreement (0.948 / 0.973 against 0.941 / 0.970; docs/recall.md)

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if name == "cache_blocks" and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise UsageError(f"{name} must be a whole number from 0 to {limit}, not {value!r}.")
        if not isinstance(self.host_dtype, str) or self.host_dtype not in HOST_DTYPES:
            raise UsageError(f"host_dtype must be one of {', '.join(HOST_DTYPES)}, not {self.host_dtype!r}.")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise UsageError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}.")
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise UsageError(f"scorer must be one of {', '.join(SCORERS)}, not {self.scorer!r}.")
        if min(self.block_size, self.chunk_tokens, self.n_local, self.retrieve_every, self.evict_every, self.observe_stride) < 1:
            raise UsageError("block_size, chunk_tokens, n_local, retrieve_every, evict_every and observe_stride must be positive.")
        fixed_cache = self.cache_blocks if self.cache_blocks != "auto" else self.top_k_blocks
        if min(self.n_sink, self.top_k_blocks, self.n_observe) < 0 or fixed_cache < self.top_k_blocks:
            raise UsageError("n_sink, top_k_blocks and n_observe must be >= 0, and cache_blocks >= top_k_blocks.")
        if self.n_retain < 0:
            raise UsageError(
                f"A budget of {self.budget_tokens} tokens cannot hold {self.n_sink} sinks, a {self.n_local}-token window "
                f"and {self.top_k_blocks} retrieved blocks of {self.block_size}: raise --budget."
            )

    @property
    def n_retain(self) -> int:
        """Older tokens kept per KV head by importance: the budget left after the fixed tiers."""
        return self.budget_tokens - self.n_sink - self.n_local - self.top_k_blocks * self.block_size

    @property
    def resident_tokens(self) -> int:
        """Tokens per head held outside the block cache once eviction has run (sinks + retained + window)."""
        return self.n_sink + self.n_retain + self.n_local

    @classmethod
    def for_budget(cls, budget_tokens: int, **overrides) -> "MemoryConfig":
        """A config for `budget_tokens`, shrinking the window and retrieval for small budgets."""
        base = cls()
        if budget_tokens < base.budget_tokens:
            scale = budget_tokens / base.budget_tokens
            overrides.setdefault("n_local", max(64, int(base.n_local * scale) // 64 * 64))
            overrides.setdefault("n_sink", max(4, int(base.n_sink * scale)))
            overrides.setdefault("top_k_blocks", max(1, int(base.top_k_blocks * scale)))
        return cls(budget_tokens=budget_tokens, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)
