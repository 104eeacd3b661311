"""Weight and KV quantization for edgectx, installed as `edgectx.quant`.

Quantization swaps modules (an `nn.Linear` becomes a packed or quantized linear); the model code has
no quantization branches. `linear_factory(device, dtype)` picks the best linear for a device:

    make_linear = linear_factory(torch.device("cpu"), torch.float32)
    layer = make_linear(weight, bias)  # fbgemm fp16-packed on x86 CPUs, nn.Linear elsewhere

`gguf_dequant.dequantize_blocks(raw, qtype, shape)` decodes GGUF block bytes on their device.
"""

from edgectx.quant.linear import PackedFp16Linear, fp16_packing_available, linear_factory

__all__ = ["PackedFp16Linear", "fp16_packing_available", "linear_factory"]
