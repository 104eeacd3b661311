"""ggml's own quantized matrix products on the CPU, reached through ctypes: a GGUF weight stays in its blocks.

llama-cpp-python installs ggml as shared libraries (`libggml-base.so`, `libggml-cpu.so`) that export the graph
API; binding them costs no build. A `GgmlMatmul` owns one small ggml context per token count holding a graph of
`ggml_mul_mat` nodes, one per weight part, whose weight tensors point at the GGUF bytes (a view of the file's
memory map, or a row-permuted copy) and whose input and output tensors are re-pointed at torch buffers on
every call: a call is a few field writes and one `ggml_graph_compute`. The parts of a fused linear (Q/K/V,
gate/up; Q4_K_M files keep V in Q6_K) write their rows into one (T, sum rows) output through a row stride.

ggml's kernels quantize the activations to 8 bits (q8_0 / q8_K) before the dot products, as llama.cpp does;
`bench conformance` measures what that costs against a 32-bit reference.

Decode-sized products (a few rows) read a second copy of the weights that ggml's CPU backend repacked at load
into its "CPU_REPACK" buffer (8 rows' blocks interleaved for its AVX2 kernels: what llama.cpp decodes with);
prefill-sized ones read the GGUF blocks, where the plain kernels are the faster. The copy costs the weight
bytes of the repackable types once more in RAM (as it does in llama.cpp, which keeps the file mapped beside
it); EDGECTX_GGML_REPACK=0 turns it off, =N moves the row threshold (16).

    mm = GgmlMatmul([QuantizedMatrix(raw, Q4_K, 2048, 2048)])
    y = mm(x)     # x (T, 2048) float32 contiguous -> (T, 2048) float32

ggml and PyTorch share one OpenMP runtime (both load `libgomp.so.1`; torch first), so their thread pools do
not compete; `set_threads(n)` sets ggml's count (the engine passes its own).
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import os
import sys
import threading
import weakref
from pathlib import Path

import torch
from torch import nn
from gguf import GGMLQuantizationType as T

from edgectx.errors import UsageError
from edgectx.quant.blocks import QuantizedMatrix

# Types whose products ggml's CPU backend computes from the blocks (the types of Q4_K_M, Q5_K_M and Q8_0 files).
GGML_TYPES = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
_F32, _F16 = 0, 1
_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Tensor(ctypes.Structure):  # ggml.h's struct ggml_tensor, field for field
    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _MAX_DIMS), ("nb", ctypes.c_size_t * _MAX_DIMS),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _MAX_SRC), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * _MAX_NAME), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _CPlan(ctypes.Structure):  # ggml-cpu.h's struct ggml_cplan
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


_TensorP = ctypes.POINTER(_Tensor)
_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LOG_WARN, _LOG_CONT = 3, 5  # ggml.h's enum ggml_log_level


class _Lib:
    """The ggml functions edgectx calls, with their C signatures."""

    def __init__(self, folder: Path):
        torch.get_num_threads()  # torch's libgomp is loaded first, so ggml binds to the same OpenMP runtime
        mode = ctypes.RTLD_GLOBAL
        base = ctypes.CDLL(str(folder / "libggml-base.so"), mode=mode)
        cpu = ctypes.CDLL(str(folder / "libggml-cpu.so"), mode=mode)
        sig = [
            (base, "ggml_init", ctypes.c_void_p, [_InitParams]),
            (base, "ggml_free", None, [ctypes.c_void_p]),
            (base, "ggml_tensor_overhead", ctypes.c_size_t, []),
            (base, "ggml_graph_overhead", ctypes.c_size_t, []),
            (base, "ggml_new_tensor_2d", _TensorP, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            (base, "ggml_new_tensor_1d", _TensorP, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]),
            (base, "ggml_new_tensor_3d", _TensorP, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
            (base, "ggml_view_2d", _TensorP, [ctypes.c_void_p, _TensorP, ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_size_t]),
            (base, "ggml_reshape_2d", _TensorP, [ctypes.c_void_p, _TensorP, ctypes.c_int64, ctypes.c_int64]),
            (base, "ggml_reshape_3d", _TensorP, [ctypes.c_void_p, _TensorP, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
            (base, "ggml_concat", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP, ctypes.c_int]),
            (base, "ggml_cpy", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP]),
            (base, "ggml_flash_attn_ext", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP, _TensorP, _TensorP, ctypes.c_float,
                                                    ctypes.c_float, ctypes.c_float]),
            (base, "ggml_flash_attn_ext_set_prec", None, [_TensorP, ctypes.c_int]),
            (base, "ggml_custom_4d", _TensorP, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.POINTER(_TensorP), ctypes.c_int, ctypes.c_void_p,
                                                ctypes.c_int, ctypes.c_void_p]),
            (base, "ggml_new_graph_custom", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_bool]),
            (base, "ggml_graph_overhead_custom", ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_bool]),
            (base, "ggml_graph_n_nodes", ctypes.c_int, [ctypes.c_void_p]),
            (base, "ggml_graph_node", _TensorP, [ctypes.c_void_p, ctypes.c_int]),
            (base, "ggml_mul_mat", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP]),
            (base, "ggml_rms_norm", _TensorP, [ctypes.c_void_p, _TensorP, ctypes.c_float]),
            (base, "ggml_mul", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP]),
            (base, "ggml_add", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP]),
            (base, "ggml_swiglu_split", _TensorP, [ctypes.c_void_p, _TensorP, _TensorP]),
            (base, "ggml_nbytes", ctypes.c_size_t, [_TensorP]),
            (base, "ggml_cast", _TensorP, [ctypes.c_void_p, _TensorP, ctypes.c_int]),
            (base, "ggml_new_graph", ctypes.c_void_p, [ctypes.c_void_p]),
            (base, "ggml_build_forward_expand", None, [ctypes.c_void_p, _TensorP]),
            (base, "ggml_row_size", ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
            (base, "ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]),
            (base, "ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
            (base, "ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
            (base, "ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p]),
            (base, "ggml_backend_alloc_ctx_tensors_from_buft", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
            (base, "ggml_backend_buffer_free", None, [ctypes.c_void_p]),
            (base, "ggml_backend_tensor_set", None, [_TensorP, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
            (cpu, "ggml_backend_cpu_reg", ctypes.c_void_p, []),
            (cpu, "ggml_cpu_init", None, []),
            (cpu, "ggml_graph_plan", _CPlan, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]),
            (cpu, "ggml_graph_compute", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(_CPlan)]),
        ]
        for lib, name, restype, argtypes in sig:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self._quiet_debug_log(base)
        self.ggml_cpu_init()  # fills the fp16 tables the kernels read
        self.repack_buft = self._repack_buffer_type()

    def _quiet_debug_log(self, base: ctypes.CDLL) -> None:
        """ggml's default logger prints its debug lines ("repack: repack tensor ...") to stderr, over the
        terminal UI: keep warnings and errors only. (llama-cpp-python, where it loads, installs its own.)"""
        shown = [False]

        def log(level: int, text: bytes, _user: int) -> None:
            if level != _LOG_CONT:
                shown[0] = level >= _LOG_WARN
            if shown[0] and text:
                sys.stderr.write(text.decode("utf-8", "replace"))

        self._log_callback = _LogCallback(log)  # kept: ggml holds only the function pointer
        base.ggml_log_set.restype, base.ggml_log_set.argtypes = None, [_LogCallback, ctypes.c_void_p]
        base.ggml_log_set(self._log_callback, None)

    def _repack_buffer_type(self) -> int | None:
        """The CPU backend's "CPU_REPACK" buffer type (weights re-laid for its SIMD kernels), or None."""
        reg = self.ggml_backend_cpu_reg()
        address = self.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not reg or not address:
            return None
        extra_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        types = extra_bufts(self.ggml_backend_reg_dev_get(reg, 0))
        i = 0
        while types and types[i]:
            if self.ggml_backend_buft_name(types[i]) == b"CPU_REPACK":
                return types[i]
            i += 1
        return None


