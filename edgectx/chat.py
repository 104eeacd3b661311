"""A multi-turn conversation over one engine: messages in, streamed answers out, the KV cache kept.

Each turn renders the whole conversation with the model's template. When the rendered text extends
the text already in memory, only the new suffix is tokenized and prefilled (llama.cpp-style prefix
reuse); otherwise the engine reuses the longest common token prefix.

    chat = ChatSession(engine, system="Be brief.")
    for piece in chat.send("Hello!", SamplingParams()):
        print(piece, end="")
    chat.engine.last_stats.reused_tokens  # tokens the second turn did not prefill again
"""

from __future__ import annotations

from typing import Iterator

from edgectx.doc_context import Opening, system_content
from edgectx.engine import Cancel, Engine, Progress
from edgectx.sampling import SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, opening: Opening | None = None):
        """With `opening` (documents), the engine's memory must already hold `opening.ids` (open_documents)."""
        self.engine = engine
        self.opening = opening
        self.messages: list[dict[str, str]] = []
        content = system_content(opening.blocks if opening else "", system)
        if content:
            self.messages.append({"role": "system", "content": content})
        self._memory_text = opening.text if opening else ""  # the exact text whose tokens the engine's memory holds

    def _prompt_tokens(self) -> list[int]:
        tokenizer = self.engine.tokenizer
        text = self.engine.template.render(self.messages, add_generation_prompt=True)
        cached = self._memory_text
        if cached and text.startswith(cached) and len(self.engine.tokens) > 0:
            ids = self.engine.tokens + tokenizer.encode(text[len(cached) :])
        else:
            ids = tokenizer.encode(text, add_bos=tokenizer.add_bos)
        self._memory_text = text
        return ids

    def send(self, content: str, params: SamplingParams, max_tokens: int = 512, stop: tuple[str, ...] = (),
             progress: Progress | None = None, cancel: Cancel | None = None) -> Iterator[str]:
        """Add a user message and stream the assistant's answer, which joins the conversation when done."""
        self.messages.append({"role": "user", "content": content})
        try:
            self.engine.sync(self._prompt_tokens(), progress=progress, cancel=cancel)
        except BaseException:
            self.messages.pop()
            self._memory_text = ""
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
        if self.opening is not None and self.engine.tokens[: len(self.opening.ids)] == self.opening.ids:
            self.engine.sync(self.opening.ids)
            self._memory_text = self.opening.text
            return
        self._memory_text = ""
        self.engine.reset()
