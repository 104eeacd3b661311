"""The chat screen: the conversation list, the transcript, a progress row, the prompt and the status bar.

Engine work (loading the model, answering, opening documents) runs one job at a time in a thread worker
(`_job`) that calls the bridge; the worker reports back only through this screen's messages (`Piece`,
`Progressed`, `Problem`, `JobDone`, `JobFailed`), so widgets are touched on the UI thread alone. Esc sets
the job's cancel flag: an answer stops at the next token (and is kept), a read stops at the next chunk.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Label

from edgectx.engine import Cancelled
from edgectx.errors import EdgectxError
from edgectx.store_export import UNTITLED
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.prompts import Confirm, TextPrompt
from edgectx.tui.widgets.progress import WorkProgress
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.sidebar import ConversationList
from edgectx.tui.widgets.status import StatusBar
from edgectx.tui.widgets.transcript import AssistantMessage, Transcript

LONG_PROMPT_TOKENS = 2048  # a prompt this long to prefill gets the progress row
BUSY = "Wait for the current task to finish, or press Esc to stop it."


class ChatScreen(Screen):
    AUTO_FOCUS = "PromptInput"

    class Piece(Message):
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

    def __init__(self, bridge: Bridge, export_dir: Path | None = None):
        super().__init__()
        self.bridge = bridge
        self.export_dir = export_dir
        self.busy: str | None = None  # the running job's kind
        self._cancel = threading.Event()
        self._answer: AssistantMessage | None = None
        self._pending_resume: int | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="pane-title")
                yield ConversationList()
            with Vertical(id="chat"):
                yield Transcript()
                yield WorkProgress()
                yield PromptInput(id="prompt")
        yield StatusBar()
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_sidebar()
        self.query_one(StatusBar).show("loading the model…", {})
        self.query_one(WorkProgress).begin("Loading the model", unit="layers", cancel_key=None)
        self._start("load", lambda: self.bridge.load(progress=self._progress))

    # -- jobs --------------------------------------------------------------------------------------

    def _start(self, kind: str, job: Callable[[], object]) -> bool:
        if self.busy is not None:
            self.say(BUSY, severity="warning")
            return False
        self.busy = kind
        self._cancel.clear()
        self._job(kind, job)
        return True

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
        self.post_message(self.Progressed(done, total))

    def _problem(self, sentence: str) -> None:
        self.post_message(self.Problem(sentence))

    def cancel(self) -> None:
        """Esc: stop the answer or the read in progress (loading the model cannot be stopped)."""
        if self.busy in ("send", "attach", "resume"):
            self._cancel.set()

    # -- actions the app binds ---------------------------------------------------------------------

    async def new_conversation(self) -> None:
        if self._ready() and self._start("new", self.bridge.new_conversation):
            await self.query_one(Transcript).show([])

    def attach(self) -> None:
        if self._ready():
            self.app.push_screen(TextPrompt("Attach a document (text, Markdown, code or PDF)", placeholder="path/to/file"),
                                 self._attach_path)

    def _attach_path(self, path: str | None) -> None:
        if path is None:
            return

        def job() -> str:
            doc = self.bridge.read_document(path)  # refused files end here, before any model work
            return self.bridge.attach(doc, progress=self._progress, cancel=self._cancel.is_set, on_problem=self._problem)

        if self._start("attach", job):
            self.query_one(WorkProgress).begin(f"Reading {Path(path).name}")

    def rename(self) -> None:
        conversation_id = self.query_one(ConversationList).highlighted_id
        if conversation_id is None:
            self.say("No conversation to rename: send a message first.", severity="warning")
            return
        item = self.query_one(f"#conversation-{conversation_id}")
        title = item.conversation.title or UNTITLED

        async def done(new_title: str | None) -> None:
            if new_title:
                try:
                    self.bridge.rename(conversation_id, new_title)
                except EdgectxError as e:  # deleted meanwhile by another edgectx, or the store is locked
                    self.say(str(e), title="Error", severity="error")
                await self.refresh_sidebar()

        self.app.push_screen(TextPrompt(f"Rename “{title}”", value=title), done)

    def export(self) -> None:
        conversation_id = self.query_one(ConversationList).highlighted_id or self.bridge.conversation_id
        if conversation_id is None:
            self.say("No conversation to export: send a message first.", severity="warning")
            return
        try:
            path = self.bridge.export(conversation_id, self.export_dir or Path.cwd())
        except (EdgectxError, OSError) as e:
            self.say(f"Could not export conversation {conversation_id}: {e}", severity="error")
            return
        self.say(f"Exported conversation {conversation_id} to {path}", title="Exported")

    @on(ConversationList.DeleteRequested)
    def _delete(self, event: ConversationList.DeleteRequested) -> None:
        conversation_id = event.conversation_id

        def done(yes: bool | None) -> None:
            if yes:
                self._start("delete", lambda: self.bridge.delete(conversation_id))

        self.app.push_screen(Confirm(f"Delete conversation {conversation_id} and its messages?"), done)

    @on(ConversationList.Opened)
    async def _open(self, event: ConversationList.Opened) -> None:
        conversation_id = event.conversation_id
        if self.busy is not None:
            self.say(BUSY, severity="warning")
            return
        await self.query_one(Transcript).show(self.bridge.messages(conversation_id))
        self.query_one(PromptInput).focus()  # opened to continue it
        if not self.bridge.ready:
            self._pending_resume = conversation_id  # continued once the model has loaded
            return
        self._resume(conversation_id)

    def _resume(self, conversation_id: int) -> None:
        job = lambda: self.bridge.resume(conversation_id, progress=self._progress, cancel=self._cancel.is_set,  # noqa: E731
                                         on_problem=self._problem)
        if self._start("resume", job):
            self.query_one(WorkProgress).begin("Opening the conversation's documents")

    @on(PromptInput.Submitted)
    async def _send(self, event: PromptInput.Submitted) -> None:
        if not self._ready():
            self.query_one(PromptInput).text = event.text  # keep what the user typed
            return
        transcript = self.query_one(Transcript)

        def job():
            return self.bridge.send(event.text, on_piece=lambda p: self.post_message(self.Piece(p)),
                                    cancel=self._cancel.is_set, progress=self._progress)

        if not self._start("send", job):
            self.query_one(PromptInput).text = event.text
            return
        await transcript.add_user(event.text)
        self._answer = await transcript.start_answer()

    def say(self, sentence: str, *, title: str = "", severity: str = "information", timeout: float | None = None) -> None:
        """A notification; never parsed as markup, since sentences carry paths and error text."""
        self.notify(sentence, title=title, severity=severity, timeout=timeout, markup=False)

    def _ready(self) -> bool:
        if self.bridge.ready:
            return True
        self.say("The model is not loaded yet: wait for it, or restart edgectx with another --model.", severity="warning")
        return False

    # -- what the workers report -------------------------------------------------------------------

    @on(Piece)
    async def _piece(self, event: Piece) -> None:
        if self._answer is not None:
            await self._answer.write(event.text)

    @on(Progressed)
    def _progressed(self, event: Progressed) -> None:
        row = self.query_one(WorkProgress)
        if self.busy == "send" and not row.active and event.total >= LONG_PROMPT_TOKENS:
            row.begin("Reading the prompt")  # a long prompt: the documents read again after a stopped attach
        if event.total and row.active:
            row.advance(event.done, event.total)

    @on(Problem)
    def _warned(self, event: Problem) -> None:
        self.say(event.sentence, severity="warning", timeout=10)

    @on(JobDone)
    async def _done(self, event: JobDone) -> None:
        self.busy = None
        self.query_one(WorkProgress).end()
        transcript = self.query_one(Transcript)
        if event.kind == "send":
            await self._finish_answer(stopped=event.cancelled)
        elif event.kind == "load":
            await transcript.add_notice(f"Loaded {event.result}")
            if self._pending_resume is not None:
                self._resume(self._pending_resume)
                self._pending_resume = None
        elif event.kind == "resume" and event.cancelled:
            await transcript.show([])
            self.say("Stopped opening the conversation's documents: a new conversation is open instead.",
                        severity="warning")
        elif event.kind == "resume":
            await transcript.show(event.result.messages)
            for warning in event.result.warnings:
                self.say(warning, severity="warning", timeout=10)
            if event.result.documents_line:
                await transcript.add_notice(event.result.documents_line)
        elif event.kind == "attach" and event.cancelled:
            self.say("Stopped reading the document: the conversation goes on without it.", severity="warning")
        elif event.kind == "attach":
            await transcript.add_notice(event.result)
            self.say(event.result, title="Document ready")
        elif event.kind == "delete" and self.bridge.conversation_id is None:
            await transcript.show([])
        self.query_one(StatusBar).show(self.bridge.model_name, event.stats,
                                       event.result if event.kind == "send" else None)
        await self.refresh_sidebar()

    @on(JobFailed)
    async def _failed(self, event: JobFailed) -> None:
        self.busy = None
        self.query_one(WorkProgress).end()
        if event.kind == "send":
            await self._finish_answer(stopped=False)
        if event.kind == "load":
            self.query_one(StatusBar).show("no model loaded", {})
        self.say(event.sentence, title="Error", severity="error", timeout=15)
        await self.refresh_sidebar()

    async def _finish_answer(self, stopped: bool) -> None:
        if self._answer is not None:
            await self._answer.finish()
            self._answer = None
        if stopped:
            await self.query_one(Transcript).add_notice("(stopped: the answer so far is kept)")

    async def refresh_sidebar(self) -> None:
        await self.query_one(ConversationList).show(self.bridge.conversations(), self.bridge.conversation_id)
