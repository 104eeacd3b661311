"""Lexical block matching: the rare tokens a question shares with a passage point at that passage.

Block retrieval by attention (edgectx.memory.retrieval) scores each block by the dot product of the query
with a representative key. On the embedded 135M model that signal does not find a one-line fact in a long
document: measured at 16K tokens, a question's own queries ranked the fact's block about 60th of 123
blocks, under every key-based scoring tried (mean keys, several keys per block, Quest's min/max bounds,
even the exact best key of every block), while the question's rare tokens ("stormy", "otter") occur in
that block and nowhere else. This module is that second signal, as a search engine would compute it:
every block's tokens are indexed by id, and a block's score for a query is the sum, over the distinct
query tokens it contains, of their inverse document frequency over the eligible blocks (BM25 without the
length terms: blocks have one length). Common tokens ("the", the chat template's) weigh nothing.

The best block is taken with the block that completes the passage around its rarest matched token (a
sentence that straddles two blocks), then the next best ones: `match` returns up to `n_blocks` block ids,
the same for every layer and KV head, which retrieval puts before its own per-head choices. A sentence
the question points at is then whole in every layer's attention context at once.

    index = TokenIndex(block_size=128)
    index.append(torch.tensor(doc_ids))
    index.match(torch.tensor(question_ids), n_eligible=120, n_blocks=2)  # e.g. tensor([63, 64])
"""

from __future__ import annotations

import torch

UNKNOWN = -1  # the id of a token whose id the memory was not told (it never matches)
MIN_IDF = 1.0  # a matched token counts only if at most ~1/e of the eligible blocks hold it


class TokenIndex:
    """The token id of every token in the host store, in order (host memory: 4 bytes a token). Ids that come one at a
    time (decode steps) wait in a list until the index is read: one tensor write a step cost more than the lookup."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._ids = torch.empty(0, dtype=torch.int32)
        self._n = 0  # ids in the tensor
        self._tail: list[int] = []  # ids appended since, not yet in it

    @property
    def ids(self) -> torch.Tensor:
        """Every id so far (and spare room after them)."""
        self._flush()
        return self._ids

    def _flush(self) -> None:
        if self._tail:
            tail, self._tail = self._tail, []
            self._write(torch.tensor(tail, dtype=torch.int32))

    def append(self, ids: torch.Tensor | list[int]) -> None:
        """Append a tensor of ids, or a list of them (kept as they are until the index is read)."""
        if isinstance(ids, list):
            self._tail.extend(ids)
            return
        self._flush()  # whatever waits goes first
        self._write(ids)

    @torch.inference_mode()  # its buffer may come from a forward's (an inference tensor), the ids read later
    def _write(self, ids: torch.Tensor) -> None:
        if self._n + len(ids) > len(self._ids):
            grown = torch.full((max(self._n + len(ids), 2 * len(self._ids), 4096),), UNKNOWN, dtype=torch.int32)
            grown[: self._n] = self._ids[: self._n]
            self._ids = grown
        self._ids[self._n : self._n + len(ids)] = ids
        self._n += len(ids)

    def truncate(self, n_tokens: int) -> None:
        self._flush()
        self._n = min(self._n, n_tokens)

    def tokens(self, start: int, end: int) -> torch.Tensor:
        return self.ids[start:end]

    def scores(self, query: torch.Tensor, n_eligible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per eligible block, the summed idf of the distinct query tokens it holds (n_eligible,), and per
        token of those blocks the idf of its match, 0 where it matches nothing (n_eligible, block_size)."""
        q = query[query != UNKNOWN].unique()
        blocks = self.ids[: n_eligible * self.block_size].reshape(n_eligible, self.block_size)
        if q.numel() == 0 or n_eligible == 0:
            return torch.zeros(n_eligible), torch.zeros(n_eligible, self.block_size)
        where = torch.searchsorted(q, blocks.contiguous()).clamp(max=q.numel() - 1)  # (n_eligible, block_size)
        hit = q[where] == blocks
        holds = torch.zeros(n_eligible, q.numel(), dtype=torch.bool)
        holds[torch.nonzero(hit, as_tuple=True)[0], where[hit]] = True  # block b holds query token t
        df = holds.sum(dim=0).float()  # (n_query,) blocks holding each query token
        idf = torch.log((n_eligible + 1) / (df + 0.5))
        idf = torch.where(idf >= MIN_IDF, idf, torch.zeros_like(idf))
        return (holds.float() * idf).sum(dim=1), torch.where(hit, idf[where], torch.zeros_like(idf[where]))

    def match(self, query: torch.Tensor, n_eligible: int, n_blocks: int) -> torch.Tensor:
        """Up to `n_blocks` block ids (ascending) among the first `n_eligible` that hold the query's rare
        tokens: the best, the neighbour its passage runs into, then the next best. Empty if none matches."""
        if n_blocks <= 0 or n_eligible <= 0:
            return torch.empty(0, dtype=torch.long)
        block_scores, token_idf = self.scores(query, n_eligible)
        if float(block_scores.max()) <= 0:
            return torch.empty(0, dtype=torch.long)
        best = int(block_scores.argmax())
        # The passage: half a block of text centred on the best block's rarest matched token (a sentence
        # around its key words), which may run into a neighbouring block.
        rarest = best * self.block_size + int(token_idf[best].argmax())
        reach = self.block_size // 4
        lo, hi = max(0, rarest - reach), min(n_eligible * self.block_size, rarest + reach)
        chosen = list(dict.fromkeys([best, lo // self.block_size, (hi - 1) // self.block_size]))[:n_blocks]
        if len(chosen) < n_blocks:
            block_scores[chosen] = 0
            rest = block_scores.topk(min(n_blocks - len(chosen), n_eligible)).indices
            chosen += [b for b in rest.tolist() if block_scores[b] > 0]
        return torch.tensor(sorted(chosen), dtype=torch.long)
