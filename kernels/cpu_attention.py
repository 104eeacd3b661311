"""The fused CPU decode step's attention over a float16 context (cpu_attention.c), built once with the C compiler.

ggml's flash attention costs the same per key and head whatever the K/V type (about 20 ns on two cores: a dot
product, an expf and a row update per key and query head), so a float16 context saved nothing there. The C ops
here read each KV head's keys once for its whole query group, a block at a time, with a vectorized exp: over
2,600 float16 keys, 30 layers of the embedded model took 3.5 ms against flash attention's 6.9 (two threads).
They run inside the decode graph (edgectx.quant.ggml_decode) as two ggml custom ops.

The library is compiled at first use with the system's C compiler (`$CC`, else cc, gcc or clang: llama-cpp-python,
a dependency, is itself built from source by one) for x86-64 CPUs with AVX2, FMA and F16C, and kept in the cache
dir under a name hashed from the source, the flags and the compiler, so a new version rebuilds. Where any of that
is missing (another CPU, no compiler, a failed build), `ops()` says None once, with one warning, and the decode graph keeps ggml's flash attention over a
float32 context. EDGECTX_CPU_ATTENTION=0 turns it off.

    ops = cpu_attention.ops()   # (partial, reduce) C function addresses, or None
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions that take tensors, not by the engine's start
    import torch

log = logging.getLogger(__name__)
_library: ctypes.CDLL | None = None  # kept loaded for as long as the ops' addresses are used
_state: tuple[str | None, str] = (None, "not tried yet")  # `status`: (the library's path or None, why not)
SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
CPU_FLAGS = ("avx2", "fma", "f16c")
HEAD_DIMS = (64, 128)  # what the C ops are specialized for
MAX_GROUP = 16  # query heads per KV head (cpu_attention.c's MAX_GROUP)


def _cpu_supported() -> str | None:
    """Why this CPU cannot run the library, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "/proc/cpuinfo is unreadable (its AVX2, FMA and F16C support cannot be checked)"
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def _cache_folder() -> Path:
    """edgectx.config.cache_dir() / "kernels" (that module sits above this package, which imports nothing of the
    engine's; tests/test_cpu_attention.py holds the two to the same answer)."""
    import platformdirs

    explicit, home = os.environ.get("EDGECTX_CACHE"), os.environ.get("EDGECTX_HOME")
    if explicit:
        return Path(explicit).expanduser() / "kernels"
    cache = Path(home).expanduser() / "cache" if home else Path(platformdirs.user_cache_dir("edgectx", appauthor=False))
    return cache / "kernels"


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    return _cache_folder() / f"cpu_attention-{digest}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile the library to `target`, atomically (a concurrent build of the same name writes the same bytes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensor_layout() -> tuple[int, ...] | None:
    """(sizeof, offset of src, offset of data) of ggml's tensor struct as the C ops read it, or None without them: the
    decode graph (edgectx.quant.ggml_decode) uses the ops only where its own bindings agree."""
    if ops() is None:
        return None
    return tuple(_library.edgectx_attn_layout(i) for i in range(3))


@cache
def ops() -> tuple[int, int] | None:
    """(partial, reduce): the addresses of the two custom ops (ggml_custom_op_t), or None where the library cannot
    be built or used here (the module docstring; one warning says why)."""
    global _library, _state
    if os.environ.get("EDGECTX_CPU_ATTENTION", "1") == "0":
        _state = (None, "turned off (EDGECTX_CPU_ATTENTION=0)")
        return None
    why = _cpu_supported()
    compiler = _compiler() if why is None else None
    if why is None and compiler is None:
        why = "no C compiler was found (set CC)"
    if why is None:
        target = _library_path(compiler)
        try:
            if not target.is_file():
                _build(compiler, target)
            library = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"building it with {compiler} failed: {e}"
    if why is not None:
        log.warning("edgectx: the fast CPU decode attention is off (%s); ggml's flash attention runs instead.", why)
        _state = (None, why)
        return None
    _library, _state = library, (str(target), "")
    library.edgectx_attn_layout.restype, library.edgectx_attn_layout.argtypes = ctypes.c_int64, [ctypes.c_int]
    rope = library.edgectx_rope_f16
    rope.restype = None
    rope.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                     ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    mass = library.edgectx_attention_mass
    mass.restype = None
    mass.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return (ctypes.cast(library.edgectx_attn_partial, ctypes.c_void_p).value,
            ctypes.cast(library.edgectx_attn_reduce, ctypes.c_void_p).value)


