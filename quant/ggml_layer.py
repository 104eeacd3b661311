"""A transformer layer's work around attention as two ggml graphs: what llama.cpp runs, minus its attention.

With GGUF blocks on the CPU (edgectx.quant.ggml_cpu) a decode step made ~20 small PyTorch ops and 4 ggml
calls per layer; each costs a few microseconds of Python and dispatch and, for ggml, one wake-up of the
OpenMP team. `GgmlLayer` builds, per token count, two graphs of one layer:

    before attention:  qkv = W_qkv @ (rms_norm(x) * attn_norm)                      (+ bias in torch)
    after attention:   h = x + W_o @ attn;  out = h + W_down @ swiglu(W_gate @ n, W_up @ n),
                       n = rms_norm(h) * ffn_norm

Attention stays the memory's (`layer_memory.attend`, PyTorch). In a prefill-sized graph a Q4_1 or Q5_1
weight is multiplied through an exact float32 copy made in the graph (ggml_cpu.product: twice the speed of
ggml's GEMM for those types). Weights are the `QuantizedMatrix` parts the
layer's `GgmlLinear`s already hold (nothing is copied); inputs and outputs are torch buffers whose pointers
are written into the graph per call; intermediate results live in a scratch shared by every layer of the
model (`GgmlStack`: layers run one after another). Numerics: ggml's own RMSNorm, SwiGLU and products (8-bit
activations), as llama.cpp computes them.

    stack = GgmlStack()
    layer = GgmlLayer(stack, qkv_parts, o_parts, gate, up, down, attn_norm, ffn_norm, eps)
    qkv = layer.before(x)              # x (T, dim) -> (T, q_dim + 2 kv_dim)
    out = layer.after(attn, x)         # attn (T, q_dim), x (T, dim) -> (T, dim)
"""

from __future__ import annotations

import ctypes
import threading

import torch

from edgectx.quant import ggml_cpu
from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.ggml_cpu import GGML_TYPES, CopySlot, _CPlan, _F32, _InitParams, lib, product

_ALIGN = 64


class GgmlStack:
    """What the layers of one model share: the scratch for intermediate results (per token count), the
    work buffer ggml quantizes activations into, and the lock that makes their calls one at a time."""

    KEEP = 8  # token counts whose graphs and scratch are kept (decode and the usual chunk sizes)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.work = torch.empty(0, dtype=torch.uint8)
        self._scratch: dict[int, torch.Tensor] = {}
        self.copies = CopySlot()  # weights' float32 copies (ggml_cpu.DEQUANTIZED_TYPES); taken under `lock`

    def scratch(self, n_tokens: int, n_bytes: int) -> torch.Tensor:
        """At least `n_bytes` of scratch for graphs of `n_tokens` rows. The caller holds the tensor while the
        graph runs: past KEEP token counts a buffer is made for the one call and kept by nothing else."""
        buf = self._scratch.get(n_tokens)
        if buf is None or buf.numel() < n_bytes:
            buf = torch.empty(n_bytes, dtype=torch.uint8)
            if n_tokens in self._scratch or len(self._scratch) < self.KEEP:
                self._scratch[n_tokens] = buf
        return buf

    def work_ptr(self, n_bytes: int) -> int:
        if n_bytes > self.work.numel():
            self.work = torch.empty(n_bytes + 4096, dtype=torch.uint8)
        return self.work.data_ptr()


