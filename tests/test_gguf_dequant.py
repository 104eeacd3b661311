"""The torch GGUF dequantizer against the gguf package's reference (`gguf.quants.dequantize`), type by type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from edgectx.quant.gguf_dequant import BLOCK_LAYOUT, SUPPORTED_TYPES, dequantize_blocks

# Where each block type keeps its fp16 scales (byte ranges): random bytes there could be inf/NaN.
FP16_FIELDS = {
    T.Q4_0: [(0, 2)], T.Q4_1: [(0, 4)], T.Q5_0: [(0, 2)], T.Q5_1: [(0, 4)], T.Q8_0: [(0, 2)],
    T.Q2_K: [(80, 84)], T.Q3_K: [(108, 110)], T.Q4_K: [(0, 4)], T.Q5_K: [(0, 4)], T.Q6_K: [(208, 210)],
}
BLOCK_TYPES = list(FP16_FIELDS)
SHAPES = [(1, 256), (3, 512), (7, 768)]  # several rows, several blocks per row


def random_blocks(qtype: T, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random block bytes (every bit pattern of the packed integers) with finite random fp16 scales."""
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = BLOCK_LAYOUT[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    for start, end in FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=(blocks.shape[0], (end - start) // 2)).astype(np.float16)
        blocks[:, start:end] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(data: np.ndarray, qtype: T) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_blocks_match_the_reference_bit_for_bit(qtype, shape):
    data = random_blocks(qtype, shape, seed=shape[0])
    ours = dequantize_blocks(torch.from_numpy(data), qtype, shape)
    expected = reference(data, qtype)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape == expected.shape
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    np.testing.assert_array_equal(ours.numpy(), expected)


QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_weights_match_the_reference(qtype):
    weights = (np.random.default_rng(1).standard_normal((5, 320)) * 0.02).astype(np.float32)
    data = gguf.quants.quantize(weights, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    ours = dequantize_blocks(raw, qtype, weights.shape)
    expected = reference(data, qtype)
    np.testing.assert_array_equal(ours.numpy(), expected)
    # and the round trip is a quantization of the input, not noise
    relative = {T.F32: 0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 1e-2}.get(qtype, 0.2)  # of the largest |weight|
    assert np.abs(ours.numpy() - weights).max() <= relative * np.abs(weights).max()


def test_float16_output_is_the_float32_result_rounded():
    data = random_blocks(T.Q6_K, (4, 512), seed=3)
    full = dequantize_blocks(torch.from_numpy(data), T.Q6_K, (4, 512))
    half = dequantize_blocks(torch.from_numpy(data), T.Q6_K, (4, 512), dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, full.half())


def test_f32_result_is_a_copy_not_a_view_of_the_bytes():
    raw = torch.from_numpy(np.arange(8, dtype=np.float32).view(np.uint8).copy())
    out = dequantize_blocks(raw, T.F32, (2, 4))
    raw.zero_()
    assert out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_wrong_sizes_and_types_are_refused():
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_blocks(torch.zeros(35, dtype=torch.uint8), T.Q8_0, (1, 32))
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize_blocks(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (1, 256))
    assert T.Q4_K in SUPPORTED_TYPES and T.Q3_K in SUPPORTED_TYPES


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_cuda_matches_the_reference(qtype):
    data = random_blocks(qtype, (64, 1024), seed=7)
    ours = dequantize_blocks(torch.from_numpy(data).cuda(), qtype, (64, 1024))
    assert ours.device.type == "cuda"
    np.testing.assert_allclose(ours.cpu().numpy(), reference(data, qtype), rtol=1e-6, atol=1e-7)


def test_loader_decodes_the_embedded_model_as_the_reference_does(embedded_model):
    from edgectx.model.gguf import dequantize, dequantize_reference, open_gguf

    g = open_gguf(embedded_model)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        ours, expected = dequantize(g, name), dequantize_reference(g, name)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        assert torch.equal(ours, expected), name
    assert g.tensors["token_embd.weight"].tensor_type == T.Q8_0 and g.tensors["blk.0.attn_q.weight"].tensor_type == T.Q4_1


def test_loader_refuses_an_unsupported_type_in_one_sentence(tmp_path):
    from edgectx.errors import UnsupportedModelError
    from edgectx.model.gguf import dequantize, open_gguf

    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 66), dtype=np.uint8), raw_dtype=T.IQ2_XXS)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match=r"^iq.gguf stores token_embd.weight as IQ2_XXS, a type edgectx cannot read yet\.$"):
        dequantize(open_gguf(path), "token_embd.weight")