def rotate_into(dst: "torch.Tensor", src: "torch.Tensor", positions: "torch.Tensor", cos: "torch.Tensor",
                sin: "torch.Tensor") -> None:
    """dst (n_kv, n, d) float16 <- src (n_kv, n, d) float16 pre-RoPE keys rotated at `positions` (n_kv, n) int64 with
    the signed tables `cos`, `sin` (N, d) float32 (Rope.signed_tables), bit for bit as Rope.rotate in float32 then
    rounded to float16 (the memory's rebuild: cpu_attention.c's edgectx_rope_f16). Each head's rows contiguous; every
    position below N. Call only where `ops()` is not None."""
    import torch

    n_kv, n, d = src.shape
    if n == 0:
        return
    tables = cos.shape[1]
    ok = (dst.dtype == src.dtype == torch.float16 and positions.dtype == torch.int64 and d % 16 == 0 and tables == d
          and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
          and dst.shape == src.shape and positions.shape == (n_kv, n) and dst.stride()[1:] == src.stride()[1:] == (d, 1)
          and positions.stride(1) == 1)
    if not ok:
        raise ValueError("rotate_into: shapes, dtypes or strides it does not take")
    if int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]:  # C reads the tables' rows unchecked
        raise ValueError("rotate_into: a position outside the tables")
    _library.edgectx_rope_f16(dst.data_ptr(), dst.stride(0), src.data_ptr(), src.stride(0), positions.data_ptr(),
                              positions.stride(0), n_kv, n, d, cos.data_ptr(), sin.data_ptr())


def attention_mass(q: "torch.Tensor", k: "torch.Tensor", length: int, scratch: "torch.Tensor",
                   valid: "torch.Tensor | None" = None, idx: "torch.Tensor | None" = None,
                   q_idx: "torch.Tensor | None" = None) -> "torch.Tensor":
    """(n_kv, length) float32: per key of a float16 context, the softmax weight that the query rows of its KV head put
    on it, summed (cpu_attention.c's edgectx_attention_mass): q (n_heads, n_q, d) float32, rotated, unscaled; k
    (n_kv, capacity, d) float16, the first `length` columns; valid (n_kv, >= length) bool: which keys each KV head
    sees; idx (n_kv, >= length) int64 with q_idx (n_q,) int64: key j is seen by query t only if idx[j] <= q_idx[t].
    scratch: float32, at least n_heads / n_kv * n_q * length elements, contiguous. Call only where `ops()` is not None."""
    import torch

    n_heads, n_q, d = q.shape
    n_kv = k.shape[0]
    rows = n_heads // n_kv * n_q
    ok = (q.dtype == scratch.dtype == torch.float32 and q.is_contiguous() and k.dtype == torch.float16 and k.shape[2] == d
          and k.stride()[1:] == (d, 1) and d % 8 == 0 and d <= 128 and n_heads % n_kv == 0 and k.shape[1] >= length
          and scratch.is_contiguous() and scratch.numel() >= rows * length)
    for t, dtype in ((valid, torch.bool), (idx, torch.int64)):
        ok = ok and (t is None or (t.dtype == dtype and t.shape[0] == n_kv and t.shape[1] >= length and t.stride(1) == 1))
    ok = ok and (idx is None) == (q_idx is None) and (q_idx is None or (q_idx.dtype == torch.int64 and q_idx.shape == (n_q,)
                                                                        and q_idx.is_contiguous()))
    if not ok:
        raise ValueError("attention_mass: shapes, dtypes or strides it does not take")
    out = torch.empty(n_kv, length, dtype=torch.float32)
    if length:
        _library.edgectx_attention_mass(
            out.data_ptr(), q.data_ptr(), n_heads, n_q, n_kv, d, k.data_ptr(), k.stride(0), length,
            None if valid is None else valid.data_ptr(), 0 if valid is None else valid.stride(0),
            None if idx is None else idx.data_ptr(), 0 if idx is None else idx.stride(0),
            None if q_idx is None else q_idx.data_ptr(), scratch.data_ptr())
    return out


def status() -> tuple[str | None, str]:
    """(the compiled library's path, "") or (None, why it is off): what `edgectx doctor` reports."""
    ops()
    return _state


def supports(n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the ops can run a model of this shape (and are available)."""
    return head_dim in HEAD_DIMS and n_heads % n_kv == 0 and n_heads // n_kv <= MAX_GROUP and ops() is not None
