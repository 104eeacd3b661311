"""The 32-bit reference of a GGUF model: its weights requantized to F32 by llama.cpp's own quantizer, cached.

llama.cpp's CPU kernels quantize activations to 8 bits for quantized weights, so llama.cpp is not the
model either. Dequantizing every tensor to F32 (`llama_model_quantize`, ftype ALL_F32, `allow_requantize`)
gives the same weights without that rounding; llama.cpp runs it with F32 matrix products, and
`bench conformance` asks which engine is nearer to it.

The file is made once per model and kept under `cache_dir()/f32-reference/`, named by the weights'
fingerprint (edgectx.model.fingerprint), beside a small JSON manifest that records its size and SHA-256.
Both are written under temporary names and renamed into place, the manifest last; a file whose manifest is
missing or does not match (truncated, damaged, from another model) is made again, never used.

    ref = f32_reference(path, engine.fingerprint, engine.spec.num_params)
    ref.path, ref.built  # <cache>/f32-reference/ab12...-f32.gguf, True when this call made it
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgectx.config import cache_dir
from edgectx.bench.stale import remove_orphans
from edgectx.errors import EdgectxError

SUBDIR = "f32-reference"
QUANTIZE_THREADS = 2  # runs once per model; the machines here are shared
HASH_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class F32Reference:
    path: Path
    built: bool  # made by this call (False: the cached file was checked and reused)


def reference_paths(fingerprint: str, folder: Path | None = None) -> tuple[Path, Path]:
    """(the F32 GGUF, its manifest) for the model with this weights fingerprint."""
    folder = folder or cache_dir() / SUBDIR
    stem = f"{fingerprint[:16]}-f32"
    return folder / f"{stem}.gguf", folder / f"{stem}.json"


def f32_reference(source: Path, fingerprint: str, num_params: int, folder: Path | None = None) -> F32Reference:
    """The cached F32 requantization of `source` (a model of `num_params` weights, for the disk-space check),
    made first when it is missing or fails its manifest."""
    final, manifest = reference_paths(fingerprint, folder)
    if _cached_ok(final, manifest, fingerprint):
        return F32Reference(final, built=False)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)  # the manifest first: a damaged file stays unused if this run dies here
        final.unlink(missing_ok=True)
    except OSError as e:
        raise EdgectxError(f"Cannot write in the cache folder {final.parent} ({e.strerror}): set EDGECTX_CACHE to a "
                           "writable folder, or pass --reference none.") from None
    _remove_stale(final.parent)
    _check_space(final.parent, num_params * 4 + source.stat().st_size)  # 4 bytes a weight, and the metadata
    tag = f"{os.getpid()}.tmp"
    tmp, tmp_manifest = final.with_name(f".{final.name}.{tag}"), manifest.with_name(f".{manifest.name}.{tag}")
    try:
        _requantize(source, tmp)
        digest = _sha256(tmp)  # also reads the file back: a short write shows here, not later
        record = {"source": str(source.resolve()), "source_fingerprint": fingerprint, "size_bytes": tmp.stat().st_size,
                  "sha256": digest}
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, final)
        os.replace(tmp_manifest, manifest)
    except OSError as e:
        raise EdgectxError(f"Could not write the 32-bit reference in {final.parent} ({e.strerror or e}): free some disk "
                           "space or set EDGECTX_CACHE to a larger disk, or pass --reference none.") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return F32Reference(final, built=True)


def _cached_ok(path: Path, manifest: Path, fingerprint: str) -> bool:
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("source_fingerprint") != fingerprint:
            return False
        return path.stat().st_size == record.get("size_bytes") and _sha256(path) == record.get("sha256")
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def _check_space(folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes * 1.02:
        raise EdgectxError(f"The 32-bit reference needs about {need_bytes / 1e9:.1f} GB free in {folder}, which has "
                           f"{free / 1e9:.1f} GB: free some space, set EDGECTX_CACHE to a larger disk, or pass --reference none.")


def _remove_stale(folder: Path) -> None:
    """Temporary files of earlier runs whose process is gone: `.NAME.PID.tmp`."""
    remove_orphans(folder.glob(".*.tmp"), lambda tmp: tmp.name.rsplit(".", 2)[-2])


def _requantize(source: Path, dst: Path) -> None:
    import llama_cpp

    from edgectx.model.tokenizer import quiet_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # the source's tensors are already quantized: dequantize them
    params.nthread = QUANTIZE_THREADS
    with quiet_stderr():  # a line per tensor
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise EdgectxError(f"llama.cpp's quantizer could not turn {source.name} into F32 in {dst.parent} (a full disk is "
                           "the usual cause): free some space, or pass --reference none.")
