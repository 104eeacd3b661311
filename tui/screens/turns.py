"""What the chat screen does with the last turn: regenerate it, edit and resend it, copy a message, and reach
the last answer's sources. A mixin of ChatScreen (edgectx.tui.screens.chat), which runs the jobs.

    await screen.regenerate()   # Ctrl+R
    screen.edit_last()          # Ctrl+T: the prompt holds the last message; Enter resends it in its place
"""

from __future__ import annotations

from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.transcript import AssistantMessage, Transcript, UserMessage

BUSY = "Wait for the current task to finish, or press Esc to stop it."
EDITING = "Editing the last message: Enter resends it in its place, Esc cancels"


class TurnActions:
    async def regenerate(self) -> None:
        """Answer the last user message again, in place of its answer."""
        if not self._ready():
            return
        last = self.bridge.last_user_message()
        if last is None:
            self.say("There is no answer to regenerate yet: send a message first.", severity="warning")
            return
        await self._resend(last, regenerate=True)

    def edit_last(self) -> None:
        """Put the last user message in the prompt; sending it replaces that message and its answer."""
        last = self.bridge.last_user_message() if self.bridge.ready else None
        if last is None:
            self.say("There is no message to edit yet: send one first.", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.text = last
        prompt.move_cursor(prompt.document.end)
        prompt.border_title = EDITING
        self.editing = True
        prompt.focus()

    def _stop_editing(self) -> None:
        self.editing = False
        self.query_one(PromptInput).border_title = None

    async def _resend(self, text: str, regenerate: bool) -> None:
        def job():
            return self.bridge.redo(None if regenerate else text, on_piece=lambda p: self.post_message(self.Piece(p)),
                                    cancel=self._cancel.is_set, progress=self._progress,
                                    on_reasoning=lambda p: self.post_message(self.Thinking(p)))

        if self.busy is not None:
            self.say(BUSY, severity="warning")
            if not regenerate:
                self.query_one(PromptInput).text = text
            return
        # The answer's widget exists before the job starts: the app's key handler runs this outside the
        # screen's message queue, so the first pieces could otherwise arrive before it.
        transcript = self.query_one(Transcript)
        await transcript.drop_last_turn()
        await transcript.add_user(text)
        self._answer = await transcript.start_answer()
        self._start("send", job)

    def copy(self) -> None:
        """Copy the focused message, else the last answer, to the clipboard (OSC 52: works over SSH too)."""
        focused = self.app.focused
        message = focused if isinstance(focused, (UserMessage, AssistantMessage)) else self.query_one(Transcript).last_answer()
        if message is None or not message.text:
            self.say("Nothing to copy yet: no answer is shown.", severity="warning")
            return
        self.app.copy_to_clipboard(message.text)
        what = "message" if isinstance(message, UserMessage) else "answer"
        self.say(f"Copied the {what} ({len(message.text):,} characters) to the clipboard.")

    def sources(self) -> None:
        """Move to the last answer's citations (Enter opens one in the side panel)."""
        citations = self.query_one(Transcript).last_citations()
        if citations is None:
            self.say("The last answer cites no passages: only answers about attached documents that retrieved "
                     "from the memory have sources.", severity="warning")
            return
        citations.focus()
        citations.scroll_visible()

