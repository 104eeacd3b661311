"""Triton kernels with their torch references, installed as `edgectx.kernels`, and the dispatch to them.

- `decode_attention`: one decode query per head over the selected context, split along its length
  (flash-decoding), GQA inside, optional in-kernel RoPE of pre-RoPE keys, per-head validity.
- `block_scoring`: retrieval scores of a query chunk against every block's representative key.
- `reference`: the torch oracles both are tested against (no Triton needed).
- `gguf_matmul`: products and dequantization that read GGUF blocks (Q4_0..Q8_0, Q4_K, Q5_K, Q6_K) directly;
  its oracle is edgectx.quant.gguf_dequant, and edgectx.quant.gguf_cuda builds the linear layer on it.

The engine calls `available(device)` and, when true, `decode(...)`; otherwise it keeps its torch path.
Importing this package never imports Triton: the kernel modules load on first use. Kernels run on CUDA
tensors; tests run them on the CPU through Triton's interpreter (TRITON_INTERPRET=1 set before the kernel
modules are imported) inside `forced()`. EDGECTX_KERNELS=0 turns them off (to compare against torch).

    if kernels.available(q.device):
        out = kernels.decode(q_rot, k_rot, v, valid=valid)   # (n_heads, 1, d)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import cache
from typing import Iterator

import torch

_forced = False


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """Whether the engine should run its kernels on `device`: CUDA with Triton installed (or inside `forced()`)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not (_forced or kind == "cuda"):
        return False  # the CPU decode path, first and cheapest: it runs per layer and token
    return os.environ.get("EDGECTX_KERNELS", "1") != "0" and has_triton()


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Take the kernel path on any device, for tests: on a CPU the kernels must have been imported with
    TRITON_INTERPRET=1, or Triton will look for a GPU."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """`decode_attention.decode_attention`, imported on first use."""
    from edgectx.kernels.decode_attention import decode_attention

    return decode_attention(q, k, v, **options)
