"""llama.cpp (through llama-cpp-python) as the reference, on the same GGUF file and thread count.

    ref = LlamaCppReference(path, n_ctx=4200, n_threads=2, all_logits=True)
    ref.eval(ids); ref.logits(0, len(ids))  # (n, vocab) float32

Without `all_logits`, `eval_logits` hands back the logits of each stretch of ids as it goes, so a long
run never holds llama-cpp-python's (n_ctx, vocab) array (800 MB for 4K tokens of a 49K vocabulary).
`f32_kv` keeps the KV cache in F32 instead of llama.cpp's default F16 (the 32-bit reference uses it).

A machine whose CPU says it has AMX may not run it (a virtual machine that passes the CPU flags through without
the tile state): a natively built llama.cpp then dies in `ggml_backend_amx_mul_mat` (a segfault: no Python error,
the whole process gone) on the first product of any type it runs with AMX (Q4_0, Q4_1, Q8_0, the K-quants). On
such a CPU `extra_buffers_work` first evaluates the embedded model in a child process; if that dies, the
reference loads with llama.cpp's extra buffer types off (AMX and weight repacking, `use_extra_bufts`, what its
CLI's `--no-repack` turns off), and benchmarks say so (`llama_cpp_extra_buffers`); llama-cpp-python's server runs
the same way under edgectx.bench.llama_server.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from edgectx.model.tokenizer import quiet_stderr

# Evaluates the embedded model (a Q4_1 file: AMX runs it) the way the reference would; exits 0 if it survives
_PROBE = """
import llama_cpp
from edgectx.model.discover import embedded_model_path
llama = llama_cpp.Llama(str(embedded_model_path()), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
llama.eval(list(range(1, 17)))
"""


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_" in line for line in f)
    except OSError:  # not Linux: no such virtual machines to fear
        return False


@functools.cache
def extra_buffers_work() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types here: True unless the CPU says AMX and a child process
    running the embedded model with them died (once per process; about a second where it runs)."""
    if not _cpu_has_amx():
        return True
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@contextlib.contextmanager
def without_extra_buffers(off: bool) -> Iterator[None]:
    """llama-cpp-python's `Llama` takes no `use_extra_bufts`: while it loads, its default model parameters come
    with them off (where `off`)."""
    if not off:
        yield
        return
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


class LlamaCppReference:
    def __init__(self, path: Path, n_ctx: int, n_threads: int, all_logits: bool = False, n_batch: int = 512,
                 f32_kv: bool = False):
        import llama_cpp

        kv_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
        self.extra_buffers = extra_buffers_work()
        with quiet_stderr(), without_extra_buffers(not self.extra_buffers):
            self.llama = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_batch=n_batch,
                logits_all=all_logits, verbose=False, **kv_type,
            )

    def reset(self) -> None:
        self.llama.reset()  # the next eval drops every cached position from 0 on

    def eval(self, ids: list[int]) -> None:
        self.llama.eval(ids)

    def eval_logits(self, ids: list[int], copy: bool = True) -> np.ndarray:
        """Evaluate `ids` after those already in and return their logits (len(ids), vocab) float32, in pieces
        of n_batch as `Llama.eval` does, without storing them. With `copy=False`, ids that fit one batch come
        back as a view of llama.cpp's own output buffer (100 MB fewer for 512 rows of a 49K vocabulary),
        valid until this reference's next eval."""
        llama = self.llama
        n_vocab = llama.n_vocab()
        out = None if not copy and len(ids) <= llama.n_batch else np.empty((len(ids), n_vocab), dtype=np.float32)
        for i in range(0, len(ids), llama.n_batch):
            piece = ids[i : i + llama.n_batch]
            n_past = llama.n_tokens
            llama._batch.set_batch(batch=piece, n_past=n_past, logits_all=True)
            llama._ctx.decode(llama._batch)
            logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(len(piece), n_vocab))
            llama.input_ids[n_past : n_past + len(piece)] = piece
            llama.n_tokens += len(piece)
            if out is None:
                return logits
            out[i : i + len(piece)] = logits
        return out

    def last_logits(self) -> np.ndarray:
        """Logits (vocab,) after the last eval; valid without `all_logits`."""
        return np.ctypeslib.as_array(self.llama._ctx.get_logits(), shape=(self.llama.n_vocab(),))

    def logits(self, start: int, end: int) -> np.ndarray:
        """Rows start..end of the logits kept by an `all_logits` reference."""
        return np.asarray(self.llama.scores[start:end], dtype=np.float32)

    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them."""
        import llama_cpp

        return int(llama_cpp.llama_model_size(self.llama._model.model))

    def close(self) -> None:
        self.llama.close()
