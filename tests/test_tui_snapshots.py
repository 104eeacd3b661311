"""Snapshot tests of the TUI's layout (pytest-textual-snapshot): the chat screen after one answer, the help
screen, and the memory gauge in the status bar while a message is typed ("N cached / M to prefill").
After a deliberate layout change, review and refresh them with `pytest --snapshot-update`."""

from __future__ import annotations

import pytest

from tui_fakes import FakeEngine

from edgectx.store.conversations import ConversationStore
from edgectx.tui.app import EdgectxApp
from edgectx.tui.bridge import Bridge
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.status import StatusBar

pytest.importorskip("pytest_textual_snapshot")

ANSWER = ["Here is **bold** text and a list:\n\n", "- one\n- two\n\n", "```python\nprint('hi')\n```\n"]
STATS = {"tokens": 5000, "budget_tokens": 2048, "evicted_tokens": 3976, "device_kv_bytes": 2 * 2**20,
         "host_kv_bytes": 8 * 2**20}  # fixed figures; the cached / to-prefill figure comes from the fake's tokens
SIZE = (110, 30)


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr("edgectx.tui.widgets.sidebar.when_text", lambda seconds: "2025-01-31 14:05")
    with ConversationStore() as store:
        store.add_message(store.create_conversation("An older conversation").id, "user", "hi")
        engine = FakeEngine(answer=ANSWER, stats=STATS)
        yield EdgectxApp(Bridge(lambda progress: engine, store))


async def _loaded(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    prompt = pilot.app.chat.query_one(PromptInput)
    prompt.cursor_blink = False  # a blinking cursor is drawn or not depending on when the screen is taken
    prompt.focus()
    await pilot.pause()


async def _answered(pilot) -> None:
    await _loaded(pilot)
    await pilot.press(*"Show me some Markdown", "enter")
    await pilot.app.workers.wait_for_complete()
    for _ in range(3):
        await pilot.pause()


def test_main_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=SIZE, run_before=_answered)


def test_memory_gauge(app, snap_compare):
    async def run_before(pilot) -> None:
        await _answered(pilot)
        await pilot.press(*"And the next question?")
        bar = pilot.app.chat.query_one(StatusBar)
        for _ in range(100):
            if bar.plan is not None:
                break
            await pilot.pause(0.02)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 30), run_before=run_before)


def test_help_screen(app, snap_compare):
    async def run_before(pilot) -> None:
        await _loaded(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
