"""Weight and KV quantization for edgectx, installed as `edgectx.quant`.

Quantization swaps modules (an `nn.Linear` becomes a packed or quantized linear); the model code has
no quantization branches. `linear_factory(device, dtype, weights="auto")` picks the linear for a device and weight format
(auto | fp16 | nf4 | int8; nf4 and int8 through bitsandbytes, auto = nf4 on CUDA when it is installed):

    make_linear = linear_factory(torch.device("cpu"), torch.float32)
    layer = make_linear(weight, bias)  # fbgemm fp16-packed on x86 CPUs, nn.Linear elsewhere

`gguf_dequant.dequantize_blocks(raw, qtype, shape)` decodes GGUF block bytes on their device.
"""

from edgectx.quant.linear import WEIGHT_FORMATS, PackedFp16Linear, fp16_packing_available, linear_factory, resolve_weights

__all__ = ["WEIGHT_FORMATS", "PackedFp16Linear", "fp16_packing_available", "linear_factory", "resolve_weights"]
