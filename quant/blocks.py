"""A weight matrix kept in its GGUF blocks: the raw bytes, the ggml type and the logical shape.

A GGUF file quantizes each row of a weight independently (blocks run along the input dimension), so rows
can be reordered, selected or stacked without touching a block: the Q/K row permutation of llama files and
the fusion of Q/K/V and gate/up are lossless on the raw bytes. Matrices of different types (Q4_K_M files
keep V and down in Q6_K) stay separate parts of one fused linear.

    m = QuantizedMatrix(raw, GGMLQuantizationType.Q4_K, rows=2048, cols=2048)  # raw: uint8 (rows, row_bytes)
    m.take_rows(index)          # a row permutation, still Q4_K
    m.dequantize(torch.float16) # the reference path: (rows, cols)
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from gguf import GGMLQuantizationType as T

from edgectx.quant.gguf_dequant import BLOCK_LAYOUT, dequantize_blocks


@dataclass(frozen=True)
class QuantizedMatrix:
    raw: torch.Tensor  # uint8, (rows, row_bytes), contiguous; may be a view of a read-only memory map
    qtype: T
    rows: int
    cols: int

    def __post_init__(self) -> None:
        block_elems, block_bytes = BLOCK_LAYOUT[self.qtype]
        if self.cols % block_elems or tuple(self.raw.shape) != (self.rows, self.cols // block_elems * block_bytes):
            raise ValueError(f"{tuple(self.raw.shape)} bytes do not hold a {self.qtype.name} matrix of {self.rows}x{self.cols}")

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def take_rows(self, index: torch.Tensor) -> "QuantizedMatrix":
        return QuantizedMatrix(self.raw[index].contiguous(), self.qtype, len(index), self.cols)

    def to(self, device: torch.device) -> "QuantizedMatrix":
        return QuantizedMatrix(self.raw.to(device), self.qtype, self.rows, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.raw, self.qtype, (self.rows, self.cols), dtype)


def stacked_rows(parts: list[QuantizedMatrix]) -> int:
    return sum(p.rows for p in parts)


_embedding_by_handle: dict[int, "QuantizedEmbedding"] = {}
_next_handle = itertools.count()

# An opaque op under torch.compile: traced, the table's byte shape would join the dynamic sizes of the graph.
_lib = torch.library.Library("edgectx", "FRAGMENT")
_lib.define("embed_blocks(Tensor tokens, int handle, int dim) -> Tensor")


@torch.library.impl(_lib, "embed_blocks", "CompositeExplicitAutograd")
def _(tokens: torch.Tensor, handle: int, dim: int) -> torch.Tensor:
    return _embedding_by_handle[handle].lookup(tokens)


@torch.library.register_fake("edgectx::embed_blocks", lib=_lib)
def _(tokens: torch.Tensor, handle: int, dim: int) -> torch.Tensor:
    return tokens.new_empty(*tokens.shape, dim, dtype=_embedding_by_handle[handle].dtype)


ROW_CACHE_BYTES = 8 << 20  # dequantized embedding rows kept for one-token lookups


class QuantizedEmbedding(nn.Module):
    """A token embedding kept in its GGUF blocks: a lookup dequantizes just the rows it reads (in `dtype`).
    A tied output projection reads the same `matrix`."""

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.matrix, self.dtype = matrix, dtype
        self.num_embeddings, self.embedding_dim = matrix.rows, matrix.cols
        self.weight_bytes = matrix.nbytes
        self.raw_tensors = [matrix.raw]
        self._rows: dict[int, torch.Tensor] = {}  # one-token lookups, dequantized (`_row`)
        self._handle = next(_next_handle)
        _embedding_by_handle[self._handle] = self
        weakref.finalize(self, _embedding_by_handle.pop, self._handle, None)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() == 1 and tokens.device.type == "cpu" and self.matrix.raw.device.type == "cpu":
            return self._row(int(tokens.reshape(-1)[0])).clone().reshape(*tokens.shape, self.matrix.cols)
        rows = self.matrix.raw[tokens.reshape(-1).to(self.matrix.raw.device)]
        out = dequantize_blocks(rows, self.matrix.qtype, (rows.shape[0], self.matrix.cols), self.dtype)
        return out.reshape(*tokens.shape, self.matrix.cols)

    def _row(self, token: int) -> torch.Tensor:
        """One token's row, dequantized once and kept (the newest ROW_CACHE_BYTES' worth): a decode step's lookup
        dequantized it again each time, 0.15 ms on the caches a step leaves."""
        row = self._rows.get(token)
        if row is None:
            raw = self.matrix.raw[token : token + 1]
            row = dequantize_blocks(raw, self.matrix.qtype, (1, self.matrix.cols), self.dtype)
            if len(self._rows) >= max(1, ROW_CACHE_BYTES // (self.matrix.cols * row.element_size())):
                self._rows.pop(next(iter(self._rows)))
            self._rows[token] = row
        return row

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.edgectx.embed_blocks(tokens, self._handle, self.embedding_dim)
        return self.lookup(tokens)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.matrix.qtype.name} blocks"
