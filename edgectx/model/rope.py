"""Rotary position embeddings as llama.cpp computes them: base, linear and YaRN scaling, freq factors.

Keys are cached before RoPE (see ARCHITECTURE.md, Positions), so the memory rotates them at attention
time with whatever positions it assigns. All architectures use the half-split ("NEOX") layout here: the
loader undoes the row permutation GGUF applies to llama Q/K weights, so one rotation serves all.

    rope = Rope(spec, device=torch.device("cpu"))
    q = rope.apply(q, torch.arange(16))  # q: (n_heads, 16, head_dim)
"""

from __future__ import annotations

import math

import torch

from edgectx.model.spec import ModelSpec


def _yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


class Rope:
    """Cos/sin tables grown on demand; `apply` rotates the first `rope_dim` dims of each head."""

    def __init__(self, spec: ModelSpec, device: torch.device, long_context: bool = False):
        self.rope_dim = spec.rope_dim
        self.device = device
        half = spec.rope_dim // 2
        i = torch.arange(half, dtype=torch.float64)
        inv_freq = spec.rope_base ** (-2.0 * i / spec.rope_dim)
        factors = spec.rope_freq_factors_long if long_context and spec.rope_freq_factors_long else spec.rope_freq_factors
        if factors is not None:
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
        scaling = spec.rope_scaling
        freq_scale = 1.0 / scaling.factor if scaling.kind in ("linear", "yarn") else 1.0
        mscale = scaling.attn_factor
        # ramp = 1 keeps a dimension's original frequency (extrapolate), 0 interpolates it by freq_scale.
        ramp = torch.zeros(half, dtype=torch.float64)
        if scaling.kind == "yarn":
            n_ctx_orig = scaling.original_context or spec.context_length
            low = max(0.0, math.floor(_yarn_corr_dim(spec.rope_dim, n_ctx_orig, scaling.beta_fast, spec.rope_base)))
            high = min(spec.rope_dim - 1.0, math.ceil(_yarn_corr_dim(spec.rope_dim, n_ctx_orig, scaling.beta_slow, spec.rope_base)))
            y = (i - low) / max(0.001, high - low)
            ramp = 1.0 - y.clamp(0.0, 1.0)
            mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
        # theta = p * inv_freq * (freq_scale * (1 - ramp) + ramp)
        self._freq = inv_freq * (freq_scale * (1.0 - ramp) + ramp)  # (half,)
        self._mscale = mscale
        self._cos = torch.empty(0, half, device=device)
        self._sin = torch.empty(0, half, device=device)
        self._last_range: tuple | None = None  # ((start, n, dtype), tables): what every layer of a step asks for
        self._signed_all: tuple | None = None  # (the cos table they came from, {dtype: signed tables for all positions})

    def _ensure(self, n_positions: int) -> None:
        if n_positions <= self._cos.shape[0]:
            return
        size = max(n_positions, 2 * self._cos.shape[0], 4096)
        theta = torch.arange(size, dtype=torch.float64)[:, None] * self._freq[None, :]  # (size, half)
        self._cos = (torch.cos(theta) * self._mscale).to(torch.float32).to(self.device)
        self._sin = (torch.sin(theta) * self._mscale).to(torch.float32).to(self.device)

    @property
    def n_positions(self) -> int:
        """Positions the tables cover now. Each growth recomputes them whole, so a fresh Rope grown once
        to this size has bit-identical tables (what a restored snapshot needs)."""
        return self._cos.shape[0]

    def reserve(self, n_positions: int) -> None:
        self._ensure(n_positions)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype,
               n_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin) for `positions` (T,), each (T, rope_dim): cos repeated over both halves and
        sin as [-sin, sin], so that rotation is `x * cos + swap_halves(x) * signed_sin` (3 ops, not 7).
        `n_positions`: a bound on the positions (all < it) known on the host. Without it the tables are grown to
        the largest position, which a device tensor must send back to the host: a sync that waits for the GPU."""
        if n_positions is None:
            n_positions = int(positions.max()) + 1 if positions.numel() else 0
        # Rows gathered with index_select: indexing a table with a (n_kv, S) position tensor took PyTorch's general
        # advanced-indexing kernel, ten times slower on the CPU (1.1 against 0.12 ms for 3 x 2,600 rows of 64).
        flat, shape = positions.reshape(-1), positions.shape
        if self.device.type == "cpu" and dtype == torch.float32:  # one gather per table, not a gather and a cat
            cos, sin = self.signed_tables(n_positions)
            return cos.index_select(0, flat).view(*shape, cos.shape[1]), sin.index_select(0, flat).view(*shape, sin.shape[1])
        self._ensure(n_positions)
        half = self._cos.shape[1]
        return self._signed(self._cos.index_select(0, flat).view(*shape, half),
                            self._sin.index_select(0, flat).view(*shape, half), dtype)

    def range_tables(self, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`tables` for positions start .. start + n - 1, sliced from the tables with no index and no sync (the
        range is known on the host). The last range is kept: every layer of a decode step may ask for the same one."""
        key = (start, n, dtype)
        if self._last_range is None or self._last_range[0] != key:
            self._ensure(start + n)
            self._last_range = (key, self._signed(self._cos[start : start + n], self._sin[start : start + n], dtype))
        return self._last_range[1]

    @staticmethod
    def _signed(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos.to(dtype), sin.to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def signed_tables(self, n_positions: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """`tables` for every position below (at least) `n_positions`, (N, rope_dim) in `dtype`: row p is what
        `range_tables(p, 1, dtype)` gives, bit for bit. Kept until the tables grow, so a caller may address rows
        by pointer (edgectx.quant.ggml_decode) or index them with a device tensor (a captured CUDA graph)."""
        self._ensure(n_positions)
        if self._signed_all is None or self._signed_all[0] is not self._cos:
            self._signed_all = (self._cos, {})
        by_dtype = self._signed_all[1]
        if dtype not in by_dtype:
            by_dtype[dtype] = self._signed(self._cos, self._sin, dtype)
        return by_dtype[dtype]

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., T, head_dim) at `positions` (T,), returning a new tensor."""
        return self.rotate(x, *self.tables(positions, x.dtype))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x (..., T, head_dim) with tables from `tables`: x * cos + swap_halves(x) * signed_sin, one half
        at a time in place of a rolled copy of x (the same float32 products and sums, so the same bits). `x` may be
        narrower than the tables (float16 keys with float32 tables: each product widens it exactly, as a copy in
        float32 first would). `out`: where to write (not overlapping x), else a new tensor."""
        rd, half = self.rope_dim, self.rope_dim // 2
        if rd == x.shape[-1]:
            out = torch.mul(x, cos, out=out) if out is not None else x * cos
        elif out is not None:
            torch.mul(x[..., :rd], cos, out=out[..., :rd])
            out[..., rd:] = x[..., rd:]
        else:
            out = torch.cat((x[..., :rd] * cos, x[..., rd:].to(torch.result_type(x, cos))), dim=-1)
        out[..., :half] += x[..., half:rd] * signed_sin[..., :half]
        out[..., half:rd] += x[..., :half] * signed_sin[..., half:]
        return out
