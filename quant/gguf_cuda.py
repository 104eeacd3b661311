"""A linear layer over GGUF blocks on CUDA: the file's own quantization, read by Triton kernels (edgectx.kernels).

The weight is `parts`, a list of QuantizedMatrix on the same input (one for a plain linear; Q/K/V or gate/up
fused, possibly of different types: Q4_K_M keeps V in Q6_K); outputs are concatenated in order. Two paths:

- decode, up to DECODE_MAX_TOKENS rows of x: `gguf_matvec` decodes the blocks in registers and accumulates in
  float32, each part writing its column slice of the one output. A step reads the blocks once (4.5 bits per
  weight for Q4_K instead of 16).
- prefill, longer x: `gguf_dequantize` writes a row chunk of the weight in x's dtype into a scratch buffer
  shared by every layer, and cuBLAS multiplies it (compute-bound at these sizes, where a fused Triton GEMM
  would gain little and need tuning per GPU). Chunks are at most `DequantScratch.max_bytes` (default 128 MiB,
  the buffer's whole cost), so an 8B model's fused gate/up (28672 x 4096) runs as two products.

Types without a kernel (Q2_K, Q3_K, F16, BF16, F32 parts) are dequantized once at construction to `dtype`
and multiplied as an nn.Linear would; `weight_bytes` counts them at that size. The scratch is reused
without synchronisation: the layers must run on one CUDA stream.

    layer = TritonGgufLinear([q.to("cuda"), k.to("cuda"), v.to("cuda")], bias=None, dtype=torch.bfloat16)
    y = layer(x)  # x (T, in) bf16 -> (T, q.rows + k.rows + v.rows) bf16
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from edgectx.kernels.gguf_matmul import gguf_dequantize, gguf_matvec, supports
from edgectx.quant.blocks import QuantizedMatrix


class DequantScratch:
    """One growable flat buffer per (device, dtype) that prefill dequantizes weights into, capped at max_bytes."""

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes = max_bytes
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def rows_per_chunk(self, cols: int, dtype: torch.dtype) -> int:
        return max(1, self.max_bytes // (cols * dtype.itemsize))

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A (rows, cols) view of the buffer, grown when too small; its contents are whatever was left there."""
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < rows * cols:
            self._buffers.pop(key, None)  # free the old one before allocating the larger
            buffer = self._buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buffer[: rows * cols].view(rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        self._buffers.clear()


SHARED_SCRATCH = DequantScratch()


@dataclass(frozen=True)
class _Part:
    buffer: str  # the module buffer holding its raw blocks (kernel) or dense weight (fallback)
    qtype: int  # ggml type id
    rows: int
    col: int  # its first output column
    kernel: bool


@dataclass(frozen=True)
class _Piece:
    """Rows r0:r1 of a kernel part, dequantized to rows at + (0..r1-r0) of a prefill chunk."""

    part: _Part
    r0: int
    r1: int
    at: int


_layers_by_handle: weakref.WeakValueDictionary[int, "TritonGgufLinear"] = weakref.WeakValueDictionary()
_next_handle = itertools.count()
_lib = torch.library.Library("edgectx", "FRAGMENT")
_lib.define("linear_gguf_triton(Tensor x, int handle, int out_features) -> Tensor")


def _call_op(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _layers_by_handle[handle].run(x)


# CPU: only for tests under Triton's interpreter
torch.library.impl(_lib, "linear_gguf_triton", "CUDA")(_call_op)
torch.library.impl(_lib, "linear_gguf_triton", "CPU")(_call_op)


@torch.library.register_fake("edgectx::linear_gguf_triton", lib=_lib)
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class TritonGgufLinear(nn.Module):
    """y = x @ W.T (+ bias) for W the row-stack of `parts` kept in their GGUF blocks; see the module docstring.

    `dtype`: what fallback parts are dequantized to (default: the bias's dtype, else float16); kernel parts
    compute in whatever dtype x has. `scratch`: the prefill buffer (default SHARED_SCRATCH)."""

    DECODE_MAX_TOKENS = 16  # past this many rows of x, dequantize + cuBLAS beats decoding the blocks per token

    def __init__(self, parts: list[QuantizedMatrix], bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, scratch: DequantScratch | None = None):
        super().__init__()
        if not parts or any(p.cols != parts[0].cols for p in parts):
            raise ValueError("the parts of a fused linear need the same column count")
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias {tuple(bias.shape)} does not match {self.out_features} output features")
        dtype = dtype or (bias.dtype if bias is not None else torch.float16)
        self.scratch = scratch or SHARED_SCRATCH
        self.qtypes = tuple(p.qtype.name for p in parts)
        self._parts: list[_Part] = []
        col = 0
        for i, p in enumerate(parts):
            kernel = supports(p.qtype)
            name = f"raw{i}" if kernel else f"dense{i}"
            self.register_buffer(name, p.raw if kernel else p.dequantize(dtype), persistent=False)
            self._parts.append(_Part(name, int(p.qtype), p.rows, col, kernel))
            col += p.rows
        self.register_buffer("bias", None if bias is None else bias.contiguous(), persistent=False)
        self.weight_bytes = sum(getattr(self, part.buffer).nbytes for part in self._parts) + \
            (0 if bias is None else bias.nbytes)
        self._plans: dict[int, list[tuple[int, int, list[_Piece]]]] = {}
        self._handle = next(_next_handle)
        _layers_by_handle[self._handle] = self  # a weak entry: the op finds the layer while it lives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # an opaque op: dynamo does not trace the kernel launches
            return torch.ops.edgectx.linear_gguf_triton(x, self._handle, self.out_features)
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(x.shape[0], self.out_features, device=x.device, dtype=x.dtype)
        if x.shape[0] <= self.DECODE_MAX_TOKENS:
            for part in self._parts:
                if part.kernel:
                    gguf_matvec(x, getattr(self, part.buffer), part.qtype, part.rows, self.in_features,
                                out=out[:, part.col:part.col + part.rows])
        else:
            self._prefill(x, out)
        for part in self._parts:
            if not part.kernel:
                out[:, part.col:part.col + part.rows] = x @ getattr(self, part.buffer).to(x.dtype).t()
        if self.bias is not None:
            out += self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def _prefill(self, x: torch.Tensor, out: torch.Tensor) -> None:
        max_rows = self.scratch.rows_per_chunk(self.in_features, x.dtype)
        for col, n_rows, pieces in self._plan(max_rows):
            w = self.scratch.get(n_rows, self.in_features, x.dtype, x.device)  # (n_rows, in)
            for piece in pieces:
                part = piece.part
                gguf_dequantize(getattr(self, part.buffer)[piece.r0:piece.r1], part.qtype, piece.r1 - piece.r0,
                                self.in_features, out=w[piece.at:piece.at + piece.r1 - piece.r0])
            if n_rows == self.out_features:
                torch.mm(x, w.t(), out=out)
            else:
                out[:, col:col + n_rows] = x @ w.t()

    def _plan(self, max_rows: int) -> list[tuple[int, int, list[_Piece]]]:
        """Chunks (first output column, rows, pieces) of at most max_rows rows over runs of adjacent kernel parts."""
        plan = self._plans.get(max_rows)
        if plan is not None:
            return plan
        plan = []
        open_chunk: tuple[int, int, list[_Piece]] | None = None
        for part in self._parts:
            if not part.kernel:
                open_chunk = None  # a fallback part breaks the run of contiguous output columns
                continue
            r0 = 0
            while r0 < part.rows:
                if open_chunk is None or open_chunk[1] == max_rows:
                    open_chunk = (part.col + r0, 0, [])
                    plan.append(open_chunk)
                col, n_rows, pieces = open_chunk
                r1 = min(part.rows, r0 + max_rows - n_rows)
                pieces.append(_Piece(part, r0, r1, n_rows))
                open_chunk = (col, n_rows + r1 - r0, pieces)
                plan[-1] = open_chunk
                r0 = r1
        self._plans[max_rows] = plan
        return plan

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf {'+'.join(self.qtypes)} (Triton)"
