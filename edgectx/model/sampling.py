"""Token sampling: greedy, or repetition penalty -> top-k -> top-p -> temperature -> draw (llama.cpp's order).

    sampler = Sampler(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1))
    token = sampler.sample(logits, history=previous_ids)  # logits (vocab,) float32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.9  # 1.0 disables
    repeat_penalty: float = 1.1  # 1.0 disables; small models loop without it
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor, history: list[int] = ()) -> int:
        p = self.params
        logits = logits.float().cpu()
        if p.repeat_penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n :])), dtype=torch.long)
            picked = logits[recent]
            logits = logits.clone()
            logits[recent] = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        if 0 < p.top_k < logits.numel():
            values, indices = torch.topk(logits, p.top_k)
        else:
            values, indices = torch.sort(logits, descending=True)
        if p.top_p < 1.0:
            probs = torch.softmax(values, dim=-1)
            cumulative = torch.cumsum(probs, dim=-1)
            keep = int((cumulative - probs < p.top_p).sum())  # the smallest prefix whose mass reaches top_p
            values, indices = values[: max(keep, 1)], indices[: max(keep, 1)]
        probs = torch.softmax(values / p.temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self._generator)
        return int(indices[choice])
