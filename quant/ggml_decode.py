"""A whole decode step, every layer and its attention, as one ggml graph: what llama.cpp runs per token.

With GGUF blocks on the CPU each layer already runs as two ggml graphs around attention (ggml_layer). A decode
step still paid, per layer, two wake-ups of the OpenMP team and some twenty small PyTorch ops for RoPE, the
context write and attention: about half of a 135M model's step. `GgmlDecoder` builds one graph for the
step instead, over the same weights:

    per layer:  qkv = W_qkv @ (rms_norm(x) * attn_norm)        -> a buffer the memory reads afterwards
                (qwen3: each head's q and k replaced in it by rms_norm(head) * q_norm / k_norm)
                k, v rounded to the memory's K/V dtype (as ContextMemory.as_stored), q and k rotated with the
                rope tables (x * cos + swap_halves(x) * signed_sin: the same float32 ops as Rope.rotate),
                the rotated key (rounded again) and the value written into the layer's assembled context at
                the new column, attention over columns [0, start]: a float16 context through
                edgectx.kernels.cpu_attention's two ops, twice as fast as ggml's flash attention, which
                attends a float32 context where they are not available
                x = x + W_o @ attn;  x = x + W_down @ swiglu(W_gate @ n, W_up @ n),  n = rms_norm(x) * ffn_norm
    then:       logits = W_out @ (rms_norm(x) * norm)

The memory decides per step whether it may (`LayerKV.decode_slot`: not on a retrieval step, not right after an
eviction) and records the step afterwards (`decoded`). Nodes run in graph order, so each layer's context
writes precede its attention. Pointers and the context's length are written into the graph per call; the
intermediate results have fixed places in one buffer. A step the memory calls steady (ContextMemory.steady_key)
runs as `again`: the last step's graph with every per-step field one column on, added in one go to the tensor
structs' memory, no slots.

    decoder = GgmlDecoder(layers, n_heads, n_kv, head_dim, norm_weight, eps, lm_parts)
    logits, qkv = decoder(x, slots)   # x (1, dim), slots: one DecodeSlot per layer -> (1, vocab), (n_layers, qkv rows)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import weakref

import numpy as np
import torch

from edgectx.kernels import cpu_attention
from edgectx.quant import ggml_cpu
from edgectx.quant.blocks import QuantizedMatrix
from edgectx.quant.ggml_cpu import _CPlan, _F16, _F32, _InitParams, _Tensor, _TensorP, lib, product
from edgectx.quant.ggml_layer import GgmlLayer

log = logging.getLogger(__name__)
_PREC_F32 = 10  # ggml.h's GGML_PREC_F32
_ALL_THREADS = -1  # ggml.h's GGML_N_TASKS_MAX: a custom op runs on every thread of the compute
_MAX_PARTS = min(64, os.cpu_count() or 1)  # threads whose shares of keys the float16 attention keeps (more idle)
_ALIGN = 64
_MAX_NODES = 8192


class _LayerHandles:
    """The tensors of one layer's part of the graph whose pointers and sizes change per call."""

    def __init__(self, k_dst, v_dst, k, v, mask, cos, sin, writes):
        self.k_dst, self.v_dst, self.k, self.v = k_dst.contents, v_dst.contents, k.contents, v.contents
        self.mask = None if mask is None else mask.contents
        self.cos, self.sin = cos.contents, sin.contents
        self.writes = [w.contents for w in writes]  # the copies to DecodeSlot.writes' addresses, in their order
        self.layout: tuple | None = None  # what `point` last pointed the tensors at

    def point(self, layout: tuple, n_kv: int, n_heads: int, column_bytes: int) -> None:
        """Bases and strides that change only when a buffer does: the context's K and V (capacity columns per KV
        head, `column_bytes` each), the mask, the rows the step's K, V and Q are copied to. Per step only pointers
        and lengths move."""
        k_ptr, v_ptr, capacity, mask, write_rows, _ = layout
        head_bytes = capacity * column_bytes
        for dst in (self.k_dst, self.v_dst):
            dst.nb[1] = head_bytes
            dst.nb[2] = dst.nb[3] = head_bytes * n_kv
        for t, ptr in ((self.k, k_ptr), (self.v, v_ptr)):
            t.data = ptr
            t.nb[2] = head_bytes
            t.nb[3] = head_bytes * n_kv
        for node, (row_bytes, rows) in zip(self.writes, write_rows):
            node.nb[1] = row_bytes
            node.nb[2] = node.nb[3] = row_bytes * rows
        if self.mask is not None:
            mask_ptr, mask_cols = mask
            self.mask.data = mask_ptr
            self.mask.nb[1] = self.mask.nb[2] = mask_cols * 2
            self.mask.nb[3] = mask_cols * 2 * n_heads
        self.layout = layout

    def step_fields(self, column_bytes: int, head_dim: int, write_types: tuple[int, ...]) -> list[tuple[int, int]]:
        """(address, increment) of each field a step one column on changes: the context column's K and V addresses,
        the context's length, the rope rows, the write addresses, the mask's length."""
        def at(t, name: str, i: int | None = None) -> int:
            return ctypes.addressof(t) + getattr(_Tensor, name).offset + (0 if i is None else 8 * i)
        row = self.layout[5]  # bytes between the rope tables' rows
        fields = [(at(self.k_dst, "data"), column_bytes), (at(self.v_dst, "data"), column_bytes),
                  (at(self.k, "ne", 1), 1), (at(self.v, "ne", 1), 1), (at(self.cos, "data"), row),
                  (at(self.sin, "data"), row)]
        fields += [(at(node, "data"), head_dim * (2 if kind == _F16 else 4)) for node, kind in zip(self.writes, write_types)]
        if self.mask is not None:
            fields.append((at(self.mask, "ne", 0), 1))
        return fields


