"""Weight and KV quantization for edgectx, installed as `edgectx.quant`.

Quantization swaps modules (an `nn.Linear` becomes a packed or quantized linear); the model code has
no quantization branches. `linear_factory(device, dtype, weights="auto")` picks the linear for a device and weight format
(edgectx.quant.formats.WEIGHT_FORMATS; nf4 and int8 through bitsandbytes, auto = nf4 on CUDA for models past ~1B parameters when it is installed):

    from edgectx.quant.linear import linear_factory
    make_linear = linear_factory(torch.device("cpu"), torch.float32)
    layer = make_linear(weight, bias)  # fbgemm fp16-packed on x86 CPUs, nn.Linear elsewhere

`gguf_dequant.dequantize_blocks(raw, qtype, shape)` decodes GGUF block bytes on their device.
"""
