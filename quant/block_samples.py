"""Random but valid GGUF block matrices, for kernel tests and benchmarks.

numpy's quantizer in the `gguf` package covers the 32-element types only, and a kernel must match the reference
decoder on any bytes anyway: every byte is drawn at random except the fp16 scale fields, which get finite values
of a sane size (so the matrix decodes to finite weights of order `scale` * the largest quant).

    m = random_matrix(GGMLQuantizationType.Q4_K, 14336, 4096, device="cuda")
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.gguf_dequant import BLOCK_LAYOUT

# byte offsets of each block's fp16 fields (d, and dmin / m where the type has one): ggml-common.h
FP16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}


def random_matrix(qtype: T, rows: int, cols: int, *, scale: float = 1e-2, seed: int = 0,
                  device: torch.device | str = "cpu") -> QuantizedMatrix:
    """A rows x cols matrix of `qtype` blocks: random quant bytes, fp16 fields uniform in +-[scale/10, scale]."""
    if qtype not in FP16_FIELDS:
        raise ValueError(f"no block sampler for {qtype.name}")
    block_elems, block_bytes = BLOCK_LAYOUT[qtype]
    if cols % block_elems:
        raise ValueError(f"{qtype.name} rows hold whole blocks of {block_elems}, not {cols} columns")
    n_blocks = cols // block_elems
    g = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(0, 256, (rows, n_blocks, block_bytes), generator=g, device=device, dtype=torch.uint8)
    for offset in FP16_FIELDS[qtype]:
        size = torch.rand(rows, n_blocks, generator=g, device=device) * 0.9 * scale + 0.1 * scale
        sign = torch.randint(0, 2, (rows, n_blocks), generator=g, device=device) * 2 - 1
        raw[:, :, offset:offset + 2] = (size * sign).half().view(torch.uint8).reshape(rows, n_blocks, 2)
    return QuantizedMatrix(raw.reshape(rows, n_blocks * block_bytes), qtype, rows, cols)
