"""Retrieved blocks read straight from the pinned host store by a Triton kernel, with ids that stay on the device.

A prefill chunk past the budget retrieves blocks for every layer. Copied the usual way, the host must know which
blocks to copy: it reads the ids back from the GPU (a sync per layer, issue 21) and gathers them through a pinned
buffer. Pinned host memory is mapped into the GPU's address space (unified addressing: the device address of
memory from cudaHostAlloc is its host address), so a kernel can read it over the bus itself. Here program
(KV head h, selected block j, row tile) reads block `blocks[h, j]`'s K and V for head h from its host segment and
writes them into columns [j * block_size, (j + 1) * block_size) of head h's outputs. The segments are separate
allocations: the kernel takes the first as its base pointer and each segment's distance from it in elements.

    gather_blocks(segments[0], offsets, blocks, k_out, v_out, segment_blocks=32)

The oracle is edgectx.memory.block_store.HostBlockStore's torch gather; `probe` checks one launch against it on
a real GPU before the memory relies on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=("k_sel", "segment_blocks", "s_kh", "s_kt", "s_vh", "s_vt"))
def _gather_kernel(BASE, OFFSETS, BLOCKS, K_OUT, V_OUT, k_sel, segment_blocks, s_kh, s_kt, s_vh, s_vt,
                   N_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROWS: tl.constexpr):
    h = tl.program_id(0)
    j = tl.program_id(1)
    tile = tl.program_id(2)
    block = tl.load(BLOCKS + h * k_sel + j).to(tl.int64)
    seg = block // segment_blocks
    b = block % segment_blocks
    start = tl.load(OFFSETS + seg)  # the segment's first element, counted from BASE
    rows = tile * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    ok = (rows < BLOCK_SIZE)[:, None] & (d < HEAD_DIM)[None, :]
    # segment layout (blocks, K|V, n_kv, block_size, head_dim): K of (b, h), then V N_KV heads further
    head_elems = BLOCK_SIZE * HEAD_DIM
    src = BASE + start + (b * 2 * N_KV + h) * head_elems + rows[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(src, mask=ok)
    v = tl.load(src + N_KV * head_elems, mask=ok)
    col = (j * BLOCK_SIZE + rows).to(tl.int64)
    tl.store(K_OUT + h * s_kh + col[:, None] * s_kt + d[None, :], k.to(K_OUT.dtype.element_ty), mask=ok)
    tl.store(V_OUT + h * s_vh + col[:, None] * s_vt + d[None, :], v.to(V_OUT.dtype.element_ty), mask=ok)


def segment_offsets(segments: list[torch.Tensor]) -> list[int]:
    """Each segment's first element counted from the first segment's, in elements (the kernel's OFFSETS)."""
    base, size = segments[0].data_ptr(), segments[0].element_size()
    out = []
    for s in segments:
        delta = s.data_ptr() - base
        if delta % size:
            raise ValueError("host segments are not aligned to their element size")
        out.append(delta // size)
    return out


def gather_blocks(base: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, k_out: torch.Tensor,
                  v_out: torch.Tensor, segment_blocks: int) -> None:
    """K and V of each KV head's blocks `blocks` (n_kv, k) into k_out and v_out (n_kv, k * block_size, head_dim),
    from segments (blocks, 2, n_kv, block_size, head_dim) that start `offsets` elements from `base`'s first."""
    n_kv, k_sel = blocks.shape
    _, _, n_kv_store, block_size, head_dim = base.shape
    if n_kv != n_kv_store or k_out.shape != (n_kv, k_sel * block_size, head_dim) or v_out.shape != k_out.shape:
        raise ValueError(f"shapes do not match: blocks {tuple(blocks.shape)}, store {tuple(base.shape)}, "
                         f"outputs {tuple(k_out.shape)} {tuple(v_out.shape)}")
    if k_sel == 0:
        return
    if k_out.stride(-1) != 1 or v_out.stride(-1) != 1:
        raise ValueError("the outputs' last dimension must be contiguous")
    blocks = blocks.contiguous()
    rows = min(block_size, max(1, 4096 // head_dim))
    grid = (n_kv, k_sel, triton.cdiv(block_size, rows))
    _gather_kernel[grid](base, offsets, blocks, k_out, v_out, k_sel, segment_blocks,
                         k_out.stride(0), k_out.stride(1), v_out.stride(0), v_out.stride(1),
                         N_KV=n_kv, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                         BLOCK_D=triton.next_power_of_2(head_dim), ROWS=triton.next_power_of_2(rows))
