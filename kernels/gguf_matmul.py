"""y = x @ W.T in Triton with W kept in its GGUF blocks, decoded in registers; and the same decode writing W out.

ggml stores each weight row as blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or 256 (Q4_K, Q5_K, Q6_K) elements:
fp16 scales and packed 4..8-bit integers (ggml-common.h's block_q4_0 ... block_q6_K). One kernel serves every
type (QTYPE is a compile-time constant) in two modes:

- matvec (decode, a few tokens): program (t, n) takes token t and a tile of BLOCK_N output rows, walks the row
  in steps of NB blocks, decodes each block's sub-groups of RUN elements as (BLOCK_N, NB, RUN) float32 tiles
  and accumulates weight * activation elementwise, reducing once at the end. Activations are read in their own
  dtype (fp16, bf16, fp32) and never quantized. Tokens are separate programs next to each other in the grid,
  so a row tile's bytes come from DRAM once and from L2 for the other tokens; the decode work grows with the
  token count, which is why a caller hands long inputs to the dequantize path instead.
- dequantize (prefill): the same decode stores the tile to a (rows, cols) buffer of the compute dtype, for a
  caller that then runs one cuBLAS matmul (edgectx.quant.gguf_cuda).

Every block-level value (scales, mins, Q5's high-bit words) is loaded as a (BLOCK_N, NB, 1) tile and broadcast,
so a thread issues one contiguous load per run of quants rather than one gather per weight. The oracle is
edgectx.quant.gguf_dequant (the torch decoder that matches the `gguf` package bit for bit); this package may not
import it (kernels sit below quant), so the block layouts are restated here as plain numbers, keyed by ggml's
type ids, and tests/test_gguf_matmul.py checks both the table and the kernels against it.

    y = gguf_matvec(x, raw, 12, rows=4096, cols=4096)              # raw uint8 (rows, row_bytes) Q4_K on cuda
    w = gguf_dequantize(raw, 12, 4096, 4096, dtype=torch.float16)  # (4096, 4096)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ggml type ids (gguf.GGMLQuantizationType's values)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14


@dataclass(frozen=True)
class BlockLayout:
    elems: int  # weights per block
    nbytes: int  # bytes per block
    run: int  # contiguous quant bytes a sub-group decodes at once: the last tile dimension
    blocks_per_step: int  # NB: blocks a program decodes per loop step
    block_n: int  # output rows per program: ptxas for sm_90 at 4 warps gives 48..96 registers, no spills (untimed)
    # matvec's tile (BLOCK_N, blocks per step, warps) where one was measured; else (block_n, blocks_per_step, 4).
    # Q4_K, Q6_K: the fastest of 48 tiles on an H200 (14336 x 4096, one token, replayed from a CUDA graph, 2026-12-04):
    # Q4_K 0.033 ms (the tile above: 0.094 ms), Q6_K 0.042 ms (0.051 ms); cuBLAS fp16 0.030 ms
    matvec_tile: tuple[int, int, int] | None = None


LAYOUTS: dict[int, BlockLayout] = {
    Q4_0: BlockLayout(32, 18, 16, 8, 8),
    Q4_1: BlockLayout(32, 20, 16, 8, 16),
    Q5_0: BlockLayout(32, 22, 16, 8, 8),
    Q5_1: BlockLayout(32, 24, 16, 8, 16),
    Q8_0: BlockLayout(32, 34, 32, 4, 16),
    Q4_K: BlockLayout(256, 144, 32, 4, 16, matvec_tile=(4, 8, 2)),
    Q5_K: BlockLayout(256, 176, 32, 4, 8),
    Q6_K: BlockLayout(256, 210, 32, 4, 8, matvec_tile=(4, 4, 8)),
}


def supports(qtype: int) -> bool:
    return int(qtype) in LAYOUTS


@triton.jit
def _u8(W, offs, mask):
    """Bytes at W + offs as int32 in 0..255 (zero where masked)."""
    return tl.load(W + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(W, offs, mask):
    """A little-endian fp16 at W + offs (any alignment), as float32."""
    bits = _u8(W, offs, mask) | (_u8(W, offs + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _emit(acc, w, elem, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT: tl.constexpr):
    """One decoded tile: w (BLOCK_N, NB, RUN) float32 for the columns elem (1, NB, RUN) of the rows.
    matvec: acc += w * x[t, elem]; dequantize: OUT[rows, elem] = w."""
    if DEQUANT:
        tl.store(OUT + rows * stride_o + elem, w.to(OUT.dtype.element_ty), mask=row_ok & ok)
    else:
        x = tl.load(X + t * stride_x + elem, mask=ok, other=0.0).to(tl.float32)
        acc += w * x
    return acc


@triton.jit
def _k_scale_min(W, base, m, J: tl.constexpr):
    """Q4_K/Q5_K: sub-block J's six-bit scale and min from the 12 bytes at base + 4 (ggml's get_scale_min_k4)."""
    if J < 4:
        sc = _u8(W, base + 4 + J, m) & 63
        mn = _u8(W, base + 8 + J, m) & 63
    else:
        a = _u8(W, base + J, m)  # byte J - 4
        b = _u8(W, base + 4 + J, m)  # byte J
        c = _u8(W, base + 8 + J, m)  # byte J + 4
        sc = (c & 15) | ((a >> 6) << 4)
        mn = (c >> 4) | ((b >> 6) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _gguf_kernel(W, X, OUT, n_rows, n_blocks, row_bytes, stride_x, stride_o,
                 QTYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, RUN: tl.constexpr,
                 NB: tl.constexpr, BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr):
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]  # (BLOCK_N, 1, 1)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    row_base = rows * row_bytes
    nb = tl.arange(0, NB)[None, :, None]  # (1, NB, 1): block within the step
    s = tl.arange(0, RUN)[None, None, :]  # (1, 1, RUN): byte within the run
    acc = tl.zeros([BLOCK_N, NB, RUN], dtype=tl.float32)
    for kb in range(0, n_blocks, NB):
        blk = kb + nb
        ok = blk < n_blocks  # (1, NB, 1)
        m = row_ok & ok  # (BLOCK_N, NB, 1)
        base = row_base + blk * BB  # (BLOCK_N, NB, 1) int64: first byte of each block
        k0 = blk * QK  # (1, NB, 1): first column of each block
        if QTYPE == 2:  # Q4_0: d, 16 bytes of nibbles; element s low, s + 16 high; w = d * (q - 8)
            d = _f16(W, base, m)
            q = _u8(W, base + 2 + s, m)
            acc = _emit(acc, d * ((q & 15) - 8).to(tl.float32), k0 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
            acc = _emit(acc, d * ((q >> 4) - 8).to(tl.float32), k0 + 16 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        elif QTYPE == 3:  # Q4_1: d, m, nibbles; w = d * q + m
            d = _f16(W, base, m)
            mn = _f16(W, base + 2, m)
            q = _u8(W, base + 4 + s, m)
            acc = _emit(acc, d * (q & 15).to(tl.float32) + mn, k0 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
            acc = _emit(acc, d * (q >> 4).to(tl.float32) + mn, k0 + 16 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        elif QTYPE == 6:  # Q5_0: d, 32 high bits (bit j for element j), nibbles; w = d * (q - 16)
            d = _f16(W, base, m)
            qh_lo = _u8(W, base + 2, m) | (_u8(W, base + 3, m) << 8)  # bits of elements 0..15
            qh_hi = _u8(W, base + 4, m) | (_u8(W, base + 5, m) << 8)  # bits of elements 16..31
            q = _u8(W, base + 6 + s, m)
            lo = (q & 15) | (((qh_lo >> s) & 1) << 4)
            hi = (q >> 4) | (((qh_hi >> s) & 1) << 4)
            acc = _emit(acc, d * (lo - 16).to(tl.float32), k0 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
            acc = _emit(acc, d * (hi - 16).to(tl.float32), k0 + 16 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        elif QTYPE == 7:  # Q5_1: d, m, high bits, nibbles; w = d * q + m
            d = _f16(W, base, m)
            mn = _f16(W, base + 2, m)
            qh_lo = _u8(W, base + 4, m) | (_u8(W, base + 5, m) << 8)
            qh_hi = _u8(W, base + 6, m) | (_u8(W, base + 7, m) << 8)
            q = _u8(W, base + 8 + s, m)
            lo = (q & 15) | (((qh_lo >> s) & 1) << 4)
            hi = (q >> 4) | (((qh_hi >> s) & 1) << 4)
            acc = _emit(acc, d * lo.to(tl.float32) + mn, k0 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
            acc = _emit(acc, d * hi.to(tl.float32) + mn, k0 + 16 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        elif QTYPE == 8:  # Q8_0: d, 32 int8; w = q * d
            d = _f16(W, base, m)
            q = ((_u8(W, base + 2 + s, m) ^ 128) - 128).to(tl.float32)  # the byte as int8
            acc = _emit(acc, q * d, k0 + s, ok, X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        elif QTYPE == 14:  # Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d; w = d * scale * (q - 32)
            d = _f16(W, base + 208, m)
            for h in tl.static_range(2):  # each half: 128 elements from 64 ql bytes and 32 qh bytes
                ql_a = _u8(W, base + 64 * h + s, m)
                ql_b = _u8(W, base + 64 * h + 32 + s, m)
                qh = _u8(W, base + 128 + 32 * h + s, m)
                for r in tl.static_range(4):  # element 128 h + 32 r + s; its scale is number 8 h + 2 r + s // 16
                    if r % 2 == 0:
                        low = ql_a
                    else:
                        low = ql_b
                    low = (low >> (4 * (r // 2))) & 15
                    q = (low | (((qh >> (2 * r)) & 3) << 4)) - 32
                    sc0 = (_u8(W, base + 192 + 8 * h + 2 * r, m) ^ 128) - 128
                    sc1 = (_u8(W, base + 193 + 8 * h + 2 * r, m) ^ 128) - 128
                    sc = tl.where(s < 16, sc0, sc1).to(tl.float32)
                    acc = _emit(acc, (d * sc) * q.to(tl.float32), k0 + 128 * h + 32 * r + s, ok,
                                X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
        else:  # Q4_K (12) / Q5_K (13): d, dmin, 12 scale bytes, [Q5_K: 32 high-bit bytes], 128 nibble bytes
            d = _f16(W, base, m)
            dmin = _f16(W, base + 2, m)
            if QTYPE == 13:
                qh = _u8(W, base + 16 + s, m)  # bit j of byte s: element 32 j + s
            for g in tl.static_range(4):  # 32 bytes of nibbles: elements 64 g + s (low) and 64 g + 32 + s (high)
                if QTYPE == 12:
                    q = _u8(W, base + 16 + 32 * g + s, m)
                    lo = q & 15
                    hi = q >> 4
                else:
                    q = _u8(W, base + 48 + 32 * g + s, m)
                    lo = (q & 15) | (((qh >> (2 * g)) & 1) << 4)
                    hi = (q >> 4) | (((qh >> (2 * g + 1)) & 1) << 4)
                sc, mn = _k_scale_min(W, base, m, 2 * g)
                acc = _emit(acc, (d * sc) * lo.to(tl.float32) - dmin * mn, k0 + 64 * g + s, ok,
                            X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
                sc, mn = _k_scale_min(W, base, m, 2 * g + 1)
                acc = _emit(acc, (d * sc) * hi.to(tl.float32) - dmin * mn, k0 + 64 * g + 32 + s, ok,
                            X, OUT, t, rows, row_ok, stride_x, stride_o, DEQUANT)
    if not DEQUANT:
        y = tl.sum(tl.sum(acc, 2), 1)  # (BLOCK_N,)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(OUT + t * stride_o + n, y.to(OUT.dtype.element_ty), mask=n < n_rows)


def _check(raw: torch.Tensor, qtype: int, rows: int, cols: int) -> BlockLayout:
    layout = LAYOUTS.get(int(qtype))
    if layout is None:
        raise ValueError(f"no Triton GGUF kernel for ggml type {int(qtype)}")
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[0] != rows or raw.stride(1) != 1 \
            or cols % layout.elems or raw.shape[1] != cols // layout.elems * layout.nbytes:
        raise ValueError(f"{raw.dtype} {tuple(raw.shape)} bytes do not hold ggml type {int(qtype)} rows of {rows}x{cols}")
    if raw.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the GGUF kernels run on CUDA tensors (on a CPU only under TRITON_INTERPRET=1, for tests)")
    return layout


def _steps(layout: BlockLayout, cols: int, blocks_per_step: int | None) -> int:
    nb = blocks_per_step or layout.blocks_per_step
    if nb & (nb - 1):
        raise ValueError(f"blocks_per_step must be a power of two, not {nb}")
    return min(nb, triton.next_power_of_2(cols // layout.elems))  # a short row does not pad to a long step


def gguf_matvec(x: torch.Tensor, raw: torch.Tensor, qtype: int, rows: int, cols: int, out: torch.Tensor | None = None,
                *, block_n: int | None = None, blocks_per_step: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x (T, cols) @ W.T -> (T, rows) in x's dtype (or written into `out`, any (T, rows) view with unit column
    stride, such as a column slice of a fused output). W: raw uint8 (rows, row_bytes) blocks of ggml type `qtype`.
    Meant for small T (decode): every token decodes the weights again. block_n, blocks_per_step (powers of
    two): the tile, by default the type's LAYOUTS entry."""
    layout = _check(raw, qtype, rows, cols)
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"x {tuple(x.shape)} does not match a {rows}x{cols} weight")
    if x.stride(1) != 1:
        x = x.contiguous()
    n_tokens = x.shape[0]
    if out is None:
        out = torch.empty(n_tokens, rows, device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != (n_tokens, rows) or out.stride(1) != 1:
        raise ValueError(f"out {tuple(out.shape)} with strides {out.stride()} cannot take ({n_tokens}, {rows}) by rows")
    if n_tokens == 0 or rows == 0:
        return out
    tile = layout.matvec_tile or (layout.block_n, layout.blocks_per_step, 4)
    block_n, blocks_per_step, num_warps = block_n or tile[0], blocks_per_step or tile[1], num_warps or tile[2]
    grid = (n_tokens, triton.cdiv(rows, block_n))
    _gguf_kernel[grid](raw, x, out, rows, cols // layout.elems, raw.stride(0), x.stride(0), out.stride(0),
                       QTYPE=int(qtype), QK=layout.elems, BB=layout.nbytes, RUN=layout.run,
                       NB=_steps(layout, cols, blocks_per_step), BLOCK_N=block_n, DEQUANT=False, num_warps=num_warps)
    return out


def gguf_dequantize(raw: torch.Tensor, qtype: int, rows: int, cols: int, out: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float16, *, block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """W (rows, cols) in `dtype` (or written into `out`, whose rows may be strided) from its raw blocks."""
    layout = _check(raw, qtype, rows, cols)
    if out is None:
        out = torch.empty(rows, cols, device=raw.device, dtype=dtype)
    elif tuple(out.shape) != (rows, cols) or out.stride(1) != 1:
        raise ValueError(f"out {tuple(out.shape)} with strides {out.stride()} cannot take a {rows}x{cols} weight")
    if rows == 0:
        return out
    block_n = block_n or layout.block_n
    grid = (1, triton.cdiv(rows, block_n))
    _gguf_kernel[grid](raw, raw, out, rows, cols // layout.elems, raw.stride(0), 0, out.stride(0),
                       QTYPE=int(qtype), QK=layout.elems, BB=layout.nbytes, RUN=layout.run,
                       NB=_steps(layout, cols, None), BLOCK_N=block_n, DEQUANT=True, num_warps=num_warps)
    return out
