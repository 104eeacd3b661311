"""Load a GGUF model (llama.cpp's file format) into a `Transformer`, through the `gguf` package's reader.

Every failure a user can cause (missing path, not GGUF, truncated, unsupported architecture or tensor
type) becomes a `ModelFileError` / `UnsupportedModelError` with one sentence. Llama-family Q/K rows are
stored permuted for llama.cpp's adjacent-pair rotary layout; we undo the permutation so that every
architecture uses the half-split rotation (and pre-RoPE projections match Hugging Face's layout).

    gguf_file = open_gguf(Path("model.gguf"))
    model = load_model(gguf_file, torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgectx.errors import ModelFileError, UnsupportedModelError
from edgectx.model.files import path_kind, read_head
from edgectx.model.transformer import Transformer
from edgectx.model.assembly import LayerWeights, LinearFactory, assemble_model
from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.gguf_dequant import SUPPORTED_TYPES, dequantize_blocks
from edgectx.model.spec import SUPPORTED_ARCHS, ModelSpec, RopeScaling

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # scalar and short-array fields; the vocabulary arrays are left to the tokenizer
    tensors: dict[str, Any]  # name -> gguf ReaderTensor

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def open_gguf(path: Path) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and that every tensor lies inside the file."""
    path = Path(path).expanduser()
    if path_kind(path) is None:  # a FIFO, a device or an unreachable path is refused here
        raise ModelFileError(f"Model file not found: {path}. Pass a .gguf file or a Hugging Face model directory "
                             "(`edgectx models` lists those found).")
    head = read_head(path, 8)
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF model file (it lacks the GGUF header): pass a .gguf file.")
    _check_version(path, head[4:])
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on damaged headers
        raise ModelFileError(f"{path} is truncated or corrupt ({type(e).__name__} while reading its header): download or convert it again.") from None
    file_bytes = os.path.getsize(path)
    tensors = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_bytes or t.data.nbytes != t.n_bytes:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} extends past the end of the file. Download or convert it again.")
        tensors[t.name] = t
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type", "merges"):
            continue  # vocabulary arrays: llama.cpp's tokenizer reads them itself
        try:
            metadata[key] = field.contents()
        except Exception:
            raise ModelFileError(f"{path} is corrupt: metadata field {key} cannot be decoded.") from None
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def file_weight_bytes(g: GGUFFile) -> int:
    """Bytes of every tensor in the file as stored (quantized blocks, float norms): what a model that keeps the
    file's blocks holds (`--weights gguf`)."""
    return sum(int(t.n_bytes) for t in g.tensors.values())


def _check_version(path: Path, field: bytes) -> None:
    """The uint32 after the magic, read as the gguf package reads it: a file of the other byte order shows its
    version in the high half."""
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    if len(field) < 4:
        raise ModelFileError(f"{path} is truncated: it ends inside the GGUF header. Download or convert it again.")
    version = int.from_bytes(field, "little")
    if version & 0xFFFF == 0:
        version = int.from_bytes(field, "big")
    if version not in READER_SUPPORTED_VERSIONS:
        raise UnsupportedModelError(f"{path} is GGUF version {version}, which edgectx cannot read (it reads versions "
                                    f"{' and '.join(map(str, READER_SUPPORTED_VERSIONS))}): download it again, or convert it "
                                    "with a current llama.cpp.")


