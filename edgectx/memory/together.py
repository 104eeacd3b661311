"""The layers' retrievals ahead of a decode step, done together (issue 21; docs/gpu-host-ops.md).

On the device path (CUDA) every operation the host issues is a launch it pays for: one layer at a time, a
retrieval step issued ~87 operations a layer (~2,800 for 32 layers) and an evicting step ~140. Here what every
layer does alike is done once for all of them (`ContextMemory.together`): one block selection over the layers'
stacked queries and representatives; the contexts' columns, duplicates, compact positions and rotation computed
stacked, then written into each layer's own buffers with a gather and foreach copies; one record of what the queries
attend to; and an evicting step's observation of the recent queries and its eviction. Each layer gets exactly what
it would alone (tests/test_retrieval_together.py). Work is done a group of layers at a time, within TOGETHER_BYTES.

    together.prepare_next(memory, due)          # ContextMemory.commit, after a decode step
    observed = together.observe(memory, queries)  # edgectx.memory.graph_step, an evicting step
    together.evict(memory, layers, n_total)     # ContextMemory.commit, an evicting step

`memory` is a ContextMemory and the layers its LayerMemory objects (edgectx.memory.context, which imports this).
"""

from __future__ import annotations

import torch

from edgectx.memory.columns import block_columns, kept_columns, ranks_layers
from edgectx.memory.mass import mass_per_block, next_positions, observed_mass, step_mass
from edgectx.memory.retrieval import select_blocks
from edgectx.memory.tiers import Assembly


# Working memory of what the layers do together, a group of layers at a time: building the contexts takes about 18 MB
# a layer for an 8B model (8 KV heads x ~2,100 columns, whatever the context's length): 3 groups of 14 layers
TOGETHER_BYTES = 256 << 20


