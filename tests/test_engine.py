"""The engine on the embedded model: chunking, prefix reuse across turns, streaming text, stops."""

from __future__ import annotations

import pytest
import torch

from edgectx.bench.corpus import corpus_tokens
from edgectx.chat.session import ChatSession
from edgectx.engine import Cancelled
from edgectx.model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)


def _ids(engine, n):
    return corpus_tokens(engine.tokenizer, n)


@pytest.fixture
def float32_kv(monkeypatch):
    """Chunking must not change the arithmetic: checked on a float32 cache. Different chunkings run different
    attention kernels (~1e-5 apart), which the CPU's default float16 cache rounds to its own step (0.02 on these
    logits); tests/test_memory.py holds float16 decoding to float32's."""
    monkeypatch.setenv("EDGECTX_KV_DTYPE", "float32")


def test_chunk_size_does_not_change_logits(embedded_engine, float32_kv):
    e = embedded_engine
    ids = _ids(e, 300)
    e.reset()
    whole = e.prefill(ids, chunk_tokens=512)
    e.reset()
    chunked = e.prefill(ids, chunk_tokens=64)
    e.reset()
    assert torch.allclose(whole, chunked, atol=1e-3), (whole - chunked).abs().max()


def test_sync_reuses_prefix_and_matches_fresh_prefill(embedded_engine, float32_kv):
    e = embedded_engine
    ids = _ids(e, 200)
    e.reset()
    assert e.sync(ids[:150]) == 0
    reused = e.sync(ids[:120] + ids[150:200])  # diverges after 120 tokens
    assert reused == 120
    kept = e._next_logits.clone()
    e.reset()
    e.sync(ids[:120] + ids[150:200])
    assert torch.allclose(kept, e._next_logits, atol=1e-3)
    e.reset()


def test_cancel_between_chunks_keeps_memory_consistent(embedded_engine, float32_kv):
    e = embedded_engine
    ids = _ids(e, 300)
    e.reset()
    calls = []
    try:
        e.prefill(ids, chunk_tokens=100, progress=lambda done, total: calls.append(done), cancel=lambda: len(calls) >= 2)
    except Cancelled:
        pass
    else:
        raise AssertionError("prefill was not cancelled")
    assert calls == [100, 200]
    assert len(e.tokens) == e.memory.n_tokens == 200
    resumed = e.prefill(ids[200:])
    e.reset()
    fresh = e.prefill(ids)
    e.reset()
    assert torch.allclose(resumed, fresh, atol=1e-3)


def test_second_turn_prefills_only_new_tokens(embedded_engine):
    e = embedded_engine
    e.reset()
    chat = ChatSession(e)
    first = "".join(chat.send("What is the capital of France?", GREEDY, max_tokens=24))
    assert "Paris" in first
    in_memory = len(e.tokens)
    second = "".join(chat.send("And of Italy?", GREEDY, max_tokens=24))
    stats = e.last_stats
    assert stats.reused_tokens == in_memory  # everything from turn one, answer included
    assert stats.prompt_tokens - stats.reused_tokens < 20
    assert second.strip()
    e.reset()


def test_stop_string_cuts_answer(embedded_engine):
    e = embedded_engine
    e.reset()
    chat = ChatSession(e)
    full = "".join(chat.send("Count from 1 to 10, separated by commas.", GREEDY, max_tokens=40))
    assert "4" in full
    chat.reset()
    cut = "".join(chat.send("Count from 1 to 10, separated by commas.", GREEDY, max_tokens=40, stop=("4",)))
    assert e.last_stats.stop_reason == "stop_string"
    assert cut == full[: full.index("4")]
    e.reset()


def test_streamed_text_is_utf8_safe(embedded_engine):
    tok = embedded_engine.tokenizer
    text = "Grüße aus 東京 🌸 — naïve café"
    ids = tok.encode(text, special=False)
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(tok.piece(i)) and not tok.piece(i).decode("utf-8", errors="ignore") for i in ids)  # split characters exist


def test_end_of_turn_tokens_stop(embedded_engine):
    tok = embedded_engine.tokenizer
    im_end = tok.encode("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in tok.eog_ids
    assert tok.piece(im_end[0]) == b""  # control tokens never leak into answers
