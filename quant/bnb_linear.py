"""4-bit (NF4) and 8-bit (LLM.int8) linear layers through bitsandbytes, built one weight at a time.

QLoRA's NF4 stores each weight in 4 bits with a float32 absmax per 64 weights: about 0.56 bytes per weight
against 2 for fp16, which is what lets an 8B model and a long context share a 24 GB GPU. The absmax is not
double-quantized (`compress_statistics=False`): that saves 0.05 bytes per weight (0.4 GiB on an 8B model) but
adds three kernel launches per linear and token to dequantize the absmax first, and eager decode is
launch-bound. LLM.int8 keeps 1 byte per weight with row-wise scales. Both quantize as each layer is built,
on the device the weight is on, so a float weight lives only as long as one layer's load. bitsandbytes is
optional: asking for nf4/int8 without it is one sentence naming the fix.

    make = bnb_linear_factory("nf4", torch.device("cuda"), torch.bfloat16)
    layer = make(weight, None)  # bnb.nn.Linear4bit, compute in bfloat16
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from edgectx.errors import UsageError

BNB_FORMATS = ("nf4", "int8")


def import_bnb():
    """bitsandbytes, or a UsageError saying how to get it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("4-bit and 8-bit weights need bitsandbytes, which is not installed: "
                         "`pip install bitsandbytes`, or use --weights fp16.") from None
    except Exception as e:  # a broken CUDA setup makes its import raise other errors
        raise UsageError(f"bitsandbytes failed to load ({type(e).__name__}: {e}); "
                         "reinstall it with `pip install -U bitsandbytes`, or use --weights fp16.") from None
    return bitsandbytes


def bnb_available() -> bool:
    try:
        import_bnb()
    except UsageError:
        return False
    return True


class _QuietCast(logging.Filter):
    """LLM.int8 runs its matmul in fp16 and logs so on every float32 call; that is by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def bnb_linear_factory(kind: str, device: torch.device, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor | None], nn.Module]:
    """A factory turning (weight (out, in), bias) into a bitsandbytes linear on `device`, computing in `dtype`."""
    if kind not in BNB_FORMATS:
        raise ValueError(f"bitsandbytes formats are {BNB_FORMATS}, not {kind!r}")
    bnb = import_bnb()
    if kind == "int8":
        logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _QuietCast) for f in logger.filters):
            logger.addFilter(_QuietCast())

    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        out_features, in_features = weight.shape
        w = weight.to(dtype)  # on the weight's device: quantization then runs where the weight already is
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                      quant_type="nf4", compress_statistics=False, device="meta")
            # quantized by layer.to(device) below: Params4bit.to quantizes from any device
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=False)
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                        device="meta")
            layer.weight = int8_params(bnb, w)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer.to(device)

    return make


def int8_params(bnb, weight: torch.Tensor) -> nn.Parameter:
    """LLM.int8 weights quantized now, on the weight's device: int8 rows (CB) and one scale per row (SCB).
    bitsandbytes 0.50's `Int8Params.to()` quantizes only a weight coming from the CPU, so a weight already on
    the GPU would keep its 16-bit matrix until its first forward (a load peaking at the model's 16-bit size)."""
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    param = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False)
    param.CB, param.SCB = codes, scales
    return param


def linear_weight_bytes(layer: nn.Module) -> int:
    """Bytes a linear layer keeps for its weight: packed codes plus their scales (bitsandbytes), or the matrix."""
    if hasattr(layer, "weight_bytes"):  # PackedFp16Linear
        return layer.weight_bytes
    weight = layer.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:  # NF4: absmax per block, itself quantized with its own absmax and code
        total += _state_bytes(state)
    scales = getattr(weight, "SCB", None)
    if scales is not None:  # int8: one scale per row
        total += scales.numel() * scales.element_size()
    return total


def _state_bytes(state) -> int:
    tensors = [state.absmax, state.code]
    nested = getattr(state, "state2", None)  # bitsandbytes 0.50.2 sets state2 and offset only when nested
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    if getattr(state, "offset", None) is not None:
        tensors.append(state.offset)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