class _Graph:
    """One graph over `n_tokens` rows: named input and output tensors re-pointed per call, the nodes between
    them placed in the stack's scratch."""

    def __init__(self, n_tensors: int, n_tokens: int):
        g = lib()
        self.n_tokens = n_tokens
        size = (n_tensors + 8) * g.ggml_tensor_overhead() + g.ggml_graph_overhead() + 1024
        self.ctx = g.ggml_init(_InitParams(size, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        self.graph = g.ggml_new_graph(self.ctx)
        self.inner = []  # nodes that need scratch, in order
        self.copies = []  # float32 copies of weights (ggml_cpu.product), all in the stack's one slot
        self.plan: _CPlan | None = None
        self.plan_threads = 0

    def new(self, cols: int, rows: int, data: int = 0):
        t = lib().ggml_new_tensor_2d(self.ctx, _F32, cols, rows)
        t.contents.data = data
        return t

    def matmul(self, part: QuantizedMatrix, x):
        return product(self.ctx, self.graph, part, x, self.n_tokens, self.copies)

    def vector(self, values: torch.Tensor):
        v = lib().ggml_new_tensor_1d(self.ctx, _F32, values.numel())
        v.contents.data = values.data_ptr()
        return v

    def node(self, t):
        self.inner.append(t)
        return t

    def finish(self, *outs) -> None:
        for t in outs:
            lib().ggml_build_forward_expand(self.graph, t)
        self.offsets, total = [], 0
        for t in self.inner:
            self.offsets.append(total)
            total += (lib().ggml_nbytes(t) + _ALIGN - 1) // _ALIGN * _ALIGN
        self.scratch_bytes = total

    def compute(self, stack: GgmlStack, n_tokens: int) -> None:
        scratch = stack.scratch(n_tokens, self.scratch_bytes)  # alive until this call returns
        base = scratch.data_ptr()
        for t, offset in zip(self.inner, self.offsets):
            t.contents.data = base + offset
        if self.copies:
            stack.copies.point(self.copies)  # the caller holds stack.lock
        g, threads = lib(), ggml_cpu.threads()
        if self.plan is None or self.plan_threads != threads:
            self.plan, self.plan_threads = g.ggml_graph_plan(self.graph, threads, None), threads
        self.plan.work_data = stack.work_ptr(self.plan.work_size)
        status = g.ggml_graph_compute(self.graph, ctypes.byref(self.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")

    def __del__(self):
        if ggml_cpu._lib is not None and getattr(self, "ctx", None):
            ggml_cpu._lib.ggml_free(self.ctx)
            self.ctx = None


class GgmlLayer:
    """One layer's products, norms, SwiGLU and residuals in two ggml graphs per token count."""

    def __init__(self, stack: GgmlStack, qkv: list[QuantizedMatrix], o: list[QuantizedMatrix], gate: QuantizedMatrix,
                 up: QuantizedMatrix, down: QuantizedMatrix, attn_norm: torch.Tensor, ffn_norm: torch.Tensor, eps: float,
                 qkv_bias: torch.Tensor | None = None, qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None):
        parts = [*qkv, *o, gate, up, down]
        bad = [p.qtype.name for p in parts if p.qtype not in GGML_TYPES]
        if bad:
            raise ValueError(f"ggml has no CPU product for {', '.join(bad)}")
        self.stack, self.eps = stack, float(eps)
        self.qkv, self.o, self.gate, self.up, self.down = list(qkv), list(o), gate, up, down
        self.dim = qkv[0].cols
        self.qkv_rows = sum(p.rows for p in qkv)
        self.attn_cols = o[0].cols
        # float32 contiguous copies the graphs point at (the model's parameters may be another dtype)
        self.attn_norm = attn_norm.detach().float().contiguous().clone()
        self.ffn_norm = ffn_norm.detach().float().contiguous().clone()
        self.qkv_bias = None if qkv_bias is None else qkv_bias.detach().float().contiguous()
        # qwen3's per-head Q and K norms: PyTorch applies them after `before` (Attention.attend); the whole-step
        # decoder (ggml_decode) in its graph
        self.q_norm, self.k_norm = (None, None) if qk_norm is None else \
            (qk_norm[0].detach().float().contiguous().clone(), qk_norm[1].detach().float().contiguous().clone())
        self._before: dict[int, tuple] = {}
        self._after: dict[int, tuple] = {}

    # -- graphs ---------------------------------------------------------------------------------------

    def _normed(self, gr: _Graph, x, weight: torch.Tensor):
        g = lib()
        n = gr.node(g.ggml_rms_norm(gr.ctx, x, self.eps))
        return gr.node(g.ggml_mul(gr.ctx, n, gr.vector(weight)))

    def _build_before(self, n_tokens: int) -> tuple:
        gr = _Graph(3 * len(self.qkv) + 8, n_tokens)
        x = gr.new(self.dim, n_tokens)
        h = self._normed(gr, x, self.attn_norm)
        outs = [gr.matmul(p, h) for p in self.qkv]
        gr.finish(*outs)
        return gr, x.contents, [y.contents for y in outs]

    def _build_after(self, n_tokens: int) -> tuple:
        g = lib()
        gr = _Graph(3 * len(self.o) + 24, n_tokens)
        attn, x = gr.new(self.attn_cols, n_tokens), gr.new(self.dim, n_tokens)
        o_parts = [gr.node(gr.matmul(p, attn)) for p in self.o]
        h = o_parts[0]
        for y in o_parts[1:]:
            h = gr.node(g.ggml_add(gr.ctx, h, y))
        h = gr.node(g.ggml_add(gr.ctx, h, x))  # the residual after attention
        n = self._normed(gr, h, self.ffn_norm)
        gate = gr.node(gr.matmul(self.gate, n))
        up = gr.node(gr.matmul(self.up, n))
        act = gr.node(g.ggml_swiglu_split(gr.ctx, gate, up))
        down = gr.node(gr.matmul(self.down, act))
        out = g.ggml_add(gr.ctx, down, h)
        gr.finish(out)
        return gr, attn.contents, x.contents, out.contents

    def _cached(self, graphs: dict, n_tokens: int, build) -> tuple:
        entry = graphs.get(n_tokens)
        if entry is None:
            entry = build(n_tokens)
            if len(graphs) < GgmlStack.KEEP:
                graphs[n_tokens] = entry
        return entry

    # -- calls ----------------------------------------------------------------------------------------

    def before(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, dim) -> the Q, K, V projections (T, qkv rows) of the normed x."""
        x = x.float().contiguous()
        n_tokens = x.shape[0]
        out = torch.empty(n_tokens, self.qkv_rows, dtype=torch.float32)
        with self.stack.lock:
            gr, xt, ys = self._cached(self._before, n_tokens, self._build_before)
            xt.data = x.data_ptr()
            row_stride, offset = self.qkv_rows * 4, out.data_ptr()
            for part, y in zip(self.qkv, ys):  # each part writes its columns of the (T, qkv rows) output
                y.data = offset
                y.nb[1] = row_stride
                y.nb[2] = y.nb[3] = row_stride * n_tokens
                offset += part.rows * 4
            gr.compute(self.stack, n_tokens)
        return out if self.qkv_bias is None else out + self.qkv_bias

    def after(self, attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """attn (T, q_dim): the attention output before W_o; x (T, dim): the layer's input -> its output."""
        attn, x = attn.float().contiguous(), x.float().contiguous()
        n_tokens = x.shape[0]
        out = torch.empty(n_tokens, self.dim, dtype=torch.float32)
        with self.stack.lock:
            gr, at, xt, ot = self._cached(self._after, n_tokens, self._build_after)
            at.data, xt.data, ot.data = attn.data_ptr(), x.data_ptr(), out.data_ptr()
            gr.compute(self.stack, n_tokens)
        return out
