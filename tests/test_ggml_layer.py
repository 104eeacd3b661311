"""A layer around attention as two ggml graphs (edgectx.quant.ggml_layer) against the same layer in PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.ggml_cpu import GgmlLinear, ggml_available, quantize_rows
from edgectx.quant.ggml_layer import GgmlLayer, GgmlStack

pytestmark = pytest.mark.skipif(not ggml_available(), reason="llama-cpp-python's ggml libraries are not installed")

DIM, Q_DIM, KV_DIM, FFN, EPS = 64, 64, 32, 160, 1e-5


def _f32(values: torch.Tensor) -> QuantizedMatrix:
    """An F32 "quantized" matrix: ggml multiplies it in float32, so the graphs' arithmetic is checked exactly."""
    values = values.float().contiguous()
    return QuantizedMatrix(values.view(torch.uint8).reshape(values.shape[0], -1).clone(), T.F32, *values.shape)


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _weights(seed: int, make=_f32):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    dense = {"q": rand(Q_DIM, DIM), "k": rand(KV_DIM, DIM), "v": rand(KV_DIM, DIM), "o": rand(DIM, Q_DIM),
             "gate": rand(FFN, DIM), "up": rand(FFN, DIM), "down": rand(DIM, FFN),
             "attn_norm": 1 + 0.1 * torch.randn(DIM, generator=g), "ffn_norm": 1 + 0.1 * torch.randn(DIM, generator=g),
             "bias": torch.randn(Q_DIM + 2 * KV_DIM, generator=g)}
    parts = {name: make(dense[name]) for name in ("q", "k", "v", "o", "gate", "up", "down")}
    return dense, parts


def _layer(parts, dense, stack=None, bias=False) -> GgmlLayer:
    return GgmlLayer(stack or GgmlStack(), [parts["q"], parts["k"], parts["v"]], [parts["o"]], parts["gate"], parts["up"],
                     parts["down"], dense["attn_norm"], dense["ffn_norm"], EPS, qkv_bias=dense["bias"] if bias else None)


def _reference_before(d, x, bias=False):
    h = _rms_norm(x, d["attn_norm"])
    y = torch.cat([h @ d[n].T for n in ("q", "k", "v")], dim=-1)
    return y + d["bias"] if bias else y


def _reference_after(d, attn, x):
    h = x + attn @ d["o"].T
    n = _rms_norm(h, d["ffn_norm"])
    return h + (F.silu(n @ d["gate"].T) * (n @ d["up"].T)) @ d["down"].T


