"""Linear layers that read fewer weight bytes per token on the CPU.

Decoding one token reads every weight once, so CPU decode speed is memory bandwidth divided by weight
bytes. FBGEMM's fp16-packed GEMM (shipped in x86 builds of PyTorch) stores weights in fp16 and
computes in fp32: half the bytes of float32 and, on AVX2 machines without native bf16, the fastest
matrix-vector product PyTorch offers (measured: 6.7 vs 3.0 Gparam/s for float32 on 2 cores).
A GGUF Q4/Q8 weight dequantized to fp16 keeps its values to fp16 rounding (relative 5e-4).

    layer = PackedFp16Linear(weight, bias)  # weight (out, in) float32
    y = layer(x)                            # x (T, in) float32 -> (T, out) float32

Under `torch.compile` the layer calls the custom op `edgectx::linear_fp16` instead: dynamo cannot trace
the packed weights (a TorchScript object), so the op finds them by an integer handle.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
from torch import nn

from edgectx.errors import UsageError
from edgectx.quant.formats import WEIGHT_FORMATS

_packed_by_handle: dict[int, torch.ScriptObject] = {}
_next_handle = itertools.count()

# A plain Library op, not @custom_op: its per-call checks cost 12 us against 5 here, 121 calls a token.
_lib = torch.library.Library("edgectx", "DEF")
_lib.define("linear_fp16(Tensor x, int handle, int out_features) -> Tensor")


@torch.library.impl(_lib, "linear_fp16", "CPU")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16.default(x, _packed_by_handle[handle])


@torch.library.register_fake("edgectx::linear_fp16", lib=_lib)
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def fp16_packing_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic_fp16")


class PackedFp16Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_bytes = weight.numel() * 2
        bias = None if bias is None else bias.float().contiguous()
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), bias)
        self._handle = next(_next_handle)
        _packed_by_handle[self._handle] = self._packed
        weakref.finalize(self, _packed_by_handle.pop, self._handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.edgectx.linear_fp16(x, self._handle, self.out_features)
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16-packed"


# "auto" quantizes to nf4 only models whose 16-bit weights pass this size (about 1B parameters): below it
# 4 bits save little memory and cost a lot of quality (SmolLM2-135M: top-1 vs fp16 falls to 0.73).
AUTO_NF4_MIN_BYTES = 2 << 30


def block_kernels_available(device: torch.device) -> bool:
    """Whether `device` has products that read GGUF blocks: ggml's on the CPU, edgectx's Triton kernels on CUDA."""
    if device.type == "cpu":
        from edgectx.quant.ggml_cpu import ggml_available

        return ggml_available()
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            from edgectx.quant.gguf_cuda import TritonGgufLinear  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def resolve_weights(device: torch.device, weights: str = "auto", fp16_bytes: int | None = None, blocks: bool = False) -> str:
    """The concrete format for `weights` on `device`. `blocks`: the model is a GGUF file whose weights are in
    quantized blocks; "auto" then keeps them ("gguf": the file's quantization is the model) wherever the device
    has kernels for them (nf4 is then an option, never the default: a second rounding on top of the file's).
    Otherwise "auto" is nf4 on CUDA with bitsandbytes for models whose 16-bit weights (`fp16_bytes`) pass
    AUTO_NF4_MIN_BYTES, else fp16 (fp16-packed on x86 CPUs, nn.Linear in the compute dtype on GPUs). A size not
    given counts as small: 4 bits are a choice made for a model known to need them, not a guess. Asking for nf4 or int8 without bitsandbytes, or gguf for a model that is not a GGUF
    file or on a device without the kernels, raises its one-sentence UsageError here, before anything loads."""
    if weights not in WEIGHT_FORMATS:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}.")
    from edgectx.quant.bnb_linear import bnb_available, import_bnb

    if weights in ("nf4", "int8"):
        import_bnb()
    if weights == "gguf":
        if not blocks:
            raise UsageError("--weights gguf keeps a GGUF file's own quantization, and this model is not a GGUF file: "
                             "use auto, fp16, nf4 or int8.")
        if not block_kernels_available(device):
            raise UsageError(f"--weights gguf needs {'ggml (from llama-cpp-python)' if device.type == 'cpu' else 'Triton'} "
                             f"on {device.type}, which is not installed here: use --weights fp16.")
    if weights != "auto":
        return weights
    if blocks and block_kernels_available(device):
        return "gguf"
    big = fp16_bytes is not None and fp16_bytes >= AUTO_NF4_MIN_BYTES
    return "nf4" if device.type == "cuda" and big and bnb_available() else "fp16"


def block_linear_factory(device: torch.device, dtype: torch.dtype) -> Callable[[list, torch.Tensor | None], nn.Module]:
    """The linear over GGUF blocks (`parts`: a list of QuantizedMatrix, outputs concatenated) for `device`."""
    if device.type == "cuda":
        from edgectx.quant.gguf_cuda import TritonGgufLinear

        def make_cuda(parts: list, bias: torch.Tensor | None) -> nn.Module:
            return TritonGgufLinear([p.to(device) for p in parts], None if bias is None else bias.to(device, dtype), dtype=dtype)

        return make_cuda
    from edgectx.quant.ggml_cpu import GgmlLinear

    return GgmlLinear


def linear_factory(device: torch.device, dtype: torch.dtype,
                   weights: str = "auto") -> Callable[[torch.Tensor, torch.Tensor | None], nn.Module]:
    """The linear to build for `device` and `weights` (auto | fp16 | nf4 | int8): bitsandbytes Linear4bit /
    Linear8bitLt for nf4 / int8, else fp16-packed on CPUs with FBGEMM, else nn.Linear in `dtype`."""
    kind = resolve_weights(device, weights, blocks=weights == "gguf")
    if kind == "gguf":
        return block_linear_factory(device, dtype)
    if kind in ("nf4", "int8"):
        from edgectx.quant.bnb_linear import bnb_linear_factory

        return bnb_linear_factory(kind, device, dtype)
    if device.type == "cpu" and dtype == torch.float32 and fp16_packing_available():
        return PackedFp16Linear
    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        with torch.device("meta"):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return linear

    return make


def linear_factories(device: torch.device, dtype: torch.dtype, weights: str = "auto") -> tuple[Callable, Callable]:
    """(make_linear, make_head): the output projection stays 16-bit under nf4/int8, as transformers'
    bitsandbytes loading does, since its logits are the sampled distribution itself."""
    kind = resolve_weights(device, weights, blocks=weights == "gguf")
    make_linear = linear_factory(device, dtype, kind)
    return make_linear, make_linear if kind in ("fp16", "gguf") else linear_factory(device, dtype, "fp16")