class _DecodeGraph:
    """The graph for one combination of masked layers (a layer whose context holds duplicate copies of retrieved
    tokens attends through a mask), with K and V rounded to float16 or not, and with the step's K, V and Q also
    copied where the memory keeps them (`writes`: the ggml types of DecodeSlot.write_dtypes) or not."""

    def __init__(self, owner: "GgmlDecoder", round_kv: bool, masked: tuple[bool, ...], writes: tuple[int, ...] = (),
                 half: bool = False):
        g = lib()
        o = owner
        size = _MAX_NODES * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(_MAX_NODES, False) + 4096
        self.ctx = g.ggml_init(_InitParams(size, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        ctx = self.ctx
        self.round_kv, self.write_types = round_kv, writes
        # A float16 context, attended by edgectx.kernels.cpu_attention's ops; else float32 and ggml's flash attention
        self.half = half
        self.column_bytes = owner.head_dim * (2 if half else 4)  # one key's row in the context
        self.graph = g.ggml_new_graph_custom(ctx, _MAX_NODES, False)
        self.x = g.ggml_new_tensor_2d(ctx, _F32, o.dim, 1)
        self.layers: list[_LayerHandles] = []
        copies: list = []
        x = self.x
        for i, (layer, has_mask) in enumerate(zip(o.layers, masked)):
            x = self._layer(o, layer, i, x, has_mask, copies)
        if o.lm_parts:
            h = self._normed(x, o.norm, o.eps)
            self.logits = []
            for part in o.lm_parts:
                y = product(ctx, self.graph, part, h, 1, copies)
                g.ggml_build_forward_expand(self.graph, y)
                self.logits.append(y.contents)
        else:
            g.ggml_build_forward_expand(self.graph, x)
            self.logits = [x.contents]
        self._place()
        self.plan: _CPlan | None = None
        self.points = 0  # calls of a layer's `point` so far: what `step_on` was planned at
        self._step_on: tuple | None = None  # step_on's: (points, int64 view of the structs' memory, fields, increments)

    def _normed(self, x, weight: torch.Tensor, eps: float):
        g = lib()
        v = g.ggml_new_tensor_1d(self.ctx, _F32, weight.numel())
        v.contents.data = weight.data_ptr()
        return g.ggml_mul(self.ctx, g.ggml_rms_norm(self.ctx, x, eps), v)

    def _rotate(self, t, n_heads: int, head_dim: int, cos, sin):
        """t (head_dim, n_heads) contiguous -> t * cos + swap_halves(t) * signed_sin (Rope.rotate's ops)."""
        g, ctx, half = lib(), self.ctx, head_dim // 2
        first = g.ggml_view_2d(ctx, t, half, n_heads, head_dim * 4, 0)
        second = g.ggml_view_2d(ctx, t, half, n_heads, head_dim * 4, half * 4)
        swapped = g.ggml_concat(ctx, second, first, 0)
        return g.ggml_add(ctx, g.ggml_mul(ctx, t, cos), g.ggml_mul(ctx, swapped, sin))

    def _at(self, address: int, cols: int, rows: int):
        """A (cols, rows) float32 tensor over memory at `address` (a buffer that earlier nodes write)."""
        t = lib().ggml_new_tensor_2d(self.ctx, _F32, cols, rows)
        t.contents.data = address
        return t

    def _layer(self, o: "GgmlDecoder", layer: GgmlLayer, i: int, x, has_mask: bool, copies: list):
        g, ctx, graph = lib(), self.ctx, self.graph
        d, n_heads, n_kv = o.head_dim, o.n_heads, o.n_kv
        h = self._normed(x, layer.attn_norm, layer.eps)
        # Q, K and V land in the caller's buffer (row i): the memory records them after the step.
        row = o.qkv.data_ptr() + i * o.qkv.shape[1] * 4
        offset = 0
        for part in layer.qkv:
            y = product(ctx, graph, part, h, 1, copies)
            y.contents.data = row + offset * 4
            g.ggml_build_forward_expand(graph, y)
            offset += part.rows
        if layer.q_norm is not None:  # qwen3: each head's Q and K normalized in the buffer before anything reads them
            for at, heads, weight in ((row, n_heads, layer.q_norm), (row + n_heads * d * 4, n_kv, layer.k_norm)):
                normed = self._normed(self._at(at, d, heads), weight, layer.eps)
                g.ggml_build_forward_expand(graph, g.ggml_cpy(ctx, normed, self._at(at, d, heads)))
        # Views of the buffer over the products' outputs, whichever of them wrote it (read after them: nodes run in
        # order): Q (d, n_heads), then K and V as one (d, 2 n_kv), K heads first
        q, kv = self._at(row, d, n_heads), self._at(row + n_heads * d * 4, d, 2 * n_kv)
        if self.round_kv:  # the memory records K and V as stored: the rounded values go back into the buffer
            stored = g.ggml_cast(ctx, kv, _F16)
            kv = g.ggml_cpy(ctx, g.ggml_cast(ctx, stored, _F32), kv)
        else:
            stored = kv
        g.ggml_build_forward_expand(graph, kv)
        k, v = (g.ggml_view_2d(ctx, kv, d, n_kv, d * 4, j * n_kv * d * 4) for j in (0, 1))
        cos = g.ggml_new_tensor_2d(ctx, _F32, d, 1)
        sin = g.ggml_new_tensor_2d(ctx, _F32, d, 1)
        # Q and K rotated together: the buffer's first n_heads + n_kv rows, K rounded by now
        qk_rot = self._rotate(self._at(row, d, n_heads + n_kv), n_heads + n_kv, d, cos, sin)
        q_rot = g.ggml_view_2d(ctx, qk_rot, d, n_heads, d * 4, 0)
        k_rot = g.ggml_view_2d(ctx, qk_rot, d, n_kv, d * 4, n_heads * d * 4)
        if self.round_kv:
            k_rot = g.ggml_cast(ctx, k_rot, _F16)
        # The new column of the context, (d, n_kv) with the context's head stride (set per call).
        # (A copy's node is a view of its destination: the node is what ggml writes through.)
        context = _F16 if self.half else _F32
        k_dst = g.ggml_cpy(ctx, k_rot, g.ggml_new_tensor_2d(ctx, context, d, n_kv))
        v_dst = g.ggml_cpy(ctx, v, g.ggml_new_tensor_2d(ctx, context, d, n_kv))
        g.ggml_build_forward_expand(graph, k_dst)
        g.ggml_build_forward_expand(graph, v_dst)
        # K and V as stored (before RoPE) into the resident tier and the host store (K rows then V rows, evenly
        # spaced in both), Q into the recent queries: copies whose destination is pointed per call, like the column
        writes = []
        for src, rows, kind in zip((stored, stored, q), (2 * n_kv, 2 * n_kv, n_heads), self.write_types):
            node = g.ggml_cpy(ctx, src, g.ggml_new_tensor_2d(ctx, kind, d, rows))
            g.ggml_build_forward_expand(graph, node)
            writes.append(node)
        # The whole context, read after the writes above (nodes run in order): (d, length, n_kv), set per call.
        k_all = g.ggml_new_tensor_3d(ctx, context, d, 1, n_kv)
        v_all = g.ggml_new_tensor_3d(ctx, context, d, 1, n_kv)
        mask = g.ggml_new_tensor_3d(ctx, _F16, 1, 1, n_heads) if has_mask else None
        if self.half:  # each thread a share of the keys, then their partial results combined (cpu_attention.c)
            partial, reduce = cpu_attention.ops()
            args = (q_rot, k_all, v_all) + ((mask,) if mask is not None else ())
            parts = g.ggml_custom_4d(ctx, _F32, d + 2, n_heads, _MAX_PARTS, 1, (_TensorP * len(args))(*args), len(args),
                                     partial, _ALL_THREADS, None)
            attn = g.ggml_custom_4d(ctx, _F32, d, n_heads, 1, 1, (_TensorP * 1)(parts), 1, reduce, _ALL_THREADS, None)
        else:
            attn = g.ggml_flash_attn_ext(ctx, g.ggml_reshape_3d(ctx, q_rot, d, 1, n_heads), k_all, v_all, mask,
                                         d ** -0.5, 0.0, 0.0)
            g.ggml_flash_attn_ext_set_prec(attn, _PREC_F32)
        attn = g.ggml_reshape_2d(ctx, attn, n_heads * d, 1)
        hidden = None
        for part in layer.o:
            y = product(ctx, graph, part, attn, 1, copies)
            hidden = y if hidden is None else g.ggml_add(ctx, hidden, y)
        hidden = g.ggml_add(ctx, hidden, x)  # the residual after attention
        n = self._normed(hidden, layer.ffn_norm, layer.eps)
        act = g.ggml_swiglu_split(ctx, product(ctx, graph, layer.gate, n, 1, copies),
                                  product(ctx, graph, layer.up, n, 1, copies))
        out = g.ggml_add(ctx, product(ctx, graph, layer.down, act, 1, copies), hidden)
        self.layers.append(_LayerHandles(k_dst, v_dst, k_all, v_all, mask, cos, sin, writes))
        return out

    def _place(self) -> None:
        """Give every computed node without a place one in a buffer of its own (views follow their source)."""
        g = lib()
        nodes = [g.ggml_graph_node(self.graph, i).contents for i in range(g.ggml_graph_n_nodes(self.graph))]
        sizes, total = [], 0
        for t in nodes:
            if t.view_src or t.data:
                sizes.append(None)
                continue
            sizes.append(total)
            total += (g.ggml_nbytes(ctypes.pointer(t)) + _ALIGN - 1) // _ALIGN * _ALIGN
        self.scratch = torch.empty(total + _ALIGN, dtype=torch.uint8)
        base = (self.scratch.data_ptr() + _ALIGN - 1) // _ALIGN * _ALIGN
        for t, offset in zip(nodes, sizes):
            if offset is not None:
                t.data = base + offset
            elif t.view_src and not t.data:
                src = ctypes.cast(t.view_src, ctypes.POINTER(type(t))).contents
                if src.data:  # else a view of a tensor pointed per call (a context column): pointed with it
                    t.data = src.data + t.view_offs

    def __del__(self):
        if ggml_cpu._lib is not None and getattr(self, "ctx", None):
            ggml_cpu._lib.ggml_free(self.ctx)
            self.ctx = None


@functools.cache
def _layout_agrees() -> bool:
    """Whether the C ops read ggml's tensor struct as these bindings do (`_Tensor`); one warning if not."""
    theirs = cpu_attention.tensor_layout()
    ours = (ctypes.sizeof(_Tensor), _Tensor.src.offset, _Tensor.data.offset)
    if theirs is not None and theirs != ours:
        log.warning("edgectx: the CPU decode attention reads ggml's tensors as %s, the bindings as %s: it stays off.",
                    theirs, ours)
    return theirs == ours


_GGML_TYPES = {torch.float32: _F32, torch.float16: _F16}


def _write_types(dtypes: tuple[torch.dtype, ...]) -> tuple[int, ...]:
    """The ggml types of a slot's `write_dtypes` (what its graph copies into), () if none or one it cannot write."""
    if not dtypes or any(t not in _GGML_TYPES for t in dtypes):
        return ()
    return tuple(_GGML_TYPES[t] for t in dtypes)


class GgmlDecoder:
    """One-token steps of a model whose every layer is a `GgmlLayer`, attention included (module docstring)."""

    KEEP = 4  # graphs kept, one per combination of masked layers

    def __init__(self, layers: list[GgmlLayer], n_heads: int, n_kv: int, head_dim: int, norm: torch.Tensor | None,
                 eps: float, lm_parts: list[QuantizedMatrix] | None):
        if head_dim % 2 or any(layer.qkv_bias is not None for layer in layers):
            raise ValueError("the fused decode step needs an even head size and no Q/K/V bias")
        self.layers, self.eps = layers, float(eps)
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.dim = layers[0].dim
        self.norm = None if norm is None else norm.detach().float().contiguous().clone()
        self.lm_parts = list(lm_parts or [])
        self.vocab = sum(p.rows for p in self.lm_parts)
        self.qkv = torch.empty(len(layers), layers[0].qkv_rows, dtype=torch.float32)  # valid until the next call
        self.stack = layers[0].stack  # its lock: one ggml call at a time across the model's graphs
        self._graphs: dict[tuple, _DecodeGraph] = {}
        self._work = torch.empty(0, dtype=torch.uint8)
        self._last: tuple | None = None  # (graph, weak reference to the memory, its step count) of the last step run

    @property
    def reads_half(self) -> bool:
        """Whether a slot's context may be float16 (edgectx.kernels.cpu_attention's ops run here, for this shape):
        what the memory then assembles (ContextMemory's `context_dtype`)."""
        return cpu_attention.supports(self.n_heads, self.n_kv, self.head_dim) and _layout_agrees()

    def _graph(self, round_kv: bool, masked: tuple[bool, ...], writes: tuple[int, ...], half: bool) -> _DecodeGraph:
        key = (round_kv, masked, writes, half)
        graph = self._graphs.get(key)
        if graph is None:
            if half and not self.reads_half:
                raise ValueError("a float16 context needs edgectx.kernels.cpu_attention, which is off here")
            if len(self._graphs) >= self.KEEP:
                self._graphs.pop(next(iter(self._graphs)))
            graph = self._graphs[key] = _DecodeGraph(self, round_kv, masked, writes, half)
        return graph

    def __call__(self, x: torch.Tensor, slots: list, step: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, dim): the token's embedding, `slots`: each layer's edgectx.model.kv.DecodeSlot -> logits
        (1, vocab) (or the last hidden state (1, dim) without an output layer), and Q, K, V pre-RoPE per layer
        (n_layers, qkv rows), K and V as the memory stores them. `step`: (memory, its step count), for `again`."""
        x = x.float().contiguous()
        dtypes = slots[0].write_dtypes  # one tuple that the memory's layers share: one graph copies alike in each
        writes = _write_types(dtypes) if all(s.writes is not None and s.write_dtypes is dtypes for s in slots) else ()
        if not writes:
            for s in slots:  # the memory copies them itself
                s.writes = None
        with self.stack.lock:
            half = slots[0].k.dtype == torch.float16
            gr = self._graph(slots[0].rounded, tuple(s.mask is not None for s in slots), writes, half)
            column = gr.column_bytes
            for h, s in zip(gr.layers, slots):
                layout, start = s.layout, s.start
                if h.layout is not layout:  # the context (or a tier) was rebuilt or grew: its strides and bases
                    h.point(layout, self.n_kv, self.n_heads, column)
                    gr.points += 1
                h.cos.data = s.cos
                h.sin.data = s.sin
                h.k_dst.data = layout[0] + start * column
                h.v_dst.data = layout[1] + start * column
                h.k.ne[1] = h.v.ne[1] = start + 1
                if s.writes is not None:
                    for node, ptr in zip(h.writes, s.writes):
                        node.data = ptr
                if h.mask is not None:
                    h.mask.ne[0] = start + 1
            out = self._run(gr, x)
            qkv = self.qkv.clone()  # the buffer is the next step's (maybe another engine's on this model)
            self._last = None if step is None else (gr, weakref.ref(step[0]), step[1])
        return out, qkv

    def again(self, x: torch.Tensor, step: tuple) -> torch.Tensor | None:
        """The next step of the memory whose step `step` (memory, its step count) follows the last one run, when every
        layer's context, tiers and rope row are where the last step left them, one column on (the memory says so:
        ContextMemory.steady_key): the same graph with every pointer and length one column on, a handful of µs instead of
        the slots' 30 layers of bookkeeping. -> the logits (as `__call__`), or None: this decoder's last step was
        another's (run `__call__`). Q, K and V are where the last step's slots said, one column on."""
        x = x.float().contiguous()
        with self.stack.lock:  # the check too: another thread's step may re-point the graph meanwhile
            last = self._last
            if last is None or last[1]() is not step[0] or last[2] != step[1] - 1:
                return None
            gr = last[0]
            plan = gr._step_on
            if plan is None or plan[0] != gr.points:  # the fields and increments of the layouts pointed now
                fields = [f for h in gr.layers for f in h.step_fields(gr.column_bytes, self.head_dim, gr.write_types)]
                low = min(a for a, _ in fields)
                span = (max(a for a, _ in fields) - low) // 8 + 1
                memory = np.frombuffer((ctypes.c_int64 * span).from_address(low), dtype=np.int64)
                plan = gr._step_on = (gr.points, memory, np.array([(a - low) // 8 for a, _ in fields], dtype=np.intp),
                                      np.array([inc for _, inc in fields], dtype=np.int64))
            _, memory, where, increments = plan
            memory[where] += increments
            out = self._run(gr, x, replan=False)
            self._last = (gr, last[1], step[1])
        return out

    def _run(self, gr: _DecodeGraph, x: torch.Tensor, replan: bool = True) -> torch.Tensor:
        """Compute `gr` (pointed) on x (1, dim) -> the logits (1, vocab), or the last hidden state."""
        gr.x.contents.data = x.data_ptr()
        out = torch.empty(1, self.vocab or self.dim, dtype=torch.float32)
        offset = out.data_ptr()
        for y, part in zip(gr.logits, self.lm_parts or [None]):
            y.data = offset
            offset += (part.rows if part is not None else self.dim) * 4
        self._compute(gr, replan)
        return out

    def _compute(self, gr: _DecodeGraph, replan: bool = True) -> None:
        """Compute `gr`. `replan=False`: the last plan holds (only lengths moved, which no work size depends on)
        unless the thread count or the shared work buffer changed (planning cost 70 µs a step on the caches a step
        leaves)."""
        g = lib()
        threads = ggml_cpu.threads()
        if replan or gr.plan is None or gr.plan.n_threads != threads or gr.plan.work_data != self._work.data_ptr():
            gr.plan = g.ggml_graph_plan(gr.graph, threads, None)
            if gr.plan.work_size > self._work.numel():
                self._work = torch.empty(gr.plan.work_size + 4096, dtype=torch.uint8)
            gr.plan.work_data = self._work.data_ptr()
        status = g.ggml_graph_compute(gr.graph, ctypes.byref(gr.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