_lib: _Lib | None = None
_threads = max(1, torch.get_num_threads())


def _library_folder() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return folder if (folder / "libggml-cpu.so").is_file() else None


def ggml_available() -> bool:
    """True where llama-cpp-python's ggml libraries load (Linux x86/ARM wheels built from source)."""
    try:
        lib()
    except (UsageError, OSError, AttributeError):
        return False
    return True


def lib() -> _Lib:
    global _lib
    if _lib is None:
        folder = _library_folder()
        if folder is None:
            raise UsageError("ggml's libraries were not found beside llama-cpp-python: reinstall edgectx (pip install llama-cpp-python).")
        _lib = _Lib(folder)
    return _lib


def set_threads(n: int) -> None:
    """Threads for every later ggml product (the engine's thread count)."""
    global _threads
    _threads = max(1, int(n))


def threads() -> int:
    return _threads


def quantize_rows(values: torch.Tensor, qtype: T) -> QuantizedMatrix:
    """ggml's own quantizer (what llama_model_quantize runs per tensor, without an importance matrix):
    float32 (rows, cols) -> QuantizedMatrix. For tests and synthetic weights."""
    values = values.detach().float().contiguous()
    rows, cols = values.shape
    row_bytes = lib().ggml_row_size(int(qtype), cols)
    raw = torch.empty(rows, row_bytes, dtype=torch.uint8)
    lib().ggml_quantize_chunk(int(qtype), values.data_ptr(), raw.data_ptr(), 0, rows, cols, None)
    return QuantizedMatrix(raw, qtype, rows, cols)


