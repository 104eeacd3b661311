"""Synthetic models: the real shapes of popular long-context models, with random weights.

Speed and memory at 8B scale depend on shapes, not on what the weights say, so benchmarks and the
memory planner can use a Llama-3.1-8B without downloading 5 GB. `build_synthetic` creates each weight
directly in its target form, one matrix at a time on the target device (nf4 on CUDA never holds the
fp16 model: peak is the quantized model plus one fp16 matrix). Scales keep activations O(1): linear
weights ~ N(0, 1/in_features), the residual-writing ones shrunk by sqrt(2 * n_layers) (GPT-2's rule).
Shapes are from each model's config.json (Hugging Face); `num_params` matches the published counts.

    model, spec = build_synthetic("llama-3.1-8b", torch.device("cuda"), torch.bfloat16, weights="nf4")
    spec.weight_bytes("nf4")  # what those weights occupy
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from edgectx.model.transformer import Transformer
from edgectx.quant.linear import linear_factories
from edgectx.model.spec import ModelSpec, RopeScaling


def llama3_freq_factors(head_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                        original_context: int) -> tuple[float, ...]:
    """Llama 3.1's rope scaling as per-frequency divisors (what GGUF's rope_freqs.weight holds): long
    wavelengths are divided by `factor`, short ones kept, those between blended smoothly."""
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    factors = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


# Phi-3-mini-128k-instruct's LongRoPE divisors (config.json rope_scaling, 48 per head): short below 4K, long past it.
_PHI3_SHORT = (1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.25, 1.25, 1.4, 1.45, 1.55, 1.85, 1.9) + (2.0,) * 19 + (
    2.1, 2.1, 2.2, 2.35, 2.35, 2.35, 2.35, 2.4, 2.4, 2.65, 2.7, 2.9, 2.95, 3.05, 3.05, 3.05)
_PHI3_LONG = (1.03, 1.05, 1.05, 1.08, 1.23, 1.23, 1.3, 1.45, 1.6, 1.65, 1.9, 2.86, 3.69, 5.42, 5.49, 5.49, 9.09, 11.58,
              15.66, 15.77, 15.79, 18.36, 21.99, 23.08, 30.01, 32.35, 32.59, 35.56, 39.95, 53.84, 56.2, 57.95, 59.29,
              59.77, 59.92, 61.19, 61.96, 62.5, 63.37, 63.48, 63.48, 63.66, 63.85, 64.08, 64.76, 64.8, 64.81, 64.81)

SYNTHETIC: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec(
        arch="llama", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336, vocab_size=128256,
        context_length=131072, norm_eps=1e-5, rope_base=500000.0,
        rope_scaling=RopeScaling(original_context=8192),  # llama3 scaling arrives as freq factors, as in GGUF
        rope_freq_factors=llama3_freq_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192)),
    "phi-3-mini-128k": ModelSpec(
        arch="phi3", n_layers=32, dim=3072, n_heads=32, n_kv_heads=32, head_dim=96, ffn_dim=8192, vocab_size=32064,
        context_length=131072, norm_eps=1e-5, rope_base=10000.0,
        # LongRoPE: attn_factor = sqrt(1 + ln(131072 / 4096) / ln(4096)), as llama.cpp computes it
        rope_scaling=RopeScaling(original_context=4096, attn_factor=math.sqrt(1 + math.log(32) / math.log(4096))),
        rope_freq_factors=_PHI3_SHORT, rope_freq_factors_long=_PHI3_LONG),
    "qwen2.5-7b": ModelSpec(
        arch="qwen2", n_layers=28, dim=3584, n_heads=28, n_kv_heads=4, head_dim=128, ffn_dim=18944, vocab_size=152064,
        context_length=131072, norm_eps=1e-6, rope_base=1000000.0, qkv_bias=True,
        rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_context=32768)),  # Qwen's recipe past 32K
    # For tests: seconds on a CPU.
    "tiny": ModelSpec(arch="llama", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                      vocab_size=512, context_length=4096),
}
PUBLISHED_PARAMS = {"llama-3.1-8b": 8.03e9, "phi-3-mini-128k": 3.82e9, "qwen2.5-7b": 7.62e9}


def synthetic_spec(name: str) -> ModelSpec:
    from edgectx.errors import UsageError

    if name not in SYNTHETIC:
        raise UsageError(f"There is no synthetic model {name!r}: choose one of {', '.join(SYNTHETIC)}.")
    return SYNTHETIC[name]


def build_synthetic(name: str | ModelSpec, device: torch.device, dtype: torch.dtype, weights: str = "auto",
                    seed: int = 0, progress: Callable[[int, int], None] | None = None) -> tuple[Transformer, ModelSpec]:
    """A `Transformer` with `name`'s shapes (a SYNTHETIC key, or a ModelSpec) and random weights, built layer
    by layer on `device` with linears from `linear_factory(device, dtype, weights)`; returns (model, spec)."""
    spec = synthetic_spec(name) if isinstance(name, str) else name
    device = torch.device(device)
    make_linear, make_head = linear_factories(device, dtype, weights)  # as the model loaders do
    # Float32 on CPUs: fp16-packing wants float32 input; elsewhere the compute dtype, so no float32 copy exists.
    init_dtype = torch.float32 if device.type == "cpu" else dtype
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=init_dtype, generator=generator).mul_(std)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(dtype), requires_grad=False)

    residual = 1 / math.sqrt(2 * spec.n_layers)
    with torch.device("meta"):
        model = Transformer(spec)
    model.embed.weight = param(randn(spec.vocab_size, spec.dim, std=1.0))
    model.norm.weight = param(torch.ones(spec.dim, device=device))
    model.lm_head = make_head(randn(spec.vocab_size, spec.dim, std=spec.dim**-0.5), None)
    for i, block in enumerate(model.layers):
        block.attn_norm.weight = param(torch.ones(spec.dim, device=device))
        block.ffn_norm.weight = param(torch.ones(spec.dim, device=device))
        (o_qkv, _), (o_wo, i_wo), (o_gu, _), (o_down, i_down) = spec.block_linear_shapes
        bias = randn(o_qkv, std=0.02) if spec.qkv_bias else None
        block.attn.wqkv = make_linear(randn(o_qkv, spec.dim, std=spec.dim**-0.5), bias)
        block.attn.wo = make_linear(randn(o_wo, i_wo, std=i_wo**-0.5 * residual), None)
        block.ffn.w_gate_up = make_linear(randn(o_gu, spec.dim, std=spec.dim**-0.5), None)
        block.ffn.w_down = make_linear(randn(o_down, i_down, std=i_down**-0.5 * residual), None)
        if spec.qk_norm:
            block.attn.q_norm.weight = param(torch.ones(spec.head_dim, device=device))
            block.attn.k_norm.weight = param(torch.ones(spec.head_dim, device=device))
        if progress:
            progress(i + 1, spec.n_layers)
    return model.eval(), spec