def groups(n_layers: int, per_layer_bytes: int) -> list[slice]:
    """The layers [0, n_layers) in groups whose working memory (`per_layer_bytes` a layer) stays within
    TOGETHER_BYTES: what the layers do together, a group at a time."""
    size = max(1, min(n_layers, TOGETHER_BYTES // max(1, per_layer_bytes)))
    return [slice(start, start + size) for start in range(0, n_layers, size)]


def prepare_next(memory, due: list[tuple]) -> None:
    """The retrievals and rebuilds ahead of the next decode step (LayerMemory.prepare_next) of the layers `due`, with
    their queries (n_heads, 1, d) pre-RoPE: the block selection, the contexts and the record made together; layers
    that keep their blocks (a rebuild after an eviction alone) or cannot build together go one at a time."""
    selecting = [(layer, q) for layer, q in due if layer._selects(q)]
    recording, chosen = [], {}
    if len(selecting) > 1:
        layers = [layer for layer, _ in selecting]
        blocks = select(memory, selecting)  # (L, n_kv, k)
        if build(memory, layers, blocks):
            recording, due = selecting, [(layer, q) for layer, q in due if not layer._built_together]
        else:
            chosen = dict(zip(layers, blocks.unbind(0)))
    recording += [(layer, q) for layer, q in due if layer.prepare_next(q, chosen.get(layer))]
    record(memory, sorted(recording, key=lambda item: item[0].layer))


def observe(memory, queries: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """For a decode step whose every layer wrote its column (a captured step: edgectx.memory.graph_step), given
    each layer's query (n_heads, 1, d) pre-RoPE: what each layer that evicts at its commit observes
    (LayerMemory._observe), for all of them at once (one product a layer, the rest stacked); None for a layer that
    does not evict, or where the layers do not allow it (off the device path, in C, or differing): each then
    observes for itself."""
    out: list[torch.Tensor | None] = [None] * len(memory.layers)
    evicting = [layer for layer in memory.layers if layer.evicts(1)] if memory.scorer.observes else []
    if not memory.together or memory.c_ops or len(evicting) < 2:
        return out
    asms = [layer.asm for layer in evicting]
    n_keys = asms[0].length + 1  # the step's own column included
    recent = evicting[0].q_recent.shape[1]  # the queries each layer keeps: the same in every layer, as its tokens
    if any(asm.length + 1 != n_keys for asm in asms) or any(layer.q_recent.shape[1] != recent for layer in evicting):
        return out
    c, n_kv = memory.config, asms[0].k.shape[0]
    window = min(c.n_observe, c.evict_every)  # LayerMemory._observed_queries, stacked
    # a layer's float32 keys, and its logits and mask: (n_kv, every observed query of the group, n_keys)
    rows = memory.spec.n_heads * -(-min(window, recent + 1) // c.observe_stride)
    per_layer = n_kv * n_keys * (evicting[0].resident.head_dim * 4) + rows * n_keys * 5
    for group in groups(len(evicting), per_layer):
        layers = evicting[group]
        q_obs = torch.cat((torch.stack([layer.q_recent[:, -window:] for layer in layers]),
                           torch.stack([queries[layer.layer] for layer in layers])), dim=2)[:, :, -window:]
        for layer, observed in zip(layers, observed_mass(memory, q_obs, asms[group], n_keys, 1).unbind(0)):
            out[layer.layer] = observed
    return out


def select(memory, selecting: list[tuple]) -> torch.Tensor:
    """The blocks (L, n_kv, k) of each layer's query, each layer's own selection (select_blocks) made for all of
    them in one scoring: the layers see the same tokens, so the same eligible blocks and lexical matches."""
    n_eligible, store = selecting[0][0]._n_eligible(), selecting[0][0].store
    lexical = memory.lexical_blocks(n_eligible)
    # a layer's representatives stacked, then in float32: 6 MB at 128K for an 8B model, 50 MB at 1M tokens
    per_layer = n_eligible * store.n_kv_heads * store.head_dim * (store.repr_dtype.itemsize + 4)
    parts = []
    for group in groups(len(selecting), per_layer):
        reps = torch.stack([layer.store.representatives[:n_eligible] for layer, _ in selecting[group]])
        q = torch.stack([q for _, q in selecting[group]])  # (L, n_heads, 1, d) with reps (L, blocks, n_kv, d)
        parts.append(select_blocks(q, reps, n_eligible, memory.config.top_k_blocks, lexical)[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def build(memory, layers: list, blocks: torch.Tensor) -> bool:
    """Each layer's retrieval of `blocks` (L, n_kv, k) taken and its context built, as `_retrieve` and `_build`
    would on the device path (ids kept on the device, blocks gathered from the host store there), exactly, in
    each layer's own buffers: the columns, duplicates, positions and rotation computed for the layers stacked (a
    group at a time, `TOGETHER_BYTES` of working memory), then written a few operations a layer. False, with
    nothing done, where the layers are not on that path or differ (resident counts after a truncation): they
    then build one at a time."""
    c, first = memory.config, layers[0]
    n_resident = first.resident.n
    if memory.c_ops or blocks.shape[2] == 0 \
            or any(not layer.gathers_on_device or layer.resident.n != n_resident for layer in layers):
        return False
    n_kv, k = blocks.shape[1:]
    n_keys = n_resident + k * c.block_size
    head_dim = first.resident.head_dim
    # a layer's columns: keys as stored, rotated in the compute dtype, the cos and sin tables (gathered in float32,
    # then in the compute dtype) and the index tensors
    per_layer = n_kv * n_keys * (head_dim * (memory.kv_dtype.itemsize + 3 * memory.dtype.itemsize + 4)
                                 + 4 * 8)
    for group in groups(len(layers), per_layer):
        _build_group(memory, layers[group], blocks[group], n_resident, n_keys)
    return True


def _build_group(memory, layers: list, blocks: torch.Tensor, n_resident: int, n_keys: int) -> None:
    """`build` for one group of layers, each with `n_resident` resident columns and `n_keys` in all."""
    c, first = memory.config, layers[0]
    n_layers, n_kv, _ = blocks.shape
    head_dim = first.resident.head_dim
    resident_idx = torch.stack([layer.resident.idx[:, :n_resident] for layer in layers])  # (L, n_kv, n_resident)
    bidx, duplicate = block_columns(blocks, resident_idx, first.store.n_blocks, c.block_size)
    idx = torch.cat((resident_idx, bidx), dim=2)  # (L, n_kv, n_keys): each context's original indices
    if c.positions == "compact":  # as `_build`: a count on the device, its bound on the host
        positions, counts = ranks_layers(idx, memory.n_tokens)
        bound, next_pos = min(memory.n_tokens, n_kv * n_keys), counts.unbind(0)
    else:
        positions, bound, next_pos = idx, memory.n_tokens, [memory.n_tokens] * n_layers
    valid = torch.cat((~duplicate, torch.ones_like(bidx, dtype=torch.bool)), dim=2)
    # working memory of this build only (on CUDA the caching allocator's; kept, it would sit beside the next prefill)
    keys = torch.empty(n_layers, n_kv, n_keys, head_dim, dtype=memory.kv_dtype, device=memory.device)
    headroom = max(c.chunk_tokens, c.evict_every) + 1
    asms, copies = [], ([], [], [], [], [], [])  # (destinations, sources) of the keys, values and indices
    for i, (layer, b) in enumerate(zip(layers, blocks.unbind(0))):
        layer._take_on_device(b)
        key = (layer.version, layer._key)
        asm = Assembly.empty(n_kv, n_keys, head_dim, headroom, memory.context_dtype, memory.device, reuse=layer.asm,
                             ahead=layer._decode_room())
        kept, r = layer._kept(layer.asm, asm, key, n_resident), layer.resident
        for part, (dst, src) in enumerate(((keys[i, :, :n_resident], r.k[:, :n_resident]),
                                           (asm.v[:, kept:n_resident], r.v[:, kept:n_resident]),
                                           (asm.idx[:, kept:n_keys], idx[i, :, kept:]))):
            copies[2 * part].append(dst)
            copies[2 * part + 1].append(src)
        layer.store.gather(b, keys[i, :, n_resident:], asm.v[:, n_resident:n_keys])
        asms.append((layer, asm, key))
    for part in range(3):  # one dispatch each: on CUDA copied without a Python call a layer
        torch._foreach_copy_(copies[2 * part], copies[2 * part + 1])
    rotated = memory.rope.rotate(keys, *memory.rope.tables(positions, memory.dtype, n_positions=bound))
    if memory.kv_dtype != memory.dtype:  # as stored (`_rotate_into`)
        rotated.copy_(rotated.to(memory.kv_dtype))
    torch._foreach_copy_([asm.k[:, :n_keys] for _, asm, _ in asms], list(rotated.unbind(0)))
    for (layer, asm, key), v, pos in zip(asms, valid.unbind(0), next_pos):
        asm.finish(n_keys, v, pos, key, n_resident, always_valid=True, bound=bound)
        layer.asm, layer._built_together, layer._record_now = asm, True, False  # recorded by the caller


def record(memory, recording: list[tuple]) -> None:
    """LayerMemory.record_query for every layer at once: one product a layer with its context's keys, the rest
    (rotation, softmax, the sums per block) stacked. Layers whose contexts differ in length (after a truncation)
    or that attend in C record one at a time."""
    asms = [layer.asm for layer, _ in recording]
    end = asms[0].length if asms else 0
    if len(recording) < 2 or memory.c_ops or any(a.length != end for a in asms):
        for layer, q in recording:
            layer.record_query(q)
        return
    bound = max(a.position_bound(1) for a in asms)
    n_blocks = memory.n_tokens // memory.config.block_size
    # a layer's logits (compute dtype, then float32), its indices and bins, and its per-block sums
    per_layer = end * (memory.spec.n_heads * (memory.dtype.itemsize + 4) + 2 * 8) \
        + (n_blocks + 1) * 4 * asms[0].k.shape[0]
    for group in groups(len(asms), per_layer):
        positions = next_positions(memory, asms[group]).sub(1).view(-1, 1)  # the query as its context's newest token
        cos, sin = memory.rope.tables(positions, memory.dtype, n_positions=bound)
        q_rot = memory.rope.rotate(torch.stack([q for _, q in recording[group]]), cos[:, None], sin[:, None])
        mass = step_mass(q_rot, asms[group], end)  # (L, n_kv, end)
        idx = torch.stack([a.idx[:, :end] for a in asms[group]])
        memory.record.add(mass_per_block(mass, idx, memory, q_rot.shape[1]))


def evict(memory, layers: list, n_total: int) -> None:
    """A decode step's eviction (LayerMemory._evict) for `layers` at once, `n_total` tokens in memory: the columns
    kept chosen for the layers stacked, gathered stacked, written back into each layer's tier with foreach copies.
    Layers whose resident counts differ (after a truncation) evict one at a time."""
    n = layers[0].resident.n
    if len(layers) < 2 or any(layer.resident.n != n for layer in layers):
        for layer in layers:
            layer._evict(n_total)
        return
    c, first = memory.config, layers[0].resident
    n_keep = layers[0]._n_keep(n_total)
    if n > n_keep:
        n_kv, head_dim = first.n_kv, first.head_dim
        # a layer's K and V stacked and gathered, its indices, scores and ranking
        per_layer = n_kv * n * (4 * head_dim * first.dtype.itemsize + 4 * 8)
        for group in groups(len(layers), per_layer):
            tiers = [layer.resident for layer in layers[group]]
            idx, score = torch.stack([r.idx[:, :n] for r in tiers]), torch.stack([r.score[:, :n] for r in tiers])
            keep = kept_columns(idx, score, n_total, n_keep, c)  # (L, n_kv, n_keep)
            rows = (keep + torch.arange(len(tiers) * n_kv, device=keep.device).view(len(tiers), n_kv, 1) * n).flatten()
            kept = [torch.stack([getattr(r, name)[:, :n] for r in tiers]).view(-1, head_dim).index_select(0, rows)
                    .view(len(tiers), n_kv, n_keep, head_dim) for name in ("k", "v")]  # as Resident.gather picks rows
            kept += [idx.gather(2, keep), score.gather(2, keep)]
            views = [r.refill(n_keep, headroom=max(c.chunk_tokens, c.evict_every) + 1) for r in tiers]
            for part in range(4):  # one dispatch each: on CUDA copied without a Python call a layer
                torch._foreach_copy_([v[part] for v in views], list(kept[part].unbind(0)))
    for layer in layers:
        layer.evicted = layer.evicted or n > n_keep
        layer.version += 1
