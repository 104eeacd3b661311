"""The `oracle` scorers of `bench fidelity`: eviction by each token's true causal importance.

A full-attention pass over the benchmark text gives every token the label `heads train` fits (the
largest attention logit from the queries 512 to 1536 tokens later; `oracle-logprob`: the largest log
attention probability), and the scorer hands those labels to the memory as the tokens arrive. It reads
the future, so it exists only here: it is what perfect retaining heads for that label would do, the
ceiling that tells a label worth learning from heads that learn it badly.

    scorer = oracle_scorer(engine, ids, "oracle-logprob")  # engine in full attention; ids as the bench reads them
"""

from __future__ import annotations

import torch

from edgectx.engine import Engine
from edgectx.train.heads import LabellingCache, TrainSettings

ORACLES = {"oracle": "logit", "oracle-logprob": "logprob"}
UNREACHED = 1e9  # tokens no counted query reaches (the text ends first): kept, as the newest are anyway


class OracleScorer:
    observes = False
    scores_steps_together = False
    zero_steps = False

    def __init__(self, name: str, labels: list[torch.Tensor]):
        self.name, self.labels = name, labels

    def new_token_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        return self.labels[layer][:, first : first + k.shape[1]].clone()

    def update(self, stored: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        return stored


def oracle_scorer(engine: Engine, ids: list[int], name: str = "oracle", offset: int | None = None,
                  span: int | None = None) -> OracleScorer:
    """Labels for every token of `ids` from one full-attention pass (the engine must be in full attention);
    `offset` and `span` default to `heads train`'s."""
    defaults = TrainSettings()
    settings = TrainSettings(offset=defaults.offset if offset is None else offset, span=span or defaults.span,
                             label=ORACLES[name], seq_len=max(defaults.seq_len, (offset or 0) + (span or 0) + 1024))
    cache = LabellingCache(engine, settings, every_token=True)
    with torch.inference_mode():
        cache.begin(len(ids))
        engine.model(torch.tensor(ids, device=engine.device), cache)
    labels = [torch.where(torch.isfinite(y), y, UNREACHED) for y in cache.labels]
    return OracleScorer(name, labels)
