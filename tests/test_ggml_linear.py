"""ggml's quantized products (edgectx.quant.ggml_cpu) against the dequantized reference, and a GGUF model
loaded with its own blocks (weights "gguf", the default for GGUF files on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from edgectx.errors import UsageError
from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.ggml_cpu import GgmlLinear, GgmlMatmul, ggml_available, quantize_rows
from edgectx.quant.linear import resolve_weights

pytestmark = pytest.mark.skipif(not ggml_available(), reason="llama-cpp-python's ggml libraries are not installed")

FILE_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.F32)


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 40])
def test_product_matches_the_dequantized_weight(qtype, n_tokens):
    torch.manual_seed(int(qtype) * 10 + n_tokens)
    m = quantize_rows(torch.randn(37, 512) / 512 ** 0.5, qtype)  # 37 rows: no tile divides them evenly
    x = torch.randn(n_tokens, 512)
    got = GgmlMatmul([m])(x)
    expected = x @ m.dequantize().T
    # ggml rounds the activations to 8 bits (16 for F16 weights) before the dot products, as llama.cpp does
    assert got.shape == (n_tokens, 37)
    assert _rel_err(got, expected) < (1e-6 if qtype == T.F32 else 2e-2)


def test_fused_parts_of_different_types_write_their_own_columns():
    torch.manual_seed(0)
    parts = [quantize_rows(torch.randn(rows, 256), qtype) for rows, qtype in ((48, T.Q4_K), (16, T.Q6_K), (16, T.Q8_0))]
    fused = GgmlMatmul(parts)
    x = torch.randn(5, 256)
    got = fused(x)
    separate = torch.cat([GgmlMatmul([p])(x) for p in parts], dim=1)
    assert torch.equal(got, separate)


def test_the_product_does_not_depend_on_how_many_rows_come_at_once():
    torch.manual_seed(1)
    mm = GgmlMatmul([quantize_rows(torch.randn(64, 256), T.Q4_K), quantize_rows(torch.randn(32, 256), T.Q6_K)])
    x = torch.randn(70, 256)
    rows = torch.cat([mm(x[i:i + 1].contiguous()) for i in range(70)])
    # the same 8-bit activations either way; ggml's multi-row kernels only sum in another order
    torch.testing.assert_close(mm(x), rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mm(x[::2]), rows[::2], rtol=1e-5, atol=1e-4)  # a strided input is copied, not misread


def test_linear_adds_its_bias_and_keeps_batch_dims():
    torch.manual_seed(2)
    m = quantize_rows(torch.randn(32, 64), T.Q8_0)
    bias = torch.randn(32)
    layer = GgmlLinear([m], bias)
    x = torch.randn(2, 3, 64)
    assert layer(x).shape == (2, 3, 32)
    torch.testing.assert_close(layer(x)[1, 2], GgmlMatmul([m])(x[1, 2:3])[0] + bias)
    assert layer.weight_bytes == m.nbytes


def test_mismatched_parts_are_refused():
    a = quantize_rows(torch.randn(8, 64), T.Q8_0)
    b = quantize_rows(torch.randn(8, 128), T.Q8_0)
    with pytest.raises(ValueError, match="same column count"):
        GgmlMatmul([a, b])
    with pytest.raises(ValueError, match="do not hold"):
        QuantizedMatrix(a.raw[:, :-2], T.Q8_0, 8, 64)


def test_auto_keeps_a_gguf_files_blocks_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_weights(cpu, "auto", blocks=True) == "gguf"
    assert resolve_weights(cpu, "auto", blocks=False) == "fp16"
    with pytest.raises(UsageError, match="not a GGUF file"):
        resolve_weights(cpu, "gguf", blocks=False)


def test_embedded_model_runs_on_its_own_blocks(embedded_model):
    from edgectx.engine import Engine
    from edgectx.model.gguf import open_gguf

    blocks = Engine.load(embedded_model, device="cpu", weights="gguf")
    dense = Engine.load(embedded_model, device="cpu", weights="fp16")
    assert blocks.weights == "gguf"
    linears = [m for m in blocks.model.modules() if isinstance(m, GgmlLinear)]
    assert len(linears) == 4 * blocks.spec.n_layers + 1  # every projection, and the (tied) output head
    g = open_gguf(embedded_model)
    file_bytes = sum(int(t.n_bytes) for name, t in g.tensors.items() if name.endswith(".weight") and len(t.shape) == 2)
    # the model's projections and embedding read the file's bytes: the tied head shares the embedding's
    model_bytes = sum(m.weight_bytes for m in linears[:-1]) + blocks.model.embed.weight_bytes
    assert model_bytes == file_bytes
    ids = blocks.tokenizer.encode("def read(path):\n    with open(path) as f:\n        return f.read()\n" * 8)[:200]
    with torch.inference_mode():
        a = blocks.forward(ids, all_logits=True)
        b = dense.forward(ids, all_logits=True)
    agreement = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert agreement >= 0.9, agreement  # 8-bit activations (ggml) against fp32 ones, same weights
    assert float(np.corrcoef(a[-1].numpy(), b[-1].numpy())[0, 1]) > 0.99


def test_chunking_moves_ggml_logits_only_at_the_rounding_level(embedded_model):
    from edgectx.engine import Engine

    e = Engine.load(embedded_model, device="cpu")  # the default: the file's blocks
    assert e.weights == "gguf"
    ids = e.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again. " * 30)[:300]
    whole = e.prefill(ids, chunk_tokens=512)
    e.reset()
    chunked = e.prefill(ids, chunk_tokens=64)
    assert int(whole.argmax()) == int(chunked.argmax())
    assert float(np.corrcoef(whole.flatten().numpy(), chunked.flatten().numpy())[0, 1]) > 0.999


@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q4_K, T.Q8_0), ids=lambda t: t.name)
def test_decode_rows_read_a_repacked_copy_that_agrees_with_the_blocks(qtype, monkeypatch):
    import gc

    from edgectx.quant import ggml_cpu

    if not ggml_cpu.lib().repack_buft:
        pytest.skip("this ggml build has no CPU_REPACK buffer type")
    torch.manual_seed(int(qtype))
    m = quantize_rows(torch.randn(64, 512) / 512 ** 0.5, qtype)
    packed = ggml_cpu.repacked(m)
    if packed is None:
        pytest.skip(f"no repacked {qtype.name} kernel for this CPU")
    assert packed.tensor.contents.data != m.raw.data_ptr()  # a copy in ggml's own buffer, re-laid
    x = torch.randn(1, 512)
    with_repack = GgmlMatmul([m])(x)
    monkeypatch.setenv("EDGECTX_GGML_REPACK", "0")
    plain = GgmlMatmul([m])(x)
    assert not torch.equal(m.raw, torch.zeros_like(m.raw))
    # the same blocks and the same 8-bit activations: only the order of the sums differs
    torch.testing.assert_close(with_repack, plain, rtol=1e-5, atol=1e-5)
    key = id(m.raw)
    assert key in ggml_cpu._repacked
    del m, packed
    gc.collect()
    assert key not in ggml_cpu._repacked  # the copy goes with its matrix


def test_types_without_a_repacked_kernel_keep_their_blocks():
    from edgectx.quant import ggml_cpu

    for qtype in (T.Q4_1, T.Q6_K):
        m = quantize_rows(torch.randn(64, 256), qtype)
        assert ggml_cpu.repacked(m) is None
    assert ggml_cpu.repacked(quantize_rows(torch.randn(36, 256), T.Q4_K)) is None  # rows not a multiple of 8


def test_repacking_prints_nothing_to_the_terminal(tmp_path):
    import subprocess
    import sys

    code = ("import torch; from gguf import GGMLQuantizationType as T; from edgectx.quant.ggml_cpu import GgmlMatmul, quantize_rows;"
            "GgmlMatmul([quantize_rows(torch.randn(64, 256), T.Q4_K)])(torch.randn(1, 256))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "repack" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize("qtype", (T.Q4_1, T.Q5_1), ids=lambda t: t.name)
def test_prefill_products_of_slow_types_are_exact(qtype):
    from edgectx.quant.ggml_cpu import DEQUANTIZE_MIN_TOKENS

    torch.manual_seed(int(qtype))
    parts = [quantize_rows(torch.randn(rows, 256), qtype) for rows in (48, 16)]
    fused = GgmlMatmul(parts)
    x = torch.randn(DEQUANTIZE_MIN_TOKENS + 3, 256)
    expected = x @ torch.cat([p.dequantize() for p in parts]).T
    assert _rel_err(fused(x), expected) < 1e-6  # float32 copies of the weights (one slot, both parts right)
    assert _rel_err(fused(x[:2].contiguous()), expected[:2]) > 1e-4  # decode-sized: ggml's 8-bit activations
