"""The UI stays responsive during a long read: with the fake engine reading a 32K-token document in a thread
worker that holds the GIL in a Python loop for 30 ms per 512-token chunk (as the engine's Python between
torch calls does, only longer), key presses typed into the prompt are timed from the press until the prompt
shows the character and the screen refreshed. The same loop with the real engine is
`edgectx bench tui-latency --context 32768` (edgectx.tui.latency)."""

from __future__ import annotations

import asyncio

import pytest

from tui_fakes import FakeEngine, RecordingApp, settle

from edgectx.store.conversations import ConversationStore
from edgectx.tui.bridge import Bridge
from edgectx.tui.latency import send_key, summary, time_presses
from edgectx.tui.widgets.progress import WorkProgress


@pytest.mark.anyio
async def test_key_presses_are_answered_quickly_during_a_32k_token_read(tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(("def f(x):\n    return x * 2  # a line of code\n" * 800)[:32_768])
    engine = FakeEngine()
    engine.chunk_busy_s = 0.03  # 64 chunks: about two seconds of reading
    with ConversationStore() as store:
        app = RecordingApp(Bridge(lambda progress: engine, store))
        async with app.run_test() as pilot:
            await settle(pilot, app)
            await pilot.press("ctrl+o")
            await pilot.pause()
            await pilot.press(*str(doc))
            send_key(app, "enter", "\r")  # not pilot.press: it would wait for the busy process to go idle
            while app.chat.busy != "attach":
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # past the dialog closing and the progress row appearing: into the read
            times = await time_presses(pilot, app, 20, lambda: app.chat.busy == "attach", gap_s=0.02)
            progressed = app.chat.query_one(WorkProgress).rate_text
            await settle(pilot, app)
            result = summary(times)
            print(progressed)
            print("key-press latency during the read:", result, [round(t * 1000) for t in times])
            assert result["presses"] >= 10
            assert result["median_ms"] < 100 and result["max_ms"] < 1000, result
            assert len(engine.tokens) > 32_768  # the whole document was read: the presses did not stop it
