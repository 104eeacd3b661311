"""Decode attention over the selected context, flash-decoding style, in Triton.

One decode query per head attends over a grouped KV context (GQA: query heads h*group .. h*group+group-1
read KV head h). The context is split along its length: program (h, s) runs an online softmax for all the
query heads of KV head h over slice s and writes its (max, sum, weighted values) partials; a second small
kernel merges the splits (Dao et al., Flash-Decoding, 2023). Keys may be given pre-RoPE with a position
each: they are then rotated in the kernel from the half cos/sin tables (half-split rotation of the first
rope_dim dims, partial rotary included), so a context whose positions change (edgectx renumbers the
selected context) needs no rotated copy. Keys are dropped per KV head by a `valid` mask or a length.

The torch oracle is `edgectx.kernels.reference.decode_attention_reference`; tests/test_kernels.py compares
the two (through Triton's interpreter on a CPU, compiled on a GPU).

    out = decode_attention(q, k, v)                                     # keys already rotated
    out = decode_attention(q, k_pre, v, positions=pos, q_position=900, cos=cos, sin=sin, valid=valid)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_NEG = tl.constexpr(-1.0e30)  # running max before any key: finite, so an empty split gives exp2(0) = 1, never NaN
LOG2E = 1.4426950408889634


# Integers that change from one decode step to the next. Triton specializes integer arguments on their value
# (== 1, divisible by 16) and compiles once per combination, about a second each: left specialized, a timed decode
# would compile again whenever the context length crossed a multiple of 16. Listed here, they are plain runtime
# arguments, and a kernel compiles once per shape class (dtype, group, head_dim, rotation, lengths).
SPLIT_RUNTIME_INTS = ("q_position", "n_keys", "split_len", "n_splits", "has_valid", "s_kh", "s_vh", "s_ph", "s_mh")
MERGE_RUNTIME_INTS = ("n_splits",)
MERGE_SPLITS_BLOCK = 32  # splits the merge reads at a time: 32 x 128 floats a tile


@triton.jit(do_not_specialize=SPLIT_RUNTIME_INTS)
def _split_kernel(Q, K, V, POS, VALID, LENS, COS, SIN, M_OUT, L_OUT, ACC_OUT,
                  q_position, scale_log2, n_keys, split_len, n_splits, has_valid,
                  s_qh, s_kh, s_kn, s_vh, s_vn, s_ph, s_pn, s_mh, s_mn, s_tab,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  ROPE_HALF: tl.constexpr, ROTATE: tl.constexpr, HAS_LENS: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, KV_ALIGN: tl.constexpr):
    kv = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    # Half-split rotation: dim i < half pairs with i + half (sign -), dim i in [half, 2 half) with i - half (+).
    rot = d < 2 * ROPE_HALF
    first = d < ROPE_HALF
    partner = tl.where(rot, tl.where(first, d + ROPE_HALF, d - ROPE_HALF), d)
    freq = tl.where(first, d, d - ROPE_HALF)

    q_ptr = Q + (kv * GROUP + g)[:, None] * s_qh
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + d[None, :], mask=q_mask, other=0.0).to(tl.float32)  # (GROUP_PAD, BLOCK_D)
    if ROTATE:
        q_partner = tl.load(q_ptr + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q_cos = tl.load(COS + q_position * s_tab + freq, mask=rot, other=1.0)
        q_sin = tl.load(SIN + q_position * s_tab + freq, mask=rot, other=0.0)
        q = q * q_cos[None, :] + q_partner * tl.where(first, -q_sin, q_sin)[None, :]
    q = (q * scale_log2).to(K.dtype.element_ty).to(DOT)  # scores come out in log2 units: exp2 below

    n_valid = n_keys
    if HAS_LENS:
        n_valid = tl.minimum(n_keys, tl.load(LENS + kv))
    start = split * split_len
    end = tl.minimum(start + split_len, n_valid)
    m_i = tl.full([GROUP_PAD], _NEG, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        kd_mask = n_ok[:, None] & d_ok[None, :]
        # the head's first key: a multiple of KV_ALIGN elements from K (16 where both head strides are), which lets
        # the compiler load 16 bytes at a time (unspecialized, the head strides left it 2-byte loads)
        k_ptr = K + tl.multiple_of(kv * s_kh, KV_ALIGN) + n[:, None] * s_kn
        k = tl.load(k_ptr + d[None, :], mask=kd_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if ROTATE:
            k_partner = tl.load(k_ptr + partner[None, :], mask=kd_mask, other=0.0).to(tl.float32)
            pos = tl.load(POS + kv * s_ph + n * s_pn, mask=n_ok, other=0)
            tab_mask = n_ok[:, None] & rot[None, :]
            c = tl.load(COS + pos[:, None] * s_tab + freq[None, :], mask=tab_mask, other=1.0)
            s = tl.load(SIN + pos[:, None] * s_tab + freq[None, :], mask=tab_mask, other=0.0)
            s = tl.where(first[None, :], -s, s)
            k = (k.to(tl.float32) * c + k_partner * s).to(K.dtype.element_ty)
        k = k.to(DOT)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (GROUP_PAD, BLOCK_N)
        # a runtime flag, not a constexpr: steps with and without duplicate keys share one compiled kernel; without
        # a mask the load is fully masked off and reads nothing
        use_mask = (n * 0 + has_valid) != 0  # (BLOCK_N,): a block tensor, as tl.load's mask must be
        flags = tl.load(VALID + kv * s_mh + n * s_mn, mask=n_ok & use_mask, other=1)
        keep = n_ok & (flags != 0)
        qk = tl.where(keep[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = V + tl.multiple_of(kv * s_vh, KV_ALIGN) + n[:, None] * s_vn
        v = tl.load(v_ptr + d[None, :], mask=kd_mask, other=0.0).to(DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DOT), v, input_precision=PRECISION)
        m_i = m_new

    row = (kv * n_splits + split) * GROUP_PAD + g  # partials laid out (n_kv, n_splits, GROUP_PAD[, BLOCK_D])
    tl.store(M_OUT + row, m_i)
    tl.store(L_OUT + row, l_i)
    tl.store(ACC_OUT + row[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit(do_not_specialize=MERGE_RUNTIME_INTS)
def _merge_kernel(M_IN, L_IN, ACC_IN, OUT, n_splits, s_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  SPLITS_BLOCK: tl.constexpr):
    head = tl.program_id(0)
    kv = head // GROUP
    g = head % GROUP
    d = tl.arange(0, BLOCK_D)
    # The splits SPLITS_BLOCK at a time, merged as they come (a running max): a tile of every split at once was
    # (next power of two of the splits) x BLOCK_D floats, 512 x 128 for one KV head on 132 SMs, spilled to memory
    m_run = tl.full([1], _NEG, tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc_run = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, SPLITS_BLOCK):
        sp = s0 + tl.arange(0, SPLITS_BLOCK)
        sp_ok = sp < n_splits
        row = (kv * n_splits + sp) * GROUP_PAD + g
        m = tl.load(M_IN + row, mask=sp_ok, other=float("-inf"))
        l = tl.load(L_IN + row, mask=sp_ok, other=0.0)
        acc = tl.load(ACC_IN + row[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))  # finite: a split's max is at least _NEG
        carry = tl.exp2(m_run - m_new)  # (1,)
        w = tl.exp2(m - m_new)  # each split's weight relative to the largest max so far
        l_run = l_run * carry + tl.sum(w * l, 0)
        acc_run = acc_run * carry + tl.sum(w[:, None] * acc, 0)
        m_run = m_new
    out = acc_run / tl.where(l_run > 0, l_run, 1.0)  # a head with no key: zeros
    tl.store(OUT + head * s_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype the dot products take: the input's, except bfloat16 under Triton's interpreter, whose tl.dot
    multiplies bfloat16 bit patterns as integers (triton 3.9); there the bfloat16-rounded values go in as
    float32, which gives the same products."""
    if dtype == torch.bfloat16 and isinstance(_split_kernel, InterpretedFunction):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits keep the merge exercised


