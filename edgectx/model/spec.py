"""Model shapes and RoPE parameters in one frozen dataclass, the single source of byte figures.

Read from GGUF metadata by `edgectx.model.gguf`, or from a checkpoint's config.json by `edgectx.model.hf`;
planners, gauges and benchmarks ask the spec for sizes instead of re-deriving them.

    spec = ModelSpec(arch="llama", n_layers=30, dim=576, n_heads=9, n_kv_heads=3, head_dim=64,
                     ffn_dim=1536, vocab_size=49152, context_length=8192)
    spec.kv_bytes_per_token(2)  # 23040: fp16 K and V for all layers
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# Bits per weight of a transformer block's linear layers in each weight format (edgectx.quant), scales
# included: nf4 = 4-bit codes + a float32 absmax per 64 weights (not double-quantized: quant/bnb_linear.py);
# int8 = 8-bit codes, plus an fp32 scale per output row.
WEIGHT_FORMAT_BITS = {"fp16": 16.0, "int8": 8.0, "nf4": 4.0 + 32 / 64}


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched past the trained context (llama.cpp's rope parameters)."""

    kind: str = "none"  # none | linear | yarn; llama3 and longrope arrive as per-dimension freq_factors
    factor: float = 1.0  # context stretch; positions are divided by it (linear) or blended (yarn)
    original_context: int = 0  # the pre-scaling trained context, for yarn's correction range
    attn_factor: float = 1.0  # multiplies cos/sin (yarn, longrope magnitude correction)
    beta_fast: float = 32.0  # yarn: rotations per context below which dimensions extrapolate
    beta_slow: float = 1.0  # yarn: rotations per context above which dimensions interpolate


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int  # trained context window, from metadata
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int = 0  # rotated dimensions per head; 0 means all of head_dim
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # Per-frequency divisors (llama3 scaling, phi3 longrope short/long): len == rope_dim // 2.
    rope_freq_factors: tuple[float, ...] | None = None
    rope_freq_factors_long: tuple[float, ...] | None = None
    qkv_bias: bool = False  # qwen2 adds biases to the Q, K, V projections
    qk_norm: bool = False  # qwen3 normalizes each head's Q and K (RMSNorm over head_dim) before RoPE
    tied_embeddings: bool = False  # output projection reuses token_embd
    sliding_window: int = 0  # 0 means attention over the whole context

    def __post_init__(self) -> None:
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, elem_bytes: int = 2) -> int:
        """K and V bytes one token occupies across all layers at `elem_bytes` per element."""
        return 2 * self.n_layers * self.kv_dim * elem_bytes

    @property
    def num_params(self) -> int:
        attn = self.dim * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.dim
        if self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            attn += 2 * self.head_dim
        ffn = 3 * self.dim * self.ffn_dim
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim
        output = 0 if self.tied_embeddings else embed
        return self.n_layers * per_layer + embed + output + self.dim

    @property
    def block_linear_shapes(self) -> tuple[tuple[int, int], ...]:
        """(out, in) of one block's fused linears: wqkv, wo, w_gate_up, w_down."""
        return ((self.q_dim + 2 * self.kv_dim, self.dim), (self.dim, self.q_dim),
                (2 * self.ffn_dim, self.dim), (self.dim, self.ffn_dim))

    def weight_bytes(self, weights: str = "fp16", dense_bytes: int = 2) -> int:
        """Bytes the loaded model holds with its block linears in `weights` (fp16 | int8 | nf4). The output
        projection is always a 16-bit linear (a separate copy even when tied); embeddings, norms and biases
        stay in the compute dtype, `dense_bytes` each (4 for float32 on a CPU)."""
        if weights not in WEIGHT_FORMAT_BITS:
            raise ValueError(f"weight formats are {', '.join(WEIGHT_FORMAT_BITS)}, not {weights!r}")
        n_linear = sum(o * i for o, i in self.block_linear_shapes)
        rows = sum(o for o, _ in self.block_linear_shapes)
        block = n_linear * WEIGHT_FORMAT_BITS[weights] / 8 + (4 * rows if weights == "int8" else 0)
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        dense = self.vocab_size * self.dim + self.dim + self.n_layers * (2 * self.dim + bias + 2 * self.head_dim * self.qk_norm)
        return int(self.n_layers * block) + 2 * self.vocab_size * self.dim + dense * dense_bytes

    def describe(self) -> str:
        millions = self.num_params / 1e6
        return (
            f"{self.arch}, {millions:,.{0 if millions >= 10 else 2}f}M parameters, {self.n_layers} layers, dim {self.dim}, {self.n_heads} heads "
            f"({self.n_kv_heads} KV), vocab {self.vocab_size}, trained context {self.context_length}"
        )
