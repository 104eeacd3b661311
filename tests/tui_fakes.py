"""Helpers for the TUI's tests: a fake engine (the parts ChatSession, ChatRecorder and the bridge use, no
model) and an app that records its notifications, with small Pilot helpers.

The fake tokenizer is one token per character; the fake answer is a fixed list of pieces, one per token,
optionally slowed down so a test can stop it half way.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from edgectx.engine import Cancelled, GenerationStats
from edgectx.tui.app import EdgectxApp
from edgectx.tui.widgets.transcript import Transcript


class FakeTokenizer:
    add_bos = False

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def piece(self, token_id: int) -> bytes:
        return chr(token_id).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        return chr(token_id)


class FakeTemplate:
    source = "<role>content</role>"  # names no thinking tags (FakeTemplate.source = THINKING: a reasoning model's)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    def __init__(self, answer: list[str] | None = None, piece_delay_s: float = 0.0,
                 stats: dict | None = None, name: str = "fake-model.gguf"):
        self.path = Path("/models") / name
        self.fingerprint = "f" * 64
        self.spec = SimpleNamespace(describe=lambda: "fake, 0M parameters")
        self.device = SimpleNamespace(type="cpu")
        self.memory_config = SimpleNamespace(chunk_tokens=512)  # documents need a memory: the fake "has" one
        self.retrieved: list[dict] = []  # what each answer reports as retrieved (GenerationStats.retrieved)
        self.chunk_busy_s = 0.0  # prefill: Python work per chunk, holding the GIL, as a long read's loop does
        self.tokenizer, self.template = FakeTokenizer(), FakeTemplate()
        self.answer = answer if answer is not None else ["Hello", " **world**", "!"]
        self.piece_delay_s = piece_delay_s
        self.fixed_stats = stats
        self.tokens: list[int] = []
        self.last_stats = GenerationStats()
        self.started = threading.Event()  # set when the first piece is out

    def reset(self) -> None:
        self.tokens = []

    def reusable(self, ids) -> int:
        reused = 0
        while reused < min(len(ids) - 1, len(self.tokens)) and ids[reused] == self.tokens[reused]:
            reused += 1
        return reused

    def sync(self, ids, progress=None, cancel=None) -> int:
        if cancel and cancel():
            raise Cancelled("Cancelled; the tokens read so far stay in memory.")
        reused = self.reusable(ids)
        self.tokens = list(ids)
        self.last_stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=reused)
        return reused

    def generate(self, params, max_tokens=512, stop=(), cancel=None):
        stats = self.last_stats
        stats.stop_reason = "eog"
        for piece in self.answer[:max_tokens]:
            if cancel and cancel():
                stats.stop_reason = "cancelled"
                break
            time.sleep(self.piece_delay_s)
            self.tokens += self.tokenizer.encode(piece)
            stats.generated_tokens += 1
            self.started.set()
            yield piece
        stats.retrieved = list(self.retrieved)

    def prefill(self, ids, chunk_tokens=512, progress=None, cancel=None):
        for start in range(0, len(ids), chunk_tokens):
            if cancel and cancel():
                raise Cancelled("Cancelled; the tokens read so far stay in memory.")
            end = time.perf_counter() + self.chunk_busy_s
            while time.perf_counter() < end:
                pass
            self.tokens += ids[start : start + chunk_tokens]
            if progress:
                progress(min(start + chunk_tokens, len(ids)), len(ids))

    def snapshot(self, path, codec="int4"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fake snapshot")
        return SimpleNamespace(path=path, snapshot_bytes=13)

    def configure_memory(self, memory_config, n_ctx=None):
        self.memory_config = memory_config
        self.reset()

    def stats(self) -> dict:
        if self.fixed_stats is not None:
            return dict(self.fixed_stats)
        return {"tokens": len(self.tokens), "device_kv_bytes": 1024 * len(self.tokens), "host_kv_bytes": 0,
                "context_tokens": 4096}


class RecordingApp(EdgectxApp):
    """The app, keeping every notification it shows: (message, severity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes: list[tuple[str, str]] = []

    def notify(self, message, *, title="", severity="information", timeout=None, markup=True):
        self.notes.append((str(message), severity))
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)


async def settle(pilot, app) -> None:
    """Wait until the running job (model load, answer, read) has finished and its messages are handled."""
    await app.workers.wait_for_complete()
    for _ in range(3):
        await pilot.pause()


async def wait_for(pilot, condition, what: str, tries: int = 400) -> None:
    for _ in range(tries):
        if condition():
            return
        await pilot.pause(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def shown(app) -> list[tuple[str, str]]:
    return [m for m in app.chat.query_one(Transcript).messages if m[0] != "notice"]


def stored(store, conversation_id) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in store.messages(conversation_id)]
