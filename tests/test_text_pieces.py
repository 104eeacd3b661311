"""Stop strings, sampling and the chat template: small pieces with exact expected behaviour."""

from __future__ import annotations

import pytest
import torch

from edgectx.model.chat_template import ChatTemplate, TemplateError
from edgectx.model.sampling import Sampler, SamplingParams
from edgectx.model.stops import StopMatcher


def test_stop_string_split_across_pieces():
    m = StopMatcher(("\nUser:",))
    assert m.feed("Hello\nUs") == ("Hello", False)
    assert m.feed("er: more") == ("", True)


def test_stop_prefix_released_when_it_does_not_complete():
    m = StopMatcher(("STOP",))
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("", final=True) == ("", False)


def test_no_stops_passes_text_through():
    assert StopMatcher().feed("anything") == ("anything", False)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1


def test_top_k_one_is_argmax_even_when_sampling():
    logits = torch.randn(1000)
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert all(sampler.sample(logits) == int(logits.argmax()) for _ in range(20))


def test_seed_reproduces_and_distribution_follows_temperature():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=7)
    draws = [Sampler(params).sample(logits) for _ in range(5)]
    assert len(set(draws)) == 1  # same seed, same first draw
    sampler = Sampler(params)
    counts = torch.bincount(torch.tensor([sampler.sample(logits) for _ in range(3000)]), minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.04), counts


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, repeat_penalty=1.0, seed=1))
    assert {sampler.sample(logits) for _ in range(200)} == {0}
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, repeat_penalty=1.0, seed=1))
    assert {sampler.sample(logits) for _ in range(400)} == {0, 1}


def test_repeat_penalty_moves_greedy_choice():
    logits = torch.tensor([2.0, 1.9, 0.0])
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.0)).sample(logits, [0]) == 0
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.2)).sample(logits, [0]) == 1


def test_chatml_fallback_and_generation_prompt():
    t = ChatTemplate(None)
    assert t.is_fallback
    text = t.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_raise_exception_is_clear():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(TemplateError, match="must start with user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_template_sandbox_blocks_attribute_escape():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        t.render([])


def test_broken_template_source_is_clear():
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for x in %}")
