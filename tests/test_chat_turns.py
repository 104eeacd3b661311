"""ChatSession's last-turn tools on the real engine (tiny random GGUF): `plan` predicts exactly what the next
send reuses and prefills, and `pop_turn` takes a turn back so that the resend prefills only from where it began."""

from __future__ import annotations

import pytest

from tiny_gguf import write_tiny_gguf

from edgectx.chat.session import ChatSession
from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", context_length=4096)
    return Engine.load(model, device="cpu", memory_config=MemoryConfig.for_budget(256, chunk_tokens=64))


def _send(chat, text) -> str:
    return "".join(chat.send(text, GREEDY, max_tokens=6))


def test_plan_predicts_the_next_sends_reuse_and_prefill(engine):
    engine.reset()
    chat = ChatSession(engine, system="Be brief.")
    with pytest.raises(UsageError):
        chat.pop_turn()
    cached, to_prefill = chat.plan("hello there")
    assert cached == 0
    _send(chat, "hello there")
    assert (engine.last_stats.reused_tokens, engine.last_stats.prompt_tokens) == (0, to_prefill)
    held = len(engine.tokens)
    cached, to_prefill = chat.plan("and a second question " * 20)
    assert cached == held
    _send(chat, "and a second question " * 20)  # past the 256-token budget: the memory evicts
    assert engine.last_stats.reused_tokens == cached and engine.last_stats.prompt_tokens == cached + to_prefill


def test_pop_turn_resends_from_where_the_turn_began(engine):
    engine.reset()
    chat = ChatSession(engine)
    first = _send(chat, "one " * 60)
    after_first = len(engine.tokens)
    answer = _send(chat, "two " * 60)
    prompt = engine.last_stats.prompt_tokens
    assert chat.pop_turn() == "two " * 60
    assert [m["content"] for m in chat.messages] == [("one " * 60), first]
    assert chat.plan("two " * 60) == (prompt, 0)  # the same turn again: all of it is in memory, its logits kept
    assert _send(chat, "two " * 60) == answer  # greedy: the same answer from the cut-back memory
    assert engine.last_stats.reused_tokens == prompt
    chat.pop_turn()
    _send(chat, "three " * 60)
    assert after_first <= engine.last_stats.reused_tokens < prompt - 1  # a new turn: from where they differ
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
