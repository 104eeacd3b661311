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

Triton importing is not Triton working: its first launch builds a C launcher, which needs a C compiler and
the Python headers, and a machine without them fails there. `available` therefore runs one tiny launch per
device first (`_probe`) and says no, with one warning, if it fails; a launch failing later (`decode`) falls
back to the torch reference for that call and turns the kernels off for the process, with the same warning.

    if kernels.available(q.device):
        out = kernels.decode(q_rot, k_rot, v, valid=valid)   # (n_heads, 1, d)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from functools import cache
from typing import Iterator

import torch

log = logging.getLogger(__name__)
_forced = False
_probed: set[str] = set()  # devices where one tiny launch ran
_broken: dict[str, str] = {}  # device -> why its kernels failed (a probe or a launch): they stay off there


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """Whether the engine should run its kernels on `device`: CUDA with Triton installed (or inside `forced()`)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not (_forced or kind == "cuda"):
        return False  # the CPU decode path, first and cheapest: it runs per layer and token
    if os.environ.get("EDGECTX_KERNELS", "1") == "0" or not has_triton():
        return False
    return _probe(_key(device))


def _key(device: torch.device | str) -> str:
    """One name per device: "cuda" and the "cuda:0" its tensors report are the same GPU, and must share one
    probe and one off switch."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(device)


def _probe(device: str) -> bool:
    """Whether one tiny launch of the decode kernel ran on `device` (tried once per device and process)."""
    if device in _broken:
        return False
    if device not in _probed:
        try:
            _tiny_launch(torch.device(device))
        except Exception as e:  # noqa: BLE001 - whatever the toolchain raises: no C compiler, no Python.h, no driver
            _disable(device, e)
            return False
        _probed.add(device)
    return True


def _tiny_launch(device: torch.device) -> None:
    """One decode over two keys, checked against the reference: compiles and runs the C launcher."""
    from edgectx.kernels.decode_attention import decode_attention
    from edgectx.kernels.reference import decode_attention_reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device) for shape in ((16, 1, 16), (1, 2, 16), (1, 2, 16)))
    out = decode_attention(q, k, v)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.allclose(out, decode_attention_reference(q, k, v), atol=1e-4):
        raise RuntimeError("the decode kernel's output differs from its torch reference")


def _disable(device: str, error: BaseException) -> None:
    _broken[device] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    log.warning("Triton kernels cannot run on %s (%s); attention falls back to PyTorch. Triton builds its launcher "
                "with a C compiler and the Python headers: install gcc and python3-dev if they are missing.",
                device, _broken[device])


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
    """`decode_attention.decode_attention`, imported on first use; if a launch fails (a shape class compiling for
    the first time on a broken toolchain), the torch reference answers and the kernels stay off on that device."""
    from edgectx.kernels.decode_attention import decode_attention

    try:
        return decode_attention(q, k, v, **options)
    except (ValueError, torch.OutOfMemoryError):  # the caller's shapes, or memory: not the toolchain
        raise
    except Exception as e:  # noqa: BLE001
        _disable(_key(q.device), e)
    from edgectx.kernels.reference import decode_attention_reference

    return decode_attention_reference(q, k, v, **{k: v for k, v in options.items() if k not in ("n_splits", "block_n")})
