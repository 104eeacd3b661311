"""GGUF block dequantization in torch, vectorized, on the tensor's device.

llama.cpp stores weights in blocks: a few fp16 scales and packed 2..8-bit integers (ggml-common.h's
block_q4_0 ... block_q6_K). This decodes the raw block bytes with whole-tensor torch ops, so a CUDA
load decodes on the GPU instead of in numpy on one CPU core; the arithmetic follows the `gguf`
package's reference (`gguf.quants`) step for step, so float32 results match it bit for bit.

    raw = torch.from_numpy(reader_tensor.data.view(np.uint8)).to("cuda")   # (rows, bytes_per_row)
    w = dequantize_blocks(raw, GGMLQuantizationType.Q4_K, (4096, 4096))     # float32 on cuda
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

QK_K = 256  # elements per K-quant super-block

# type -> (elements per block, bytes per block): ggml's block layouts
BLOCK_LAYOUT = {
    T.F32: (1, 4), T.F16: (1, 2), T.BF16: (1, 2),
    T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.Q8_0: (32, 34),
    T.Q2_K: (QK_K, 84), T.Q3_K: (QK_K, 110), T.Q4_K: (QK_K, 144), T.Q5_K: (QK_K, 176), T.Q6_K: (QK_K, 210),
}
SUPPORTED_TYPES = tuple(BLOCK_LAYOUT)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian bytes -> (n, 1) float32 from fp16."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values, like: torch.Tensor, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _nibbles(qs: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """Low then high nibbles of `group`-byte runs: (n, m*group) -> (n, m, 2, group)."""
    return (qs.reshape(n, -1, 1, group) >> _shifts([0, 4], qs, (1, 1, 2, 1))) & 0x0F


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j first."""
    return ((qh.reshape(n, 4, 1) >> _shifts(range(8), qh, (1, 1, 8))) & 1).reshape(n, 32)


def _q4_0(b: torch.Tensor, n: int) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], n, 16).reshape(n, 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor, n: int) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], n, 16).reshape(n, 32).float()
    return d * q + m


def _q5_0(b: torch.Tensor, n: int) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:], n, 16).reshape(n, 32) | (_bits(b[:, 2:6], n) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor, n: int) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:], n, 16).reshape(n, 32) | (_bits(b[:, 4:8], n) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor, n: int) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _q2_k(b: torch.Tensor, n: int) -> torch.Tensor:
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], qs, (1, 1, 4, 1))) & 3  # (n, 2, 4, 32)
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor, n: int) -> torch.Tensor:
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low nibbles in bytes 0..7 (two per byte), high 2 bits in bytes 8..11 (four per byte)
    low = (packed[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], b, (1, 2, 1))).reshape(n, 16) & 0x0F
    high = (packed[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], b, (1, 4, 1))).reshape(n, 16) & 3
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b, (1, 1, 4, 1))) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), b, (1, 1, 8, 1))) & 1).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # the high bit *clear* subtracts 4
    return (dl * q.float()).reshape(n, QK_K)


def _k_scale_min(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8)."""
    rows = packed.reshape(n, 3, 4)
    d, m, md = rows[:, 0], rows[:, 1], rows[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mins


def _q4_k(b: torch.Tensor, n: int) -> torch.Tensor:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mins = _k_scale_min(b[:, 4:16], n)
    dl, ml = (d * sc.float()).reshape(n, 8, 1), (dmin * mins.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], n, 32).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor, n: int) -> torch.Tensor:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mins = _k_scale_min(b[:, 4:16], n)
    dl, ml = (d * sc.float()).reshape(n, 8, 1), (dmin * mins.float()).reshape(n, 8, 1)
    qh = b[:, 16:48]
    high = ((qh.reshape(n, 1, 1, 32) >> _shifts(range(8), b, (1, 1, 8, 1))) & 1).reshape(n, 8, 32)
    q = _nibbles(b[:, 48:], n, 32).reshape(n, 8, 32) | (high << 4)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor, n: int) -> torch.Tensor:
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, n, 64).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b, (1, 1, 4, 1))) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return (dl * q.float()).reshape(n, QK_K)


_DECODERS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def dequantize_blocks(raw: torch.Tensor, qtype: T, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode `raw` (uint8 block bytes, any shape, on any device) of type `qtype` into `shape`, in `dtype`.

    Raises NotImplementedError for types outside SUPPORTED_TYPES and ValueError when the byte count
    does not match the shape."""
    if qtype not in BLOCK_LAYOUT:
        raise NotImplementedError(f"no torch dequantizer for {qtype.name}")
    block_elems, block_bytes = BLOCK_LAYOUT[qtype]
    n_elems = 1
    for s in shape:
        n_elems *= s
    if n_elems % block_elems or raw.numel() != n_elems // block_elems * block_bytes:
        raise ValueError(f"{raw.numel()} bytes do not hold a {qtype.name} tensor of shape {tuple(shape)}")
    flat = raw.reshape(-1)
    if qtype == T.F32:
        out = flat.view(torch.float32)
    elif qtype == T.F16:
        out = flat.view(torch.float16)
    elif qtype == T.BF16:
        out = flat.view(torch.bfloat16)
    else:
        n_blocks = n_elems // block_elems
        out = _DECODERS[qtype](flat.reshape(n_blocks, block_bytes), n_blocks)
    view = out.dtype == dtype and qtype in (T.F32, T.F16, T.BF16)  # `to` would return the input's own bytes
    out = out.to(dtype).reshape(shape)
    return out.clone() if view else out  # never hand out a view of the input bytes
