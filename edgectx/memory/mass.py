"""Attention mass that queries put on an attention context's columns, for one layer or several stacked: what a
decode step's query attends to (the retrieval record, which citations read), what an eviction's observed queries
attend to (the attention-mass scorer's input), and the mass summed per host block. LayerMemory calls these for
one layer; edgectx.memory.together for all of them at once, one product a layer and the rest stacked.

    mass = step_mass(q_rot, [asm], end)                     # (1, n_kv, end)
    per_block = mass_per_block(mass, idx, memory, n_rows)   # (..., n_blocks)

`memory` is the ContextMemory (edgectx.memory.context, which imports this): its config, rotary tables and counts.
"""

from __future__ import annotations

import torch

from edgectx.memory.block_store import upload
from edgectx.memory.tiers import Assembly


def step_mass(q_rot: torch.Tensor, asms: list[Assembly], end: int) -> torch.Tensor:
    """Attention mass (L, n_kv, end) that decode queries q_rot (L, n_heads, 1, d), rotated, put on each column of
    their contexts `asms` (L of them, columns [0, end) each), summed over each KV head's group of query heads; a
    query sees every valid column. One product a context, the rest once for all of them."""
    n_layers, n_heads, _, head_dim = q_rot.shape
    n_kv = asms[0].k.shape[0]
    qg = q_rot.reshape(n_layers, n_kv, n_heads // n_kv, head_dim) * head_dim**-0.5  # heads h*group.. share KV head h
    logits = qg.new_empty(n_layers, n_kv, n_heads // n_kv, end)
    for i, asm in enumerate(asms):
        torch.matmul(qg[i], asm.k[:, :end].to(qg.dtype).transpose(1, 2), out=logits[i])
    logits = logits.float()
    if any(asm.valid is not None for asm in asms):
        valid = torch.stack([asm.valid[:, :end] if asm.valid is not None
                             else torch.ones(n_kv, end, dtype=torch.bool, device=logits.device) for asm in asms])
        logits.masked_fill_(~valid[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits).sum(dim=2)


def next_positions(memory, asms: list[Assembly]) -> torch.Tensor:
    """(L,) on the device: the position the next token takes in each context, whether the host holds it (an int) or
    the device (a count from a build on the device, not read yet); host ints uploaded without a stall."""
    nexts = [asm.next_position for asm in asms]
    if all(isinstance(p, int) for p in nexts):
        return upload(torch.tensor(nexts), memory.device)
    return torch.stack([p.view(()) if isinstance(p, torch.Tensor) else upload(torch.tensor(p), memory.device)
                        for p in nexts])


def rotated_observers(memory, q_obs: torch.Tensor, asms: list[Assembly], back: torch.Tensor,
                      n_new: int) -> torch.Tensor:
    """The observed queries q_obs (L, n_heads, n_obs, d), pre-RoPE, picked `back` from the newest (n_sel,) and rotated
    at their positions in each layer's context `asms` (the newest of the forward's `n_new` tokens at its last)."""
    n_obs = q_obs.shape[2]
    # Counted back from the newest; in a context whose positions are fewer than the window (a small budget under
    # compact positions) the oldest queries stop at position 0 (indexing with a negative position took a row
    # from the end of the table)
    last = asms[0].next_position if len(asms) == 1 else next_positions(memory, asms)[:, None]  # (one: as held)
    q_pos = (last + (n_new - 1) - back).clamp_(min=0).view(len(asms), -1)  # (L, n_sel)
    bound = max(asm.position_bound(n_new) for asm in asms)
    cos, sin = memory.rope.tables(q_pos, memory.dtype, n_positions=bound)
    return memory.rope.rotate(q_obs[:, :, n_obs - 1 - back], cos[:, None], sin[:, None])


def observed_mass(memory, q_obs: torch.Tensor, asms: list[Assembly], n_keys: int,
                  n_new: int) -> torch.Tensor:
    """Attention mass (L, n_kv, n_keys) that every `observe_stride`th of the observed queries q_obs (L, n_heads,
    n_obs, d) puts on each of the first `n_keys` columns of its layer's context (`asms`), causally by original
    index and within the valid columns, summed over the queries and each KV head's group: LayerMemory._observe for
    L layers at once (a decode step's eviction, edgectx.memory.together.observe), one product a layer."""
    c = memory.config
    n_layers, n_heads, n_obs, head_dim = q_obs.shape
    n_kv = asms[0].k.shape[0]
    back = torch.arange(0, n_obs, c.observe_stride, device=memory.device).flip(0)  # counted back from the newest
    q_rot = rotated_observers(memory, q_obs, asms, back, n_new)
    qg = q_rot.reshape(n_layers, n_kv, -1, head_dim).float()
    # (L, n_kv, group * n_sel, n_keys), each step in place: this runs at every evicting chunk, and the copies of a
    # plain `softmax(logits.masked_fill(...))` cost more than the product (100 against 42 ms a layer for a 512-token
    # chunk over 2,560 keys on 2 CPU threads)
    logits = qg.new_empty(n_layers, n_kv, qg.shape[2], n_keys)
    for i, asm in enumerate(asms):
        torch.baddbmm(qg.new_empty(()), qg[i], asm.k[:, :n_keys].float().transpose(1, 2), beta=0.0,
                      alpha=head_dim**-0.5, out=logits[i])
    end_idx = memory.n_tokens + n_new
    q_idx = (end_idx - 1 - back).repeat(n_heads // n_kv)  # (group * n_sel,)
    idx = asms[0].idx[:, :n_keys][None] if n_layers == 1 else torch.stack([asm.idx[:, :n_keys] for asm in asms])
    blocked = idx[:, :, None, :] > q_idx[None, None, :, None]
    if any(asm.valid is not None for asm in asms):
        valid = torch.stack([asm.valid[:, :n_keys] if asm.valid is not None
                             else torch.ones(n_kv, n_keys, dtype=torch.bool, device=memory.device) for asm in asms])
        blocked |= ~valid[:, :, None, :]
    logits.masked_fill_(blocked, float("-inf"))
    return torch.softmax(logits, dim=-1, out=logits).sum(dim=2)


def mass_per_block(mass: torch.Tensor, idx: torch.Tensor, memory, n_rows: int) -> torch.Tensor:
    """Per completed block (..., n_blocks), the mass (..., n_kv, end) on columns of original indices `idx` (same
    shape), summed over KV heads, per query row of the `n_rows` that gave it. Completed blocks before this forward
    only: a passage of the context, not the query's own tokens. The sinks and everything newer go to bin n_blocks,
    which is dropped (attention parks its spare mass on the sinks whatever the question)."""
    c = memory.config
    n_blocks = memory.n_tokens // c.block_size
    bins = torch.div(idx, c.block_size, rounding_mode="floor").clamp_(max=n_blocks).masked_fill_(idx < c.n_sink, n_blocks)
    per_block = mass.new_zeros(*mass.shape[:-1], n_blocks + 1).scatter_add_(-1, bins, mass)
    return per_block[..., :n_blocks].sum(dim=-2).mul_(1.0 / n_rows)
