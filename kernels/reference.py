"""Plain torch references for the Triton kernels in this package: the oracles the tests compare against.

Each function states the exact arithmetic its kernel implements, in float32 whatever the input dtype, so a
kernel can be checked on any device (and these run where Triton does not). Rotary tables are the half
tables of a half-split ("NEOX") rotation: `cos`, `sin` of shape (n_positions, rope_dim // 2), with any
attention factor (YaRN mscale) already folded in, as `edgectx.model.rope.Rope` builds them.

    out = decode_attention_reference(q, k_pre, v, positions=pos, q_position=511, cos=cos, sin=sin)
    scores = block_scores_reference(q, representatives, n_eligible=40)   # (n_kv, 40)
"""

from __future__ import annotations

import torch


def rotate_half_split(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim = 2 * cos.shape[1] dims of x (..., n, d) at `positions` (..., n), in float32."""
    half = cos.shape[1]
    x = x.float()
    c, s = cos[positions].float(), sin[positions].float()  # (..., n, half)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half :]), dim=-1)


def key_mask(n_kv: int, n_keys: int, valid: torch.Tensor | None, lengths: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """(n_kv, n_keys) bool: key j of KV head h is attended when valid[h, j] and j < lengths[h]."""
    mask = torch.ones(n_kv, n_keys, dtype=torch.bool, device=device)
    if valid is not None:
        mask &= valid.to(device=device, dtype=torch.bool)
    if lengths is not None:
        mask &= torch.arange(n_keys, device=device)[None, :] < lengths.to(device)[:, None]
    return mask


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               positions: torch.Tensor | None = None, q_position: int | None = None,
                               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                               valid: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """One decode query per head against a grouped KV context, softmax in float32.

    q (n_heads, 1, d) or (n_heads, d); k, v (n_kv, N, d); query heads h*group .. h*group+group-1 read KV
    head h. With `cos`/`sin`, q and k are pre-RoPE: k is rotated at `positions` (n_kv, N) and q at
    `q_position`; without, both are taken as already rotated. `valid` (n_kv, N) bool and `lengths` (n_kv,)
    drop keys per KV head. A head with no key left returns zeros. -> (n_heads, 1, d) in q's dtype.
    """
    n_heads, head_dim = q.shape[0], q.shape[-1]
    n_kv, n_keys = k.shape[0], k.shape[1]
    group = n_heads // n_kv
    qf = q.reshape(n_heads, 1, head_dim).float()
    kf = k.float()
    if cos is not None:
        qpos = torch.full((n_heads, 1), int(q_position), dtype=torch.long, device=q.device)
        qf = rotate_half_split(qf, qpos, cos, sin)
        kf = rotate_half_split(kf, positions.long(), cos, sin)
    scale = head_dim**-0.5 if scale is None else scale
    qg = qf.reshape(n_kv, group, head_dim)
    logits = qg @ kf.transpose(1, 2) * scale  # (n_kv, group, N)
    mask = key_mask(n_kv, n_keys, valid, lengths, q.device)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an all-masked head: zeros, not NaN
    # values of dropped keys left out, not multiplied by zero: past a head's length they may hold anything (the
    # kernel loads none of them), and 0 x NaN is NaN
    out = probs @ v.float().masked_fill(~mask[:, :, None], 0.0)  # (n_kv, group, d)
    return out.reshape(n_heads, 1, head_dim).to(q.dtype)


def block_scores_reference(q: torch.Tensor, representatives: torch.Tensor, n_eligible: int) -> torch.Tensor:
    """Retrieval scores (n_kv, n_eligible) of the first `n_eligible` blocks, in float32.

    The rule of edgectx.memory.retrieval.select_blocks: the chunk's mean pre-RoPE query (q: n_heads, T, d), summed
    over each KV head's query group, dotted with the block's representative key (representatives:
    n_blocks, n_kv, d), divided by sqrt(d) * group.
    """
    n_heads, _, head_dim = q.shape
    n_kv = representatives.shape[1]
    group = n_heads // n_kv
    q_group = q.float().mean(dim=1).reshape(n_kv, group, head_dim).sum(dim=1)  # (n_kv, d)
    reps = representatives[:n_eligible].float()  # (n_blocks, n_kv, d)
    return torch.einsum("kd,bkd->kb", q_group, reps) / (head_dim**0.5 * group)