class _Repacked:
    """A weight copied into ggml's CPU_REPACK buffer: its blocks interleaved (8 rows at a time) for the
    AVX2/AVX-512 kernels llama.cpp runs, a lossless re-layout of the same quantized values, the same bytes."""

    def __init__(self, part: QuantizedMatrix):
        g = lib()
        self.ctx = g.ggml_init(_InitParams(2 * g.ggml_tensor_overhead(), None, True))
        self.tensor = g.ggml_new_tensor_2d(self.ctx, int(part.qtype), part.cols, part.rows)
        self.buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, g.repack_buft)
        self.ok = bool(self.buffer) and bool(self.tensor.contents.extra)  # extra: the repack layout, None if none fits
        if self.ok:
            g.ggml_backend_tensor_set(self.tensor, part.raw.data_ptr(), 0, part.nbytes)

    def __del__(self):
        if _lib is not None and getattr(self, "ctx", None):
            if self.buffer:
                _lib.ggml_backend_buffer_free(self.buffer)
            _lib.ggml_free(self.ctx)
            self.ctx = None


_repacked: dict[int, _Repacked] = {}


def _repack_max_tokens() -> int:
    return int(os.environ.get("EDGECTX_GGML_REPACK", "16"))


def repacked(part: QuantizedMatrix) -> _Repacked | None:
    """`part`'s repacked copy, made on first call (once per matrix, freed with it), or None where ggml has no
    repacked kernel for its type and shape on this CPU (on x86 with AVX2: Q4_0, Q4_K and IQ4_NL with rows a
    multiple of 8; not Q4_1, Q5_0, Q6_K, Q8_0) or repacking is off (EDGECTX_GGML_REPACK=0)."""
    if _repack_max_tokens() <= 0 or part.raw.device.type != "cpu" or not lib().repack_buft:
        return None
    key = id(part.raw)
    entry = _repacked.get(key)
    if entry is None:
        entry = _repacked[key] = _Repacked(part)
        weakref.finalize(part.raw, _repacked.pop, key, None)
    return entry if entry.ok else None


