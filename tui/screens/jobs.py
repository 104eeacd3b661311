"""The chat screen's one-at-a-time engine jobs: a thread worker runs each and reports back only through
messages (`Piece`, `Progressed`, `Problem`, `JobDone`, `JobFailed`), so widgets are touched on the UI
thread alone. A mixin of ChatScreen (edgectx.tui.screens.chat), which handles the messages. `_job_ended`
waits for the running job's thread, so a stopped job can be waited for before the app quits.

    self._start("attach", lambda: bridge.attach(doc, progress=self._progress, cancel=self._cancel.is_set))
"""

from __future__ import annotations

from typing import Callable

from textual import work
from textual.worker import Worker, WorkerCancelled, WorkerFailed
from textual.message import Message

from edgectx.engine import Cancelled
from edgectx.errors import EdgectxError
from edgectx.tui.screens.turns import BUSY


class JobRunner:
    class Piece(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class Thinking(Message):
        """A piece of a reasoning model's thinking (edgectx.chat.reasoning)."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class Progressed(Message):
        def __init__(self, done: int, total: int):
            super().__init__()
            self.done, self.total = done, total

    class Problem(Message):
        """A problem the job got past (a damaged snapshot read again), in one sentence."""

        def __init__(self, sentence: str):
            super().__init__()
            self.sentence = sentence

    class JobDone(Message):
        def __init__(self, kind: str, result, stats: dict, cancelled: bool):
            super().__init__()
            self.kind, self.result, self.stats, self.cancelled = kind, result, stats, cancelled

    class JobFailed(Message):
        def __init__(self, kind: str, sentence: str):
            super().__init__()
            self.kind, self.sentence = kind, sentence

    _worker: Worker | None = None

    def _start(self, kind: str, job: Callable[[], object]) -> bool:
        if self.busy is not None:
            self.say(BUSY, severity="warning")
            return False
        self.busy = kind
        self._cancel.clear()
        self._worker = self._job(kind, job)
        return True

    async def _job_ended(self) -> None:
        """Wait until the job's thread has returned (its JobDone or JobFailed message may still be queued)."""
        worker = self._worker
        if worker is not None:
            try:
                await worker.wait()
            except (WorkerCancelled, WorkerFailed):
                pass

    @work(thread=True, group="engine")
    def _job(self, kind: str, job: Callable[[], object]) -> None:
        try:
            result, cancelled = job(), self._cancel.is_set()
        except Cancelled:
            result, cancelled = None, True
        except EdgectxError as e:
            self.post_message(self.JobFailed(kind, str(e)))
            return
        except MemoryError:
            self.post_message(self.JobFailed(kind, "Out of memory: try a smaller model, a smaller --budget or a shorter document."))
            return
        except Exception as e:  # a bug: say so in one line and keep the app running
            self.post_message(self.JobFailed(kind, f"Unexpected error ({type(e).__name__}: {e}); please report it."))
            return
        self.post_message(self.JobDone(kind, result, self.bridge.stats(), cancelled))

    def _progress(self, done: int, total: int) -> None:
        if self._cancel.is_set() and self.busy in ("load", "switch"):
            raise Cancelled("The model was not loaded: edgectx is closing.")  # loading stops at its next layer
        self.post_message(self.Progressed(done, total))

    def _problem(self, sentence: str) -> None:
        self.post_message(self.Problem(sentence))
