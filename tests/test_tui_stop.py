"""Leaving while the engine works, and typing before it is ready, driven through Pilot with the fake engine:
Ctrl+Q during an answer stops it, keeps the part written (in the store too) and exits; closing the conversation
stops its answer the same way; Ctrl+Q while the model loads stops the load; a message sent while the model
loads waits and goes out once it is ready (or back into the box if the load fails)."""

from __future__ import annotations

import threading
import time

import pytest

from tui_fakes import FakeEngine, RecordingApp, settle, shown, stored, wait_for

from edgectx.errors import ModelFileError
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.chat import QUEUED
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.status import StatusBar
from edgectx.tui.widgets.transcript import Transcript

pytestmark = pytest.mark.anyio

LONG = ["word "] * 2000  # 20 s at 10 ms a piece: only a stop ends it in a test's time


def _app(store, engine=None, load=None) -> RecordingApp:
    engine = engine or FakeEngine()
    return RecordingApp(Bridge(load or (lambda progress: engine), store))


async def _start_long_answer(pilot, app, engine) -> None:
    app.chat.query_one(PromptInput).focus()
    await pilot.press(*"Write a long story about a dragon.", "enter")
    await wait_for(pilot, engine.started.is_set, "the answer to start")
    await wait_for(pilot, lambda: engine.last_stats.generated_tokens >= 5, "a few pieces")


async def test_ctrl_q_during_an_answer_stops_it_keeps_it_and_exits(store):
    engine = FakeEngine(answer=LONG, piece_delay_s=0.01)
    app = _app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await _start_long_answer(pilot, app, engine)
        t0 = time.perf_counter()
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit", tries=1000)
        stopped_after_s = time.perf_counter() - t0
        worker = app.chat._worker
    assert worker.is_finished  # nothing left running behind the closed app
    assert engine.last_stats.stop_reason == "cancelled"
    assert stopped_after_s < 5  # the full answer would take 20 s
    (conversation,) = store.list_conversations()
    (user, answer) = stored(store, conversation.id)
    assert user == ("user", "Write a long story about a dragon.")
    assert answer[0] == "assistant" and answer[1] == "word " * engine.last_stats.generated_tokens
    assert 5 <= engine.last_stats.generated_tokens < len(LONG)


async def test_closing_the_conversation_stops_its_answer_and_keeps_it(store):
    engine = FakeEngine(answer=LONG, piece_delay_s=0.01)
    app = _app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await _start_long_answer(pilot, app, engine)
        await pilot.press("ctrl+n")
        await settle(pilot, app)
        assert engine.last_stats.stop_reason == "cancelled"
        assert shown(app) == [] and app.chat.bridge.conversation_id is None  # a new, empty conversation
        (conversation,) = store.list_conversations()
        answer = stored(store, conversation.id)[-1]
        assert answer == ("assistant", "word " * engine.last_stats.generated_tokens)
        assert engine.last_stats.generated_tokens < len(LONG)


async def test_ctrl_q_while_the_model_loads_stops_the_load(store):
    layers = []

    def slow_load(progress):
        for layer in range(2000):  # 20 s of layers
            time.sleep(0.01)
            progress(layer + 1, 2000)
            layers.append(layer)
        return FakeEngine()

    app = _app(store, load=slow_load)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: len(layers) >= 3, "the load to start")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit", tries=1000)
    n_loaded = len(layers)
    time.sleep(0.2)
    assert len(layers) == n_loaded < 2000  # the loading thread has stopped, not only the app


async def test_a_message_sent_while_the_model_loads_goes_out_when_it_is_ready(store):
    gate = threading.Event()
    engine = FakeEngine()

    def load(progress):
        gate.wait(30)
        return engine

    app = _app(store, load=load)
    async with app.run_test() as pilot:
        await pilot.pause()
        assert app.chat.busy == "load"
        await pilot.press(*"Hi there", "enter")
        await pilot.pause()
        transcript = app.chat.query_one(Transcript).messages
        assert transcript == [("user", "Hi there"), ("notice", QUEUED)]
        assert app.chat.query_one(PromptInput).text == ""  # taken, not lost: it waits in the transcript
        gate.set()
        await wait_for(pilot, lambda: shown(app)[-1:] == [("assistant", "Hello **world**!")], "the answer")
        await settle(pilot, app)
        assert shown(app) == [("user", "Hi there"), ("assistant", "Hello **world**!")]
        (conversation,) = store.list_conversations()
        assert stored(store, conversation.id) == [("user", "Hi there"), ("assistant", "Hello **world**!")]


async def test_a_message_waiting_for_a_model_that_fails_comes_back_to_the_box(store):
    gate = threading.Event()

    def load(progress):
        gate.wait(30)
        raise ModelFileError("/models/missing.gguf does not exist: pass a .gguf model file.")

    app = _app(store, load=load)
    async with app.run_test() as pilot:
        await pilot.pause()
        await pilot.press(*"hello", "enter")
        await pilot.pause()
        gate.set()
        await settle(pilot, app)
        assert app.chat.query_one(PromptInput).text == "hello"
        assert "no model loaded" in app.chat.query_one(StatusBar).text
        assert ("/models/missing.gguf does not exist: pass a .gguf model file.", "error") in app.notes
        assert store.list_conversations() == []


async def test_a_read_only_store_chats_unsaved_and_says_so(store, monkeypatch):
    from edgectx.store.conversations import ConversationStore
    from edgectx.tui.screens.chat import READ_ONLY

    monkeypatch.setattr(ConversationStore, "read_only", property(lambda self: True))
    app = _app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert (READ_ONLY, "warning") in app.notes
        app.chat.query_one(PromptInput).focus()
        await pilot.press(*"Hi there", "enter")
        await settle(pilot, app)
        assert shown(app) == [("user", "Hi there"), ("assistant", "Hello **world**!")]
        assert store.list_conversations() == []  # nothing was written
