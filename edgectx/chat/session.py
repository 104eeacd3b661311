"""A multi-turn conversation over one engine: messages in, streamed answers out, the KV cache kept.

Each turn renders the whole conversation with the model's template. When the rendered text extends
the text already in memory, only the new suffix is tokenized and prefilled (llama.cpp-style prefix
reuse); otherwise the engine reuses the longest common token prefix.

    chat = ChatSession(engine, system="Be brief.")
    for piece in chat.send("Hello!", SamplingParams()):
        print(piece, end="")
    chat.engine.last_stats.reused_tokens  # tokens the second turn did not prefill again
    chat.pop_turn()  # "Hello!" and its answer leave; the memory is cut back when the next turn is sent
"""

from __future__ import annotations

from typing import Iterator

from edgectx.chat.opening import Opening, system_content
from edgectx.chat.reasoning import prompt_opens_thinking, template_reasons
from edgectx.engine import Cancel, Engine, Progress
from edgectx.errors import UsageError
from edgectx.model.sampling import SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, opening: Opening | None = None,
                 template_vars: dict | None = None):
        """With `opening` (documents), the engine's memory must already hold `opening.ids` (open_documents).
        `template_vars`: more names for the chat template (Qwen3's `enable_thinking`)."""
        self.engine = engine
        self.template_vars = dict(template_vars or {})
        self.opening = opening
        self.messages: list[dict[str, str]] = []
        content = system_content(opening.blocks if opening else "", system)
        if content:
            self.messages.append({"role": "system", "content": content})
        self._memory_text = opening.text if opening else ""  # the exact text whose tokens the engine's memory holds
        self._memory_len: int | None = None  # how many of the engine's tokens that text is; None: all of them
        self._turns: list[tuple[int, str, int]] = []  # per turn sent: (messages before it, memory text, tokens)
        self.opened_thinking = False  # the last prompt left a thinking block open (edgectx.chat.reasoning)

    @property
    def reasons(self) -> bool:
        """Whether the model reasons before answering (its template names the thinking block's tags)."""
        return template_reasons(self.engine.template.source)

    def _ids_for(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        tokenizer = self.engine.tokenizer
        text = self.engine.template.render(messages, add_generation_prompt=True, **self.template_vars)
        cached = self._memory_text
        held = self.engine.tokens if self._memory_len is None else self.engine.tokens[: self._memory_len]
        if cached and text.startswith(cached) and len(held) > 0:
            return held + tokenizer.encode(text[len(cached) :]), text
        return tokenizer.encode(text, add_bos=tokenizer.add_bos), text

    def _prompt_tokens(self) -> list[int]:
        ids, self._memory_text = self._ids_for(self.messages)
        self._memory_len = None
        self.opened_thinking = prompt_opens_thinking(self._memory_text)
        return ids

    def plan(self, content: str) -> tuple[int, int]:
        """(tokens already in memory, tokens to prefill) if `content` were sent now; changes nothing."""
        ids, _ = self._ids_for(self.messages + [{"role": "user", "content": content}])
        cached = self.engine.reusable(ids)
        return cached, len(ids) - cached

    def pop_turn(self) -> str:
        """Take back the last user message and everything after it (to regenerate, or to edit and resend);
        returns that message. The memory keeps its tokens until the next `send`, which cuts them off and
        prefills only from where the turn began."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last is None:
            raise UsageError("There is no message to send again yet.")
        content = self.messages[last]["content"]
        mark = self._turns.pop() if self._turns and self._turns[-1][0] == last else None
        while self._turns and self._turns[-1][0] > last:
            self._turns.pop()
        del self.messages[last:]
        if mark is not None:
            _, self._memory_text, self._memory_len = mark
        elif self.opening is not None and self.engine.tokens[: len(self.opening.ids)] == self.opening.ids:
            self._memory_text, self._memory_len = self.opening.text, len(self.opening.ids)  # a resumed turn
        else:
            self._memory_text, self._memory_len = "", None
        return content

    def send(self, content: str, params: SamplingParams, max_tokens: int = 512, stop: tuple[str, ...] = (),
             progress: Progress | None = None, cancel: Cancel | None = None) -> Iterator[str]:
        """Add a user message and stream the assistant's answer, which joins the conversation when done."""
        held = len(self.engine.tokens) if self._memory_len is None else self._memory_len
        self._turns.append((len(self.messages), self._memory_text, held))
        self.messages.append({"role": "user", "content": content})
        try:
            self.engine.sync(self._prompt_tokens(), progress=progress, cancel=cancel)
        except BaseException:
            self.messages.pop()
            self._turns.pop()
            self._memory_text, self._memory_len = "", None
            raise
        start = len(self.engine.tokens)
        answer = []
        try:
            for piece in self.engine.generate(params, max_tokens=max_tokens, stop=stop, cancel=cancel):
                answer.append(piece)
                yield piece
        finally:
            # The memory holds the prompt plus every generated token, whatever stopped generation.
            self._memory_text += self.engine.tokenizer.decode(self.engine.tokens[start:])
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def reset(self) -> None:
        """A new conversation over the same documents (their tokens stay in memory; later ones are dropped)."""
        system = [m for m in self.messages if m["role"] == "system"]
        self.messages = system[:1]
        self._turns, self._memory_len = [], None
        if self.opening is not None and self.engine.tokens[: len(self.opening.ids)] == self.opening.ids:
            self.engine.sync(self.opening.ids)
            self._memory_text = self.opening.text
            return
        self._memory_text = ""
        self.engine.reset()