@pytest.mark.parametrize("n_tokens", [1, 7, 33])
def test_float32_graphs_compute_the_layer(n_tokens):
    dense, parts = _weights(0)
    layer = _layer(parts, dense, bias=True)
    x, attn = torch.randn(n_tokens, DIM), torch.randn(n_tokens, Q_DIM)
    torch.testing.assert_close(layer.before(x), _reference_before(dense, x, bias=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.after(attn, x), _reference_after(dense, attn, x), rtol=1e-5, atol=1e-5)


def test_gate_and_up_are_not_swapped():
    """SwiGLU is silu(gate) * up: with gate and up exchanged the result differs by far more than rounding."""
    dense, parts = _weights(1)
    layer = _layer(parts, dense)
    x, attn = torch.randn(3, DIM), torch.randn(3, Q_DIM)
    swapped = dict(dense, gate=dense["up"], up=dense["gate"])
    got = layer.after(attn, x)
    assert (got - _reference_after(dense, attn, x)).abs().max() < 1e-4
    assert (got - _reference_after(swapped, attn, x)).abs().max() > 1e-2


def test_quantized_graphs_agree_with_the_dequantized_layer():
    dense, parts = _weights(2, make=lambda m: quantize_rows(m, T.Q4_K if m.shape[1] % 256 == 0 else T.Q8_0))
    dequantized = dict(dense, **{name: p.dequantize() for name, p in parts.items()})
    layer = _layer(parts, dense)
    x, attn = torch.randn(5, DIM), torch.randn(5, Q_DIM)
    for got, want in ((layer.before(x), _reference_before(dequantized, x)), (layer.after(attn, x), _reference_after(dequantized, attn, x))):
        assert float((got - want).norm() / want.norm()) < 2e-2  # ggml's 8-bit activations


def test_layers_sharing_a_stack_keep_their_own_results():
    """Every layer's intermediate results live in one scratch: a layer's output must not change when another
    layer (other weights, other token count) runs in between."""
    stack = GgmlStack()
    (d1, p1), (d2, p2) = _weights(3), _weights(4)
    first, second = _layer(p1, d1, stack), _layer(p2, d2, stack)
    x, attn = torch.randn(4, DIM), torch.randn(4, Q_DIM)
    out = first.after(attn, x)
    second.after(torch.randn(9, Q_DIM), torch.randn(9, DIM))
    second.before(torch.randn(1, DIM))
    torch.testing.assert_close(out, _reference_after(d1, attn, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(first.after(attn, x), out)


def test_embedded_model_layers_run_fused_and_agree_with_the_unfused_modules(embedded_model):
    from edgectx.engine import Engine

    e = Engine.load(embedded_model, device="cpu", n_ctx=1024)
    assert e.weights == "gguf"
    assert all(block.fused is not None for block in e.model.layers)
    assert all(isinstance(block.attn.wqkv, GgmlLinear) for block in e.model.layers)  # the modules remain (torch.compile)
    ids = e.tokenizer.encode("def read(path):\n    with open(path) as f:\n        return f.read()\n" * 30)[:300]
    fused = [block.fused for block in e.model.layers]
    runs = []
    for use in (True, False):
        for block, f in zip(e.model.layers, fused):
            block.fused = f if use else None
        e.reset()
        with torch.inference_mode():
            logits = [e.forward(ids[:256], all_logits=True), e.forward(ids[256:], all_logits=True)]
            logits += [e.forward([t], all_logits=True) for t in ids[:6]]  # decode steps
        runs.append(torch.cat(logits))
    fused_logits, module_logits = runs
    # The same products; only ggml's RMSNorm (vs PyTorch's) moves activations by rounding, which the 8-bit
    # activation quantization then and again rounds to the neighbouring step.
    assert float((fused_logits.argmax(-1) == module_logits.argmax(-1)).float().mean()) >= 0.93
    cos = F.cosine_similarity(fused_logits, module_logits, dim=-1)
    assert float(cos.min()) > 0.99, float(cos.min())


def test_more_token_counts_than_the_stack_keeps():
    """Past GgmlStack.KEEP token counts a call's scratch is made for that call alone; it must outlive the call's
    graph (a freed buffer here crashed prefills whose chunks came in many sizes)."""
    dense, parts = _weights(5)
    stack = GgmlStack()
    layer = _layer(parts, dense, stack)
    for n_tokens in range(1, 3 * GgmlStack.KEEP):
        x, attn = torch.randn(n_tokens * 37, DIM), torch.randn(n_tokens * 37, Q_DIM)
        torch.testing.assert_close(layer.after(attn, x), _reference_after(dense, attn, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.before(x), _reference_before(dense, x), rtol=1e-5, atol=1e-5)
    assert len(stack._scratch) <= GgmlStack.KEEP


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1])
def test_prefill_graphs_multiply_slow_types_through_exact_float32_copies(qtype):
    # Q4_1 / Q5_1 weights: from DEQUANTIZE_MIN_TOKENS rows on, each product reads a float32 copy of its weight
    # made in the graph (all copies share one slot), so the layer equals the dequantized layer in float32
    # arithmetic; decode-sized graphs keep ggml's 8-bit activations.
    from edgectx.quant.ggml_cpu import DEQUANTIZE_MIN_TOKENS

    dense, parts = _weights(5, make=lambda w: quantize_rows(w, qtype))
    exact = {**dense, **{name: p.dequantize() for name, p in parts.items()}}
    layer = _layer(parts, dense)
    for n_tokens, tolerance in ((DEQUANTIZE_MIN_TOKENS + 9, 1e-5), (3, 3e-2)):
        torch.manual_seed(n_tokens)
        x, attn = torch.randn(n_tokens, DIM), torch.randn(n_tokens, Q_DIM)
        before, after = layer.before(x), layer.after(attn, x)
        for got, expected in ((before, _reference_before(exact, x)), (after, _reference_after(exact, attn, x))):
            err = float((got - expected).norm() / expected.norm())
            assert err < tolerance, (n_tokens, err)
        if n_tokens > 3:
            assert layer.stack.copies.buffer.numel() == FFN * DIM * 4  # one slot, the largest weight's copy
