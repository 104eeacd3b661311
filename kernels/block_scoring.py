"""Block scoring for retrieval (InfLLM) in Triton: a query chunk against every block's representative key.

The rule is edgectx.memory.retrieval.select_blocks': per KV head, the chunk's mean pre-RoPE query summed over the
head's query group, dotted with each block's representative key, divided by sqrt(d) * group. Program
(h, t) reduces the group's queries to that one vector and scores a tile of BLOCK_B blocks against it, in
float32 whatever the input dtype. The torch oracle is
`edgectx.kernels.reference.block_scores_reference`; top-k and the softmax stay in torch (tiny).

    scores = block_scores(q, store.representatives, n_eligible=40)   # (n_kv, 40) float32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Integers that change with the context (blocks eligible, the output's stride) or between prefill and decode
# (tokens in the query): runtime arguments, so that growing the context never compiles the kernel again.
SCORES_RUNTIME_INTS = ("n_tokens", "n_blocks", "s_qh", "s_ok")


@triton.jit(do_not_specialize=SCORES_RUNTIME_INTS)
def _scores_kernel(Q, R, OUT, n_tokens, n_blocks, scale, s_qh, s_qt, s_rb, s_rk, s_ok,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    kv = tl.program_id(0)
    tile = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_sum = tl.zeros([BLOCK_D], tl.float32)
    for g in tl.static_range(GROUP):
        for t0 in range(0, n_tokens, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(Q + (kv * GROUP + g) * s_qh + t[:, None] * s_qt + d[None, :],
                        mask=(t < n_tokens)[:, None] & d_ok[None, :], other=0.0)
            q_sum += tl.sum(x.to(tl.float32), 0)
    q_group = q_sum * scale  # scale folds the mean over tokens, 1/sqrt(d) and 1/group
    b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_blocks
    reps = tl.load(R + b[:, None] * s_rb + kv * s_rk + d[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
    scores = tl.sum(reps.to(tl.float32) * q_group[None, :], 1)  # (BLOCK_B,)
    tl.store(OUT + kv * s_ok + b, scores, mask=b_ok)


def block_scores(q: torch.Tensor, representatives: torch.Tensor, n_eligible: int,
                 block_b: int = 128, block_t: int = 32) -> torch.Tensor:
    """Scores (n_kv, n_eligible) float32 of the first `n_eligible` blocks for queries q (n_heads, T, d)
    against representatives (n_blocks, n_kv, d)."""
    n_heads, n_tokens, head_dim = q.shape
    n_kv = representatives.shape[1]
    if n_heads % n_kv or representatives.shape[-1] != head_dim:
        raise ValueError(f"shapes do not group: q {tuple(q.shape)}, representatives {tuple(representatives.shape)}")
    group = n_heads // n_kv
    q = q if q.stride(-1) == 1 else q.contiguous()
    reps = representatives[:n_eligible]
    reps = reps if reps.stride(-1) == 1 else reps.contiguous()
    out = torch.empty(n_kv, n_eligible, device=q.device, dtype=torch.float32)
    if n_eligible <= 0:
        return out
    scale = 1.0 / (n_tokens * head_dim**0.5 * group)
    grid = (n_kv, triton.cdiv(n_eligible, block_b))
    _scores_kernel[grid](q, reps, out, n_tokens, n_eligible, scale, q.stride(0), q.stride(1),
                         reps.stride(0), reps.stride(1), out.stride(0),
                         GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                         BLOCK_T=block_t, BLOCK_B=block_b)
    return out