def weight_tensor(ctx: int, part: QuantizedMatrix, n_tokens: int):
    """The ggml tensor a graph over `n_tokens` rows multiplies by for `part`. Decode-sized graphs (up to
    EDGECTX_GGML_REPACK rows, default 16) read the repacked copy, where ggml's GEMV is faster (about 10-15% on
    a 1B Q4_K_M decode step); larger ones the GGUF blocks, where ggml's plain GEMM is faster than the repacked
    one on x86 (measured: 1B prefill 150 against 90 tok/s). Else a new tensor in `ctx` over the blocks."""
    entry = repacked(part) if n_tokens <= _repack_max_tokens() else None
    if entry is not None:
        return entry.tensor
    w = lib().ggml_new_tensor_2d(ctx, int(part.qtype), part.cols, part.rows)
    w.contents.data = part.raw.data_ptr()
    return w


# Types multiplied through an in-graph float32 copy of the weight in prefill-sized graphs. Measured, 3072x2048
# at 512 rows on 2 cores (AVX-512): Q4_1 93 ms and Q5_1 105 ms through ggml's own GEMM, 44 ms dequantized to
# float32 in the graph and multiplied there; Q4_0, Q5_0 and Q8_0 (~45 ms) gain nothing, the K-quants (~16 ms)
# would lose. The copy is exact, so such a product is also exact (no 8-bit rounding of the activations).
DEQUANTIZED_TYPES = (T.Q4_1, T.Q5_1)
DEQUANTIZE_MIN_TOKENS = 32
DEQUANTIZE_MAX_BYTES = 64 << 20  # larger weights keep ggml's GEMM: one copy at a time lives in a shared slot


def product(ctx: int, graph: int, part: QuantizedMatrix, x, n_tokens: int, copies: list):
    """W_part @ x as a node of `graph`, through a float32 copy of W where DEQUANTIZED_TYPES says so (the copy
    is appended to `copies`: the caller points them all at one slot). Such a product joins the graph at once,
    right after its copy, so ggml, which runs nodes in graph order, is done with one copy before the next."""
    g = lib()
    w = weight_tensor(ctx, part, n_tokens)
    copied = (n_tokens >= DEQUANTIZE_MIN_TOKENS and part.qtype in DEQUANTIZED_TYPES
              and part.rows * part.cols * 4 <= DEQUANTIZE_MAX_BYTES)
    if copied:
        w = g.ggml_cast(ctx, w, _F32)
        copies.append(w)
    y = g.ggml_mul_mat(ctx, w, x)
    if copied:
        g.ggml_build_forward_expand(graph, y)
    return y


