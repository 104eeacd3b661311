"""Eviction scorers: how important each device-resident token is, per KV head.

When the device budget overflows, ContextMemory keeps the sinks, the local window and the top
`n_retain` older tokens per KV head by score; the rest stay only in the host store. A scorer gives
each new token a static score from its pre-RoPE Q, K, V (Locret's retaining heads do this) and may
ask for the attention mass that an observation window of recent queries puts on every resident token
(the training-free default, as in SnapKV and H2O).

    scorer = AttentionMassScorer()           # or WindowScorer(), or edgectx.memory.heads.HeadsScorer(heads)
    scores = scorer.update(stored, observed)  # both (n_kv_heads, n_tokens)
"""

from __future__ import annotations

from typing import Protocol

import torch


class EvictionScorer(Protocol):
    name: str
    observes: bool  # whether `update` needs the observation window's attention mass
    # whether a decode step's scores come from `step_features` (per layer) and `step_scores` (every layer at once)
    scores_steps_together: bool
    zero_steps: bool  # whether a decode step's new token scores are zeros (the resident tier writes them ahead)

    def new_token_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        """Scores (n_kv_heads, T) for new tokens `first`.. from pre-RoPE q (n_heads, T, d), k and v (n_kv_heads, T, d)."""

    def update(self, stored: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """New scores (n_kv_heads, n) from the stored ones and, if `observes`, the attention mass just observed."""


class AttentionMassScorer:
    """Attention mass received from the last `n_observe` queries, summed over each KV head's query group.

    A token keeps the highest mass it was ever seen to receive: a fact the text once leaned on hard
    (a definition, a name) stays retained even when the current passage does not mention it.
    """

    name = "attention"
    observes = True
    scores_steps_together = False
    zero_steps = True
    _step: torch.Tensor | None = None  # a decode step's scores (zeros), shared by its layers

    def new_token_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        if k.shape[1] == 1:  # a decode step, every layer: one zero column, read (copied), never written
            if self._step is None or self._step.shape[0] != k.shape[0] or self._step.device != k.device:
                self._step = torch.zeros(k.shape[0], 1, device=k.device)
            return self._step
        return torch.zeros(k.shape[0], k.shape[1], device=k.device)

    def update(self, stored: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        return stored if observed is None else torch.maximum(stored, observed)


class WindowScorer:
    """Recency only: the retained tier becomes a longer local window, so the device holds sinks + the
    newest tokens, as StreamingLLM does. The baseline the other scorers must beat."""

    name = "window"
    observes = False
    scores_steps_together = False
    zero_steps = False

    def new_token_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        index = torch.arange(first, first + k.shape[1], device=k.device, dtype=torch.float32)
        return index.expand(k.shape[0], -1)

    def update(self, stored: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        return stored
