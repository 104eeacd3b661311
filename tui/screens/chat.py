"""The chat screen: the conversation list with its search, the transcript with citations and the passage
panel, a progress row, the prompt and the status bar.

Engine work (loading the model, answering, opening documents) runs one job at a time in a thread worker
(`_job`, edgectx.tui.screens.jobs) that calls the bridge; the worker reports back only through messages (`Piece`,
`Progressed`, `Problem`, `JobDone`, `JobFailed`), so widgets are touched on the UI thread alone. Esc sets
the job's cancel flag: an answer stops at the next token (and is kept), a read stops at the next chunk.
Quitting and closing the conversation stop the job the same way, and wait for it (`stop_job`). A message sent
while the model loads waits in the transcript and goes out once the model is ready. While the user types,
the status bar says how much of the next prompt is already in memory (debounced).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label

from edgectx.errors import EdgectxError
from edgectx.store.export import UNTITLED
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.jobs import JobRunner
from edgectx.tui.screens.prompts import Confirm, TextPrompt
from edgectx.tui.widgets.citations import CitationList, PassagePanel
from edgectx.tui.widgets.progress import WorkProgress
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.sidebar import ConversationList
from edgectx.tui.widgets.status import StatusBar
from edgectx.tui.screens.turns import BUSY, TurnActions
from edgectx.tui.widgets.transcript import AssistantMessage, Transcript

LONG_PROMPT_TOKENS = 2048  # a prompt this long to prefill gets the progress row
STOP_WAIT_S = 10.0  # how long quitting waits for a stopped job to hand back (an answer stops at its next token)
QUEUED = "Loading the model: your message will be sent when it is ready."
READ_ONLY = "The conversation database is read-only: this session's messages are not saved."
PLAN_DELAY_S = 0.25  # the cached / to-prefill figure is computed once typing pauses this long


class ChatScreen(JobRunner, TurnActions, Screen):
    AUTO_FOCUS = "PromptInput"

    def __init__(self, bridge: Bridge, export_dir: Path | None = None):
        super().__init__()
        self.bridge = bridge
        self.export_dir = export_dir
        self.busy: str | None = None  # the running job's kind
        self._cancel = threading.Event()
        self._answer: AssistantMessage | None = None
        self._pending_resume: int | None = None
        self._queued: str | None = None  # a message sent while the model loads
        self.quitting = False  # the app is closing: what jobs report back is no longer shown
        self.editing = False  # the prompt holds the last user message, to resend in its place
        self._plan_timer = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Conversations", classes="pane-title")
                yield Input(placeholder="search (Ctrl+F)", id="search")
                yield ConversationList()
            with Vertical(id="chat"):
                yield Transcript()
                yield WorkProgress()
                yield PromptInput(id="prompt")
            yield PassagePanel()
        yield StatusBar()
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_sidebar()
        self.query_one(StatusBar).show("loading the model…", {})
        self.query_one(WorkProgress).begin("Loading the model", unit="layers", cancel_key=None)
        self._start("load", lambda: self.bridge.load(progress=self._progress))

    def cancel(self) -> None:
        """Esc: stop the answer or the read in progress (loading the model cannot be stopped); else leave editing."""
        if self.busy in ("send", "attach", "resume"):
            self._cancel.set()
        elif self.editing:
            self._stop_editing()
            self.query_one(PromptInput).clear()

    async def stop_job(self) -> None:
        """Stop the running job and wait until its worker has handed back: an answer keeps (and stores) what it
        has, a read stops at its next chunk, a model load at its next layer. Quitting and closing the conversation
        call this; so nothing outlives the app, and nothing writes into a store that is closing."""
        self._queued = self._pending_resume = None
        if self.busy is None:
            return
        self._cancel.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._job_ended()), STOP_WAIT_S)
        except asyncio.TimeoutError:
            pass  # a job that does not hand back (a very slow step): go on anyway

    # -- actions the app binds ---------------------------------------------------------------------

    async def new_conversation(self) -> None:
        if self.busy in ("send", "attach", "resume"):
            await self.stop_job()  # closing the conversation stops its answer (kept) or its read
        if self._ready() and self._start("new", self.bridge.new_conversation):
            self._stop_editing()
            await self.query_one(Transcript).show([])

    def search(self) -> None:
        self.query_one("#search", Input).focus()

    def switch_model(self, path: Path) -> None:
        if self._start("switch", lambda: self.bridge.switch_model(path, progress=self._progress)):
            self.query_one(WorkProgress).begin(f"Loading {path.name}", unit="layers", cancel_key=None)

    def set_budget(self, budget: int | str) -> None:
        self._start("budget", lambda: self.bridge.set_budget(budget))

    def attach(self) -> None:
        if self._ready():
            self.app.push_screen(TextPrompt("Attach a document (text, Markdown, code or PDF)", placeholder="path/to/file",
                                            paths=True),
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
        if self.busy in ("send", "attach", "resume"):
            await self.stop_job()  # closing the conversation stops its answer (kept) or its read
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
        self.query_one(StatusBar).plan = None
        if self.busy == "load" and not self.bridge.ready and self._queued is None:
            self._queued = event.text  # sent once the model is ready
            transcript = self.query_one(Transcript)
            await transcript.add_user(event.text)
            await transcript.add_notice(QUEUED)
            return
        if not self._ready():
            self.query_one(PromptInput).text = event.text  # keep what the user typed
            return
        if self.editing and self.busy is None:
            self._stop_editing()
            await self._resend(event.text, regenerate=False)
            return
        if self.editing:  # still editing: keep the text until the running job ends
            self.say(BUSY, severity="warning")
            self.query_one(PromptInput).text = event.text
            return
        await self._send_text(event.text)

    async def _send_text(self, text: str, shown: bool = False) -> None:
        """Answer `text` in a job; `shown`: the transcript holds the message already (it waited for the model)."""
        transcript = self.query_one(Transcript)

        def job():
            return self.bridge.send(text, on_piece=lambda p: self.post_message(self.Piece(p)),
                                    cancel=self._cancel.is_set, progress=self._progress,
                                    on_reasoning=lambda p: self.post_message(self.Thinking(p)))

        if not self._start("send", job):
            self.query_one(PromptInput).text = text
            return
        if not shown:
            await transcript.add_user(text)
        self._answer = await transcript.start_answer()

    @on(PromptInput.Changed)
    def _typed(self, event: PromptInput.Changed) -> None:
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(PLAN_DELAY_S, self._show_plan)

    def _show_plan(self) -> None:
        """How many tokens of the next prompt are in memory already, and how many it would prefill."""
        bar = self.query_one(StatusBar)
        text = self.query_one(PromptInput).text
        if self.busy is not None or not self.bridge.ready:
            return  # the engine's tokens are changing under a job; the figure comes when typing resumes
        try:
            bar.plan = self.bridge.plan(text)
        except EdgectxError:
            bar.plan = None

    @on(Input.Changed, "#search")
    async def _search(self, event: Input.Changed) -> None:
        await self.refresh_sidebar()

    @on(Input.Submitted, "#search")
    def _search_done(self, event: Input.Submitted) -> None:
        self.query_one(ConversationList).focus()

    @on(CitationList.Opened)
    def _open_citation(self, event: CitationList.Opened) -> None:
        self.query_one(PassagePanel).show(event.citation)

    def say(self, sentence: str, *, title: str = "", severity: str = "information", timeout: float | None = None) -> None:
        """A notification; never parsed as markup, since sentences carry paths and error text."""
        self.notify(sentence, title=title, severity=severity, timeout=timeout, markup=False)

    def _ready(self) -> bool:
        if self.bridge.ready:
            return True
        self.say("The model is not loaded yet: wait for it, or restart edgectx with another --model.", severity="warning")
        return False

    # -- what the workers report -------------------------------------------------------------------

    @on(JobRunner.Piece)
    async def _piece(self, event: JobRunner.Piece) -> None:
        if self._answer is not None:
            await self._answer.write(event.text)

    @on(JobRunner.Thinking)
    async def _thinking(self, event: JobRunner.Thinking) -> None:
        if self._answer is not None:
            await self._answer.write_thinking(event.text)

    @on(JobRunner.Progressed)
    def _progressed(self, event: JobRunner.Progressed) -> None:
        row = self.query_one(WorkProgress)
        if self.busy == "send" and not row.active and event.total >= LONG_PROMPT_TOKENS:
            row.begin("Reading the prompt")  # a long prompt: the documents read again after a stopped attach
        if event.total and row.active:
            row.advance(event.done, event.total)

    @on(JobRunner.Problem)
    def _warned(self, event: JobRunner.Problem) -> None:
        self.say(event.sentence, severity="warning", timeout=10)

    @on(JobRunner.JobDone)
    async def _done(self, event: JobRunner.JobDone) -> None:
        self.busy = None
        if self.quitting:
            return
        self.query_one(WorkProgress).end()
        transcript = self.query_one(Transcript)
        if event.kind == "send":
            await self._finish_answer(stopped=event.cancelled)
        elif event.kind == "load" and event.cancelled:
            self.query_one(StatusBar).show("no model loaded", {})
        elif event.kind == "load":
            await transcript.add_notice(f"Loaded {event.result}")
            if self.bridge.store.read_only:
                self.say(READ_ONLY, severity="warning", timeout=15)
            if self._pending_resume is not None:
                self._resume(self._pending_resume)
                self._pending_resume = None  # a message waiting for the model goes out once this is open
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
        elif event.kind in ("switch", "budget"):
            await transcript.show([])
            await transcript.add_notice(f"Loaded {event.result}" if event.kind == "switch" else
                                        f"Memory budget: {self.bridge.settings.budget} tokens; a new conversation is open.")
            if event.kind == "switch":
                self.app.model_switched(self.bridge.model_path)
        self.query_one(PromptInput).border_subtitle = self.bridge.model_name or None  # also when the status line is narrow
        self.query_one(StatusBar).show(self.bridge.model_name, event.stats,
                                       event.result if event.kind == "send" else None, snapshot=self.bridge.snapshot_state)
        if self.query_one(PromptInput).text.strip():
            self._show_plan()  # typed during the job: the memory it was figured against has changed
        await self.refresh_sidebar()
        if self._queued is not None and self.bridge.ready and self.busy is None:
            text, self._queued = self._queued, None
            if event.kind == "resume":  # the resumed conversation's transcript replaced the waiting message
                await transcript.add_user(text)
            await self._send_text(text, shown=True)

    @on(JobRunner.JobFailed)
    async def _failed(self, event: JobRunner.JobFailed) -> None:
        self.busy = None
        if self.quitting:
            return
        self.query_one(WorkProgress).end()
        if event.kind == "send":
            await self._finish_answer(stopped=False)
        if event.kind == "load":
            self.query_one(StatusBar).show("no model loaded", {})
            if self._queued is not None:  # the message that waited for the model goes back into the box
                self.query_one(PromptInput).text, self._queued = self._queued, None
        if event.kind == "switch" and self.bridge.ready:
            event.sentence += f" {self.bridge.model_name} stays loaded."
        self.say(event.sentence, title="Error", severity="error", timeout=15)
        await self.refresh_sidebar()

    async def _finish_answer(self, stopped: bool) -> None:
        if self._answer is not None:
            await self._answer.finish()
            self._answer = None
        transcript = self.query_one(Transcript)
        if stopped:
            await transcript.add_notice("(stopped: the answer so far is kept)")
        citations = self.bridge.citations()
        if citations:
            await transcript.add_citations(citations)

    async def refresh_sidebar(self) -> None:
        query = self.query_one("#search", Input).value
        try:
            conversations = self.bridge.conversations(query)
        except EdgectxError as e:
            self.say(str(e), title="Error", severity="error")
            return
        await self.query_one(ConversationList).show(conversations, self.bridge.conversation_id)
