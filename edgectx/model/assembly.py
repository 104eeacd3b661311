"""Fill a `Transformer` with loaded weights, layer by layer: what the GGUF and the Hugging Face loaders share.

A loader reads its format's tensors into the model's fused layout (wqkv, w_gate_up; float32, on the load
device) and hands them here; the linears are built by `edgectx.quant.linear_factories` for the device and
weight format (fp16-packed on x86 CPUs, bitsandbytes nf4/int8 on request), the output projection 16-bit.
Peak memory: the model plus one layer of float32 weights.

    model = assemble_model(spec, device, dtype, embed, norm, head=None, layer_weights=read_layer)
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from edgectx.errors import ModelFileError
from edgectx.model.transformer import Transformer
from edgectx.quant.blocks import QuantizedEmbedding, QuantizedMatrix
from edgectx.quant.linear import linear_factories
from edgectx.model.spec import ModelSpec

LinearFactory = Callable[[torch.Tensor, "torch.Tensor | None"], nn.Module]


Matrix = Union[torch.Tensor, list[QuantizedMatrix]]  # float32, or GGUF blocks (the parts of a fused linear)


@dataclass
class LayerWeights:
    """One layer's weights in the model's fused layout: float32 on the load device, or (weights "gguf") the
    linears as lists of GGUF block matrices whose rows stack in this order."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: Matrix  # Q, K, V rows, Hugging Face's (half-split RoPE) layout
    wo: Matrix
    w_gate_up: Matrix  # gate rows, then up
    w_down: Matrix
    bqkv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # (head_dim,) qwen3's per-head Q and K norms
    k_norm: torch.Tensor | None = None


def matrix_shape(m: Matrix) -> tuple[int, int]:
    if isinstance(m, torch.Tensor):
        return tuple(m.shape)
    return sum(p.rows for p in m), m[0].cols


def assemble_model(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    embed: torch.Tensor | QuantizedMatrix,
    norm: torch.Tensor,
    head: Callable[[], Matrix] | None,
    layer_weights: Callable[[int], LayerWeights],
    make_linear: LinearFactory | None = None,
    weights: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    origin: tuple[Path, str] = (Path("model"), "the model's settings"),
) -> Transformer:
    """`head()` reads the untied output projection (None: tied to `embed`); `layer_weights(i)` reads layer i.
    `origin` (the file, where its shapes come from) names a layer whose shapes disagree with `spec`."""
    make_linear, make_head = (make_linear, make_linear) if make_linear else linear_factories(device, dtype, weights)
    with torch.device("meta"):
        model = Transformer(spec)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

    if isinstance(embed, QuantizedMatrix):  # weights "gguf": the table stays in blocks, a tied head reads them too
        model.embed = QuantizedEmbedding(embed.to(device), dtype)
        model.lm_head = make_head([embed] if head is None else head(), None)
    else:
        model.embed.weight = param(embed)
        model.lm_head = make_head(embed if head is None else head(), None)
    model.norm.weight = param(norm)
    del embed
    for i, block in enumerate(model.layers):
        w = layer_weights(i)
        _check_shapes(spec, i, w, origin)
        block.attn_norm.weight = param(w.attn_norm)
        block.ffn_norm.weight = param(w.ffn_norm)
        block.attn.wqkv = make_linear(w.wqkv, w.bqkv)
        block.attn.wo = make_linear(w.wo, None)
        block.ffn.w_gate_up = make_linear(w.w_gate_up, None)
        block.ffn.w_down = make_linear(w.w_down, None)
        if spec.qk_norm:
            block.attn.q_norm.weight, block.attn.k_norm.weight = param(w.q_norm), param(w.k_norm)
        if progress:
            progress(i + 1, spec.n_layers)
    fuse_ggml_layers(model)
    return model.eval()


def fuse_ggml_layers(model: Transformer) -> int:
    """Where all of a layer's linears are ggml products (GGUF blocks on the CPU) and its gate and up are two
    matrices, run the layer as two ggml graphs around attention (edgectx.quant.ggml_layer). Returns how many."""
    from edgectx.quant.ggml_cpu import GgmlLinear

    blocks = [b for b in model.layers if all(isinstance(m, GgmlLinear) and m.bias is None for m in (b.attn.wo, b.ffn.w_gate_up, b.ffn.w_down))
              and isinstance(b.attn.wqkv, GgmlLinear) and len(b.ffn.w_gate_up.matmul.parts) == 2]
    if not blocks:
        return 0
    from edgectx.quant.ggml_layer import GgmlLayer, GgmlStack

    stack = GgmlStack()
    for b in blocks:
        gate, up = b.ffn.w_gate_up.matmul.parts
        bias = b.attn.wqkv.bias
        qk_norm = None if b.attn.q_norm is None else (b.attn.q_norm.weight, b.attn.k_norm.weight)
        b.fused = GgmlLayer(stack, b.attn.wqkv.matmul.parts, b.attn.wo.matmul.parts, gate, up, b.ffn.w_down.matmul.parts[0],
                            b.attn_norm.weight, b.ffn_norm.weight, b.attn_norm.eps, qkv_bias=None if bias is None else bias.data,
                            qk_norm=qk_norm)
    spec = model.spec
    whole_step = os.environ.get("EDGECTX_GGML_DECODE", "1") != "0"  # =0: decode steps keep PyTorch attention
    if whole_step and len(blocks) == len(model.layers) and not spec.qkv_bias and spec.head_dim % 2 == 0 \
            and not spec.sliding_window:
        from edgectx.quant.ggml_decode import GgmlDecoder

        head = model.lm_head
        lm_parts = head.matmul.parts if isinstance(head, GgmlLinear) and head.bias is None else None
        model.decoder = GgmlDecoder([b.fused for b in blocks], spec.n_heads, spec.n_kv_heads, spec.head_dim,
                                    model.norm.weight, model.norm.eps, lm_parts)
    return len(blocks)


def _check_shapes(spec: ModelSpec, i: int, w: LayerWeights, origin: tuple[Path, str]) -> None:
    expected = {"attn.wqkv.weight": (w.wqkv, (spec.q_dim + 2 * spec.kv_dim, spec.dim)),
                "ffn.w_gate_up.weight": (w.w_gate_up, (2 * spec.ffn_dim, spec.dim)),
                "attn.wo.weight": (w.wo, (spec.dim, spec.q_dim)), "ffn.w_down.weight": (w.w_down, (spec.dim, spec.ffn_dim))}
    if spec.qk_norm:
        for name, norm in (("attn.q_norm.weight", w.q_norm), ("attn.k_norm.weight", w.k_norm)):
            if norm is None or tuple(norm.shape) != (spec.head_dim,):
                shape = None if norm is None else tuple(norm.shape)
                raise ModelFileError(f"{origin[0]}: layer {i} {name} has shape {shape}, expected ({spec.head_dim},) "
                                     f"from {origin[1]}.")
    for name, (tensor, shape) in expected.items():
        if matrix_shape(tensor) != shape:
            raise ModelFileError(f"{origin[0]}: layer {i} {name} has shape {matrix_shape(tensor)}, expected {shape} from {origin[1]}.")
