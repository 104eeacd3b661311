"""A reasoning model's thinking told apart from its answer (edgectx.chat.reasoning), piece by piece."""

from __future__ import annotations

import pytest

from edgectx.chat.reasoning import ThinkingSplitter, prompt_opens_thinking, split_answer, template_reasons

ANSWER = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?"


def _split(pieces: list[str], opened: bool = False) -> tuple[str, str]:
    splitter = ThinkingSplitter(opened)
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.flush()
    reasoning = "".join(text for kind, text in parts if kind == "reasoning")
    content = "".join(text for kind, text in parts if kind == "content")
    return reasoning, content


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_tags_split_across_pieces_anywhere(size):
    pieces = [ANSWER[i : i + size] for i in range(0, len(ANSWER), size)]
    assert _split(pieces) == ("The user greets me.\nI greet back.\n", "Hello! How can I help?")


def test_a_prompt_that_opened_the_block_leaves_only_the_closing_tag():
    assert _split(["Let me think", ".</thi", "nk>Answer."], opened=True) == ("Let me think.", "Answer.")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n") and not prompt_opens_thinking("assistant\n")


def test_an_unfinished_block_is_all_reasoning_and_a_dangling_tag_start_comes_back():
    assert _split(["<think>still going"]) == ("still going", "")
    assert _split(["plain text ends with <thi"]) == ("", "plain text ends with <thi")
    assert _split(["a < b and <thinking> is not a tag"]) == ("", "a < b and <thinking> is not a tag")


def test_an_empty_thinking_block_gives_only_the_answer():
    splitter = ThinkingSplitter()
    parts = splitter.feed("<think>\n\n</think>\n\nJust the answer.") + splitter.flush()
    assert parts == [("content", "Just the answer.")] and splitter.reasoning_parts == 0


def test_templates_that_reason():
    assert template_reasons("{% if '</think>' in content %}...{{ '<think>\\n' }}{% endif %}")
    assert not template_reasons("{{ '<|im_start|>assistant\\n' }}")


def test_a_stored_answer_splits_only_where_a_block_closes():
    assert split_answer(ANSWER) == ("The user greets me.\nI greet back.\n", "Hello! How can I help?")
    assert split_answer("opened by the prompt</think>Yes.") == ("opened by the prompt", "Yes.")
    assert split_answer("x = a <think> b") == ("", "x = a <think> b")  # no block closes: as written
    assert split_answer("no tags at all") == ("", "no tags at all")