def read_spec(g: GGUFFile) -> ModelSpec:
    """Build the `ModelSpec` from metadata, refusing architectures edgectx does not implement."""
    arch = g.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{g.path.name} is a '{arch}' model; edgectx supports the {', '.join(SUPPORTED_ARCHS)} architectures."
        )

    def key(name: str, default: Any = None) -> Any:
        value = g.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFileError(f"{g.path} lacks the metadata field {arch}.{name}: the file is incomplete.")
        return value

    embd = _tensor(g, "token_embd.weight")
    n_heads = key("attention.head_count")
    dim = key("embedding_length")
    head_dim = g.get(f"{arch}.attention.key_length") or dim // n_heads
    scaling_type = g.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear", "yarn", "longrope"):
        raise UnsupportedModelError(f"{g.path.name} uses RoPE scaling '{scaling_type}', which edgectx does not support.")
    scaling = RopeScaling(
        kind="none" if scaling_type == "longrope" else scaling_type,
        factor=float(g.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0),
        original_context=int(g.get(f"{arch}.rope.scaling.original_context_length", 0)),
        attn_factor=float(g.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
        beta_fast=float(g.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(g.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
    )
    factors = _optional_vector(g, "rope_freqs.weight") or _optional_vector(g, "rope_factors_short.weight")
    return ModelSpec(
        arch=arch,
        n_layers=key("block_count"),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=g.get(f"{arch}.attention.head_count_kv") or n_heads,
        head_dim=head_dim,
        ffn_dim=key("feed_forward_length"),
        vocab_size=int(embd.shape[1]),
        context_length=key("context_length"),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_base=float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(g.get(f"{arch}.rope.dimension_count", 0)),
        rope_scaling=scaling,
        rope_freq_factors=factors,
        rope_freq_factors_long=_optional_vector(g, "rope_factors_long.weight"),
        qkv_bias="blk.0.attn_q.bias" in g.tensors or "blk.0.attn_qkv.bias" in g.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
        tied_embeddings="output.weight" not in g.tensors,
        sliding_window=int(g.get(f"{arch}.attention.sliding_window", 0) or 0),
    )


def _tensor(g: GGUFFile, name: str):
    t = g.tensors.get(name)
    if t is None:
        raise ModelFileError(f"{g.path} lacks the tensor {name}: the file is incomplete or not a {g.get('general.architecture')} model.")
    return t


def dequantize(g: GGUFFile, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A tensor as float32 in its logical shape (rows, cols), decoded by torch on `device` (default the CPU):
    the raw block bytes travel to the device and are decoded there (edgectx.quant.gguf_dequant)."""
    t = _tensor(g, name)
    if t.tensor_type not in SUPPORTED_TYPES:
        raise _unsupported(g, name, t)
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions innermost first
    with warnings.catch_warnings():  # the memory map is read-only; the bytes are only read, never written
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(t.data.reshape(-1).view(np.uint8))
    return dequantize_blocks(raw.to(device or "cpu"), t.tensor_type, shape)


def dequantize_reference(g: GGUFFile, name: str) -> torch.Tensor:
    """The same tensor through the gguf package's numpy reference dequantizer (slower; the oracle)."""
    from gguf import quants

    t = _tensor(g, name)
    try:
        array = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise _unsupported(g, name, t) from None
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not array.flags.writeable:  # F32 tensors come straight from the read-only memory map
        array = array.copy()
    return torch.from_numpy(array)


def _unsupported(g: GGUFFile, name: str, t) -> UnsupportedModelError:
    return UnsupportedModelError(f"{g.path.name} stores {name} as {t.tensor_type.name}, a type edgectx cannot read yet.")


def _optional_vector(g: GGUFFile, name: str) -> tuple[float, ...] | None:
    if name not in g.tensors:
        return None
    return tuple(dequantize(g, name).flatten().tolist())


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's llama Q/K row permutation: (n_heads, hd/2, 2) rows back to (n_heads, 2, hd/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def blocks(g: GGUFFile, name: str) -> QuantizedMatrix:
    """A tensor's raw blocks, (rows, row bytes), as a view of the file's read-only memory map (nothing is copied)."""
    t = _tensor(g, name)
    if t.tensor_type not in SUPPORTED_TYPES:
        raise _unsupported(g, name, t)
    rows, cols = (int(n) for n in reversed(t.shape)) if len(t.shape) == 2 else (1, int(t.shape[0]))
    with warnings.catch_warnings():  # the memory map is read-only; the bytes are only read, never written
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(t.data.reshape(-1).view(np.uint8))
    try:
        return QuantizedMatrix(raw.reshape(rows, -1), t.tensor_type, rows, cols)
    except (ValueError, RuntimeError):
        raise ModelFileError(f"{g.path}: tensor {name} holds {raw.numel()} bytes, which do not make a {t.tensor_type.name} "
                             f"matrix of {rows}x{cols}: the file is corrupt.") from None


def _row_order(rows: int, n_heads: int) -> torch.Tensor:
    """The row index that `_unpermute` applies: rows are quantized independently, so blocks permute losslessly."""
    return _unpermute(torch.arange(rows), n_heads)


def _layer_blocks(g: GGUFFile, spec: ModelSpec, i: int) -> LayerWeights:
    """Layer i with its linears left in their GGUF blocks (weights "gguf"); norms and biases as float32."""
    p = f"blk.{i}."

    def get(name: str) -> torch.Tensor:
        return dequantize(g, p + name)

    def parts(*names: str) -> list[QuantizedMatrix]:
        return [blocks(g, p + name) for name in names]

    if p + "attn_qkv.weight" in g.tensors:
        wqkv = parts("attn_qkv.weight")
        bqkv = get("attn_qkv.bias") if spec.qkv_bias else None
    else:
        wq, wk, wv = parts("attn_q.weight", "attn_k.weight", "attn_v.weight")
        if spec.arch in ("llama", "mistral"):
            wq, wk = wq.take_rows(_row_order(wq.rows, spec.n_heads)), wk.take_rows(_row_order(wk.rows, spec.n_kv_heads))
        wqkv = [wq, wk, wv]
        bqkv = torch.cat([get(f"attn_{n}.bias") for n in "qkv"]) if spec.qkv_bias else None
    w_gate_up = parts("ffn_gate.weight", "ffn_up.weight") if p + "ffn_gate.weight" in g.tensors else parts("ffn_up.weight")
    return LayerWeights(get("attn_norm.weight"), get("ffn_norm.weight"), wqkv, parts("attn_output.weight"), w_gate_up,
                        parts("ffn_down.weight"), bqkv, *_qk_norms(get, spec))


def _layer_weights(g: GGUFFile, spec: ModelSpec, i: int, device: torch.device | None = None) -> LayerWeights:
    p = f"blk.{i}."

    def get(name: str) -> torch.Tensor:
        return dequantize(g, p + name, device)

    if p + "attn_qkv.weight" in g.tensors:
        wqkv = get("attn_qkv.weight")
        bqkv = get("attn_qkv.bias") if spec.qkv_bias else None
    else:
        wq, wk, wv = (get(f"attn_{n}.weight") for n in "qkv")
        if spec.arch in ("llama", "mistral"):
            wq, wk = _unpermute(wq, spec.n_heads), _unpermute(wk, spec.n_kv_heads)
        wqkv = torch.cat([wq, wk, wv])
        bqkv = torch.cat([get(f"attn_{n}.bias") for n in "qkv"]) if spec.qkv_bias else None
    if p + "ffn_gate.weight" in g.tensors:
        w_gate_up = torch.cat([get("ffn_gate.weight"), get("ffn_up.weight")])
    else:
        w_gate_up = get("ffn_up.weight")  # phi3: gate and up already fused, gate first
    return LayerWeights(get("attn_norm.weight"), get("ffn_norm.weight"), wqkv, get("attn_output.weight"), w_gate_up,
                        get("ffn_down.weight"), bqkv, *_qk_norms(get, spec))


def _qk_norms(get: Callable[[str], torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A layer's per-head Q and K norm weights (qwen3), else (None, None)."""
    return (get("attn_q_norm.weight"), get("attn_k_norm.weight")) if spec.qk_norm else (None, None)


def load_model(
    g: GGUFFile,
    device: torch.device,
    dtype: torch.dtype,
    make_linear: LinearFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: str = "auto",
) -> Transformer:
    """Build the model layer by layer (peak memory: the model plus one layer of float32 weights), decoding
    each GGUF tensor on `device`.

    `make_linear(weight, bias)` turns float32 weights into a module (a packed or quantized linear);
    by default `edgectx.quant.linear_factories`' choice for the device and `weights` (auto | fp16 | nf4 |
    int8). The output projection stays 16-bit under nf4/int8, as transformers' bitsandbytes loading does:
    its logits are the sampled distribution itself.
    """
    spec = read_spec(g)
    if weights == "gguf":  # the file's blocks are the weights: the products read them (edgectx.quant.ggml_cpu, gguf_cuda)
        head = None if spec.tied_embeddings else lambda: [blocks(g, "output.weight")]
        return assemble_model(spec, device, dtype, blocks(g, "token_embd.weight"), dequantize(g, "output_norm.weight", device),
                              head, lambda i: _layer_blocks(g, spec, i), make_linear, weights, progress,
                              origin=(g.path, "the metadata"))
    head = None if spec.tied_embeddings else lambda: dequantize(g, "output.weight", device)
    return assemble_model(spec, device, dtype, dequantize(g, "token_embd.weight", device),
                          dequantize(g, "output_norm.weight", device), head, lambda i: _layer_weights(g, spec, i, device),
                          make_linear, weights, progress, origin=(g.path, "the metadata"))