def max_splits(n_kv: int, device: torch.device) -> int:
    """The most splits `plan_splits` gives on `device`, whatever the context length."""
    return triton.cdiv(_programs_wanted(device), n_kv)


def plan_splits(n_keys: int, n_kv: int, device: torch.device, block_n: int) -> int:
    """Splits along the context: enough programs to fill the GPU twice over, none shorter than one block."""
    return max(1, min(triton.cdiv(n_keys, block_n), max_splits(n_kv, device)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     positions: torch.Tensor | None = None, q_position: int | None = None,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                     scale: float | None = None, n_splits: int | None = None, block_n: int = 64) -> torch.Tensor:
    """Attention of one query per head, q (n_heads, 1, d) or (n_heads, d), over k, v (n_kv, N, d).

    With `cos`/`sin` (n_positions, rope_dim // 2) float32 tables, q and k are pre-RoPE: keys are rotated at
    `positions` (n_kv, N) or (N,) and the query at `q_position`, inside the kernel (the tables must cover them). `valid` (n_kv, N) bool and
    `lengths` (n_kv,) drop keys per KV head. Softmax and accumulation in float32. -> (n_heads, 1, d), q's dtype.
    """
    n_heads, head_dim = q.shape[0], q.shape[-1]
    n_kv, n_keys = k.shape[0], k.shape[1]
    if n_heads % n_kv or k.shape[-1] != head_dim or v.shape != k.shape:
        raise ValueError(f"shapes do not group: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    group = n_heads // n_kv
    q2 = q.reshape(n_heads, head_dim)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    v = v.to(k.dtype)
    rotate = cos is not None
    dummy_i = torch.empty(1, 1, dtype=torch.int32, device=k.device)  # stands in for an absent input (never read)
    dummy_mask = torch.empty(1, 1, dtype=torch.uint8, device=k.device)  # the mask's own dtype: one signature
    if rotate:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        if not 0 <= int(q_position) < cos.shape[0]:
            raise ValueError(f"q_position {q_position} is outside the {cos.shape[0]}-position rotary tables")
        pos = positions.to(device=k.device).expand(n_kv, n_keys)  # (N,) positions: shared by every head
    else:
        cos = sin = torch.empty(1, 1, dtype=torch.float32, device=k.device)
        pos = dummy_i
    mask = valid.to(torch.bool).view(torch.uint8) if valid is not None else dummy_mask
    lens = dummy_i if lengths is None else lengths if (lengths.device, lengths.dtype) == (k.device, torch.int32) \
        else lengths.to(device=k.device, dtype=torch.int32)  # already right (a captured step's): no call at all

    block_d = triton.next_power_of_2(head_dim)
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    n_splits = n_splits or plan_splits(n_keys, n_kv, k.device, block_n)
    split_len = triton.cdiv(triton.cdiv(max(n_keys, 1), n_splits), block_n) * block_n
    n_splits = max(1, triton.cdiv(n_keys, split_len))
    m_part = torch.empty(n_kv, n_splits, group_pad, device=k.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(n_kv, n_splits, group_pad, block_d, device=k.device, dtype=torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    precision = "ieee" if k.dtype == torch.float32 else None  # exact float32 products, not TF32

    _split_kernel[(n_kv, n_splits)](
        q2, k, v, pos, mask, lens, cos, sin, m_part, l_part, acc_part,
        int(q_position or 0), scale * LOG2E, n_keys, split_len, n_splits, int(valid is not None),
        q2.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pos.stride(0), pos.stride(1),
        mask.stride(0), mask.stride(1), cos.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        ROPE_HALF=cos.shape[1] if rotate else 0, ROTATE=rotate, HAS_LENS=lengths is not None, BLOCK_N=block_n, PRECISION=precision, DOT=_dot_dtype(k.dtype),
        KV_ALIGN=16 if k.stride(0) % 16 == 0 and v.stride(0) % 16 == 0 else 1,
    )
    out = torch.empty(n_heads, 1, head_dim, device=q.device, dtype=q.dtype)
    _merge_kernel[(n_heads,)](
        m_part, l_part, acc_part, out, n_splits, out.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        SPLITS_BLOCK=MERGE_SPLITS_BLOCK,  # not n_splits, which grows with the context: one compiled merge
    )
    return out
