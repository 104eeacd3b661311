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
    assert parts == [("content", "Just the answer.")]  # no reasoning part


def test_templates_that_reason():
    assert template_reasons("{% if '</think>' in content %}...{{ '<think>\\n' }}{% endif %}")
    assert not template_reasons("{{ '<|im_start|>assistant\\n' }}")


def test_a_stored_answer_splits_only_where_a_block_closes():
    assert split_answer(ANSWER) == ("The user greets me.\nI greet back.\n", "Hello! How can I help?")
    assert split_answer("opened by the prompt</think>Yes.") == ("opened by the prompt", "Yes.")
    assert split_answer("x = a <think> b") == ("", "x = a <think> b")  # no block closes: as written
    assert split_answer("no tags at all") == ("", "no tags at all")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    from tiny_gguf import THINKING_TEMPLATE, write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("thinker") / "tiny.gguf", chat_template=THINKING_TEMPLATE)


def test_a_local_conversation_sends_thinking_apart_and_no_thinking_asks_for_none(thinker):
    from edgectx.chat.conversation import Conversation, Settings
    from edgectx.engine import Engine
    from edgectx.model.sampling import SamplingParams
    from edgectx.store.conversations import ConversationStore

    engine = Engine.load(thinker, device="cpu", weights="fp16")
    with ConversationStore() as store:
        for thinking in (None, False):
            settings = Settings(sampling=SamplingParams(temperature=0), max_tokens=8, thinking=thinking)
            conversation = Conversation(engine, store, settings)
            answer, thought = [], []
            conversation.send("Why is the sky blue?", on_piece=answer.append, on_reasoning=thought.append)
            if thinking is None:  # the prompt opened the block: everything written is thinking
                assert "".join(thought) and not "".join(answer) and conversation.session.opened_thinking
            else:
                assert "".join(answer) and not thought and not conversation.session.opened_thinking


def test_edgectx_chat_no_thinking(thinker):
    from cli_helpers import run_cli

    common = ["chat", "--model", str(thinker), "--prompt", "Why?", "--max-tokens", "8", "--temperature", "0",
              "--weights", "fp16", "--no-history"]
    thinking, plain = run_cli(*common), run_cli(*common, "--no-thinking")
    assert thinking.returncode == plain.returncode == 0, thinking.stderr + plain.stderr
    assert thinking.stdout.strip() == "" and plain.stdout.strip()  # the answer alone on stdout; thinking on stderr
    # `thinking = false` in the config file (the TUI's settings write it) makes no thinking the default
    from edgectx.config import config_path

    config_path().write_text("thinking = false\n")
    configured = run_cli(*common)
    assert configured.returncode == 0 and configured.stdout == plain.stdout, configured.stderr
