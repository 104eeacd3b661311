"""Lexical retrieval and the attention record: a question's rare tokens bring their passage back to every layer and
KV head, whatever the keys say; the passage the queries attend to most is cited first, retrieved or resident."""

from __future__ import annotations

import torch

from edgectx.bench.recall import visibility
from edgectx.memory.config import MemoryConfig
from edgectx.memory.context import ContextMemory
from edgectx.memory.lexical import TokenIndex
from edgectx.model.rope import Rope
from edgectx.model.spec import ModelSpec

SMALL = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=8,
                     chunk_tokens=64, n_observe=16, retrieve_every=4, evict_every=16)
FILLER = (1, 2, 3, 4, 5)  # common tokens: every block holds them


def _filler_ids(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [FILLER[int(i)] for i in torch.randint(len(FILLER), (n,), generator=gen)]


def test_rare_query_tokens_point_at_their_block_and_the_passage_around_them():
    ids = _filler_ids(12 * 8)
    ids[31:37] = [100, 101, 200, 201, 202, 203]  # a "sentence" from the last token of block 3 into block 4
    ids[75] = 150  # another rare token, in block 9
    index = TokenIndex(block_size=8)
    index.append(torch.tensor(ids, dtype=torch.int32))
    question = torch.tensor([1, 2, 100, 101, 3, 4])
    assert index.match(question, n_eligible=12, n_blocks=2).tolist() == [3, 4]  # the best block and its neighbour
    assert index.match(question, n_eligible=12, n_blocks=1).tolist() == [3]
    assert index.match(torch.tensor([100, 150, 1]), n_eligible=12, n_blocks=3).tolist() == [3, 4, 9]
    assert index.match(torch.tensor(list(FILLER)), n_eligible=12, n_blocks=2).numel() == 0  # common words match nothing
    assert index.match(question, n_eligible=3, n_blocks=2).numel() == 0  # only eligible blocks
    index.truncate(20)
    index.append(torch.tensor(_filler_ids(76, seed=1), dtype=torch.int32))
    assert index.match(question, n_eligible=12, n_blocks=2).numel() == 0  # the truncated tokens are forgotten


def _memory(n_layers: int = 2, config: MemoryConfig = SMALL) -> ContextMemory:
    spec = ModelSpec(arch="llama", n_layers=n_layers, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                     vocab_size=1000, context_length=4096)
    return ContextMemory(spec, Rope(spec, torch.device("cpu")), torch.device("cpu"), torch.float32, config)


def _feed(memory: ContextMemory, k: torch.Tensor, ids: list[int] | None, q: torch.Tensor | None = None) -> None:
    """One forward of keys k (1, T, 16) (values equal to keys) through every layer, as the model would."""
    n = k.shape[1]
    memory.begin(n, token_ids=ids)
    for layer in memory.layers:
        layer.attend(torch.randn(2, n, 16) * 0.1 if q is None else q, k, k.clone())
    memory.commit()


def _read(memory: ContextMemory, ids: list[int], planted_keys: slice | None = None, known: bool = True) -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.zeros(16)
    direction[7] = 1.0  # a slow rotary pair: the match survives RoPE at any distance here
    for start in range(0, len(ids), 64):
        k = torch.randn(1, 64, 16, generator=gen) * 0.1
        if planted_keys is not None and start == planted_keys.start // 64 * 64:
            k[:, planted_keys.start % 64 : planted_keys.stop % 64 or 64] = direction * 4
        _feed(memory, k, ids[start : start + 64] if known else None)


def test_the_question_words_bring_their_block_to_every_layer_and_head_through_the_answer():
    ids = _filler_ids(640)
    ids[300:304] = [700, 701, 702, 703]  # the fact, in block 9; the keys that match the queries are in block 2
    memory = _memory()
    _read(memory, ids, planted_keys=slice(64, 96))
    assert all(layer.evicted for layer in memory.layers)
    question = [1, 2, 701, 702, 3, 4, 5, 1]
    direction = torch.zeros(16)
    direction[7] = 1.0  # a slow rotary pair: the match survives RoPE at any distance here
    query = direction.expand(2, 8, 16) * 4  # the keys' own signal points at block 2
    _feed(memory, torch.randn(1, 8, 16) * 0.1, question, q=query)
    for layer in memory.layers:
        assert bool((layer.selection == 9).any(dim=1).all()), "every KV head of every layer holds the question's block"
        assert bool((layer.selection == 2).any(dim=1).all()), "the other slot still follows the keys"
    assert visibility(memory, 300, 304)["visible"] == 1.0  # what `bench recall` counts as recalled
    for step in range(2 * SMALL.retrieve_every):  # decoding the answer keeps retrieving for the question
        _feed(memory, torch.randn(1, 1, 16) * 0.1, [FILLER[step % 5]], q=query[:, :1])
        assert all(bool((layer.selection == 9).any(dim=1).all()) for layer in memory.layers)


def test_without_token_ids_retrieval_follows_the_keys_alone():
    ids = _filler_ids(640)
    memory = _memory(n_layers=1)
    ids[300:304] = [700, 701, 702, 703]
    _read(memory, ids, planted_keys=slice(64, 96), known=False)
    direction = torch.zeros(16)
    direction[7] = 1.0  # a slow rotary pair: the match survives RoPE at any distance here
    _feed(memory, torch.randn(1, 8, 16) * 0.1, [1, 2, 701, 702, 3, 4, 5, 1], q=direction.expand(2, 8, 16) * 4)
    assert not bool((memory.layers[0].selection == 9).any()), "tokens read without ids never match"
    assert bool((memory.layers[0].selection == 2).any(dim=1).all())


def test_the_passage_attended_to_most_is_cited_first_retrieved_or_resident():
    ids = _filler_ids(640)
    memory = _memory(n_layers=1)
    _read(memory, ids, planted_keys=slice(64, 96))  # block 2 matches the question's queries: evicted, retrieved
    direction = torch.zeros(16)
    direction[7] = 1.0  # a slow rotary pair: the match survives RoPE at any distance here
    query = direction.expand(2, 8, 16) * 4
    memory.record.clear()
    _feed(memory, torch.randn(1, 8, 16) * 0.1, [1, 2, 3, 4, 5, 1, 2, 3], q=query)
    top = memory.record.top(3)
    assert top[0]["start_token"] == 64 and top[0]["score"] > 2 * top[1]["score"]
    assert all(b["start_token"] >= SMALL.n_sink for b in top), "the sinks are never cited"

    # The same keys in the window (resident, never retrieved): cited first as well.
    memory = _memory(n_layers=1)
    _read(memory, ids, planted_keys=slice(608, 640))
    memory.record.clear()
    _feed(memory, torch.randn(1, 8, 16) * 0.1, [1, 2, 3, 4, 5, 1, 2, 3], q=query)
    assert memory.layers[0].asm.n_resident > 0 and not bool((memory.layers[0].selection == 19).any())
    assert memory.record.top(1)[0]["start_token"] == 608
