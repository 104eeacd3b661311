"""`edgectx bench tui-latency`: how fast the TUI answers a key press while a long document is being read.

The real app runs headless under Textual's Pilot with the real engine; it attaches a text of `--context`
tokens (the Python standard library's sources, or --text) and, while the read runs in its thread worker,
types characters into the prompt, timing each from the key press until the prompt holds the character. The Pilot test of the same loop (tests/test_tui_latency.py) uses the fake engine.

    edgectx bench tui-latency --context 32768 --json
    # {"context_tokens": 32768, "presses": 20, "median_ms": 9.8, "max_ms": 31.0, "ingest_s": 41.2, ...}
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from edgectx.errors import UsageError
from edgectx.tui.widgets.prompt import PromptInput

KEYS = "abcdefghijklmnopqrstuvwxyz"


def send_key(app, key: str, char: str | None = None) -> None:
    """A key press as Pilot makes one, without its wait for the process to go idle."""
    from textual import events

    event = events.Key(key, key if char is None and len(key) == 1 else char)
    event.set_sender(app)
    app._driver.send_message(event)


async def time_presses(pilot, app, n: int, running: Callable[[], bool], gap_s: float = 0.05) -> list[float]:
    """Seconds from each key press to the prompt holding the character, for up to `n` presses made while `running()`.

    Keys go in as Pilot sends them (a Key event through the headless driver), but without `pilot.press`'s
    wait for the process to go idle: a busy worker keeps the process from idling, so that wait would time
    the worker, not the UI."""
    prompt = app.chat.query_one(PromptInput)
    prompt.focus()
    await asyncio.sleep(0.05)
    times = []
    for i in range(n):
        if not running():
            break
        key = KEYS[i % len(KEYS)]
        expected = prompt.text + key
        t0 = time.perf_counter()
        send_key(app, key)
        while prompt.text != expected:
            await asyncio.sleep(0.0005)
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(gap_s)
    return times


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    if not ms:
        return {"presses": 0}
    return {"presses": len(ms), "median_ms": round(statistics.median(ms), 1), "max_ms": round(ms[-1], 1),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1)}


def run_tui_latency(load_engine, source: str, context_tokens: int, presses: int = 20) -> dict:
    """Attach the first `context_tokens` of `source` in the real app and time `presses` key presses during the read."""
    from edgectx.store.conversations import ConversationStore
    from edgectx.tui.app import EdgectxApp
    from edgectx.tui.bridge import Bridge

    with tempfile.TemporaryDirectory() as tmp:
        engine = load_engine()
        ids = engine.tokenizer.encode(source)[:context_tokens]
        doc = Path(tmp) / "corpus.txt"
        doc.write_text(engine.tokenizer.decode(ids), encoding="utf-8")
        result: dict = {}
        with ConversationStore(Path(tmp) / "edgectx.db") as store:  # empty: no snapshot to restore
            app = EdgectxApp(Bridge(lambda progress: engine, store))

            async def drive() -> None:
                async with app.run_test(size=(120, 40)) as pilot:
                    await app.workers.wait_for_complete()
                    await pilot.pause()
                    await pilot.press("ctrl+o")
                    await pilot.pause()
                    await pilot.press(*str(doc))
                    send_key(app, "enter", "\r")
                    t0 = time.perf_counter()
                    while app.chat.busy != "attach":
                        if time.perf_counter() - t0 > 60:
                            raise UsageError("The document was not read (the app refused it): nothing to measure.")
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(1.0)  # into the read proper
                    times = await time_presses(pilot, app, presses, lambda: app.chat.busy == "attach",
                                               gap_s=0.25)
                    await app.workers.wait_for_complete()
                    await pilot.pause()
                    result.update(summary(times), ingest_s=round(time.perf_counter() - t0, 1),
                                  context_tokens=len(engine.tokens), notice=app.chat.query_one("Transcript").messages[-1][1])

            asyncio.run(drive())
    return result