class CopySlot:
    """Where a graph's float32 weight copies live (one at a time), and the lock that makes its users take turns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def point(self, copies: list) -> None:
        """Point `copies` at the slot (grown to the largest); call with the lock held."""
        n_bytes = max(lib().ggml_nbytes(t) for t in copies)
        if n_bytes > self.buffer.numel():
            self.buffer = torch.empty(n_bytes, dtype=torch.uint8)
        for t in copies:
            t.contents.data = self.buffer.data_ptr()


_copy_slot = CopySlot()  # GgmlMatmul's (fused layers have their GgmlStack's)


class _Graph:
    """One context and graph for `n_tokens` rows of input: the products of every part."""

    def __init__(self, parts: list[QuantizedMatrix], n_tokens: int):
        g = lib()
        n_nodes = 3 * len(parts) + 1
        self.ctx = g.ggml_init(_InitParams(n_nodes * g.ggml_tensor_overhead() + g.ggml_graph_overhead() + 1024, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        self.x = g.ggml_new_tensor_2d(self.ctx, _F32, parts[0].cols, n_tokens).contents
        self.outs, self.copies = [], []
        self.graph = g.ggml_new_graph(self.ctx)
        for part in parts:
            y = product(self.ctx, self.graph, part, ctypes.pointer(self.x), n_tokens, self.copies)
            g.ggml_build_forward_expand(self.graph, y)
            self.outs.append(y.contents)
        self.plan: _CPlan | None = None
        self.plan_threads = 0

    def __del__(self):
        if _lib is not None and getattr(self, "ctx", None):
            _lib.ggml_free(self.ctx)
            self.ctx = None


class GgmlMatmul:
    """y = x @ W.T for W the row-stack of `parts` (same column count), each kept in its ggml type."""

    # token counts whose graphs are kept: decode (1) and the common prefill chunk sizes; others are built per call
    KEEP = 8

    def __init__(self, parts: list[QuantizedMatrix]):
        if not parts or any(p.cols != parts[0].cols for p in parts):
            raise ValueError("the parts of a fused product need the same column count")
        bad = [p.qtype.name for p in parts if p.qtype not in GGML_TYPES]
        if bad:
            raise ValueError(f"ggml has no CPU product for {', '.join(bad)}")
        self.parts = list(parts)  # keeps the raw bytes alive as long as the graphs point at them
        for part in self.parts:  # at load, not at the first decode step
            repacked(part)
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self._graphs: dict[int, _Graph] = {}
        self._work = torch.empty(0, dtype=torch.uint8)
        self._lock = threading.Lock()  # a graph's input and output pointers are set per call: one call at a time

    def _graph(self, n_tokens: int) -> _Graph:
        graph = self._graphs.get(n_tokens)
        if graph is None:
            graph = _Graph(self.parts, n_tokens)
            if len(self._graphs) < self.KEEP:
                self._graphs[n_tokens] = graph
        return graph

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        if out is None:
            out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        with self._lock:
            return self._compute(x, out)

    def _compute(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n_tokens = x.shape[0]
        graph = self._graph(n_tokens)
        graph.x.data = x.data_ptr()
        row_stride = self.out_features * 4
        offset = out.data_ptr()
        for part, y in zip(self.parts, graph.outs):
            y.data = offset
            y.nb[1] = row_stride
            y.nb[2] = y.nb[3] = row_stride * n_tokens
            offset += part.rows * 4
        g = lib()
        if graph.plan is None or graph.plan_threads != _threads:
            graph.plan = g.ggml_graph_plan(graph.graph, _threads, None)
            graph.plan_threads = _threads
            if graph.plan.work_size > self._work.numel():
                self._work = torch.empty(graph.plan.work_size + 4096, dtype=torch.uint8)
        graph.plan.work_data = self._work.data_ptr()
        if graph.copies:
            with _copy_slot.lock:
                _copy_slot.point(graph.copies)
                status = g.ggml_graph_compute(graph.graph, ctypes.byref(graph.plan))
        else:
            status = g.ggml_graph_compute(graph.graph, ctypes.byref(graph.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        return out


_linear_by_handle: dict[int, GgmlMatmul] = {}
_next_handle = itertools.count()

# A plain Library op (as edgectx::linear_fp16): torch.compile sees an opaque call it cannot trace into ctypes.
_lib_op = torch.library.Library("edgectx", "FRAGMENT")
_lib_op.define("linear_ggml(Tensor x, int handle, int out_features) -> Tensor")


@torch.library.impl(_lib_op, "linear_ggml", "CPU")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _linear_by_handle[handle](x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], out_features)


@torch.library.register_fake("edgectx::linear_ggml", lib=_lib_op)
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class GgmlLinear(nn.Module):
    """A linear layer whose weight is `parts` in their GGUF blocks (fused: outputs concatenated), on the CPU.
    `weight_bytes`: the blocks' bytes (plus the bias), what a decode step reads."""

    def __init__(self, parts: list[QuantizedMatrix], bias: torch.Tensor | None = None):
        super().__init__()
        self.matmul = GgmlMatmul(parts)
        self.in_features, self.out_features = self.matmul.in_features, self.matmul.out_features
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        self.weight_bytes = sum(p.nbytes for p in parts)
        self.repacked_bytes = sum(p.nbytes for p in parts if repacked(p) is not None)  # decode's copies, held beside the blocks
        self.raw_tensors = [p.raw for p in parts]  # what the products read (benchmarks count them once each)
        self.qtypes = tuple(p.qtype.name for p in parts)
        self._handle = next(_next_handle)
        _linear_by_handle[self._handle] = self.matmul
        weakref.finalize(self, _linear_by_handle.pop, self._handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = torch.ops.edgectx.linear_ggml(x, self._handle, self.out_features)
        else:
            y = self.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml {'+'.join(self.qtypes)}"
