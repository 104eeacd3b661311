"""A reasoning model's thinking, told apart from its answer as the text streams.

Models that reason before answering (Qwen3, DeepSeek-R1 and its distills, QwQ) write their thinking between
`<think>` and `</think>`, then the answer; their chat templates name the tags, and drop the thinking of past
turns themselves. Some templates open the block in the generation prompt (the prompt ends with `<think>`), so
the model writes only the closing tag. `ThinkingSplitter` takes the answer's text in the pieces it streams in
and gives back ("reasoning", text) and ("content", text) parts, the tags left out, holding back only what may
be the start of a tag split across pieces. Where the template names no tags, nothing is split: a `<think>` in
an ordinary model's answer is text.

    splitter = ThinkingSplitter(opened=prompt_opens_thinking(prompt))
    for piece in pieces:
        for kind, text in splitter.feed(piece): ...
    for kind, text in splitter.flush(): ...
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def template_reasons(template_source: str) -> bool:
    """Whether a chat template is a reasoning model's: it names the thinking block's tags."""
    return OPEN in template_source and CLOSE in template_source


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a thinking block open for the model to go on (and close)."""
    return prompt.rstrip().endswith(OPEN)


class ThinkingSplitter:
    def __init__(self, opened: bool = False):
        self.thinking = opened
        self._held = ""  # the end of the text so far that may begin a tag
        self._at_start = True  # at the start of the current part: leading whitespace after a tag is dropped

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._held + text
        self._held = ""
        while text:
            tag = CLOSE if self.thinking else OPEN
            at = text.find(tag)
            if at >= 0:
                self._emit(out, text[:at])
                text = text[at + len(tag) :]
                self.thinking, self._at_start = not self.thinking, True
                continue
            keep = _partial_tag(text, tag)
            self._emit(out, text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        """The text held back at the end (a tag's start that never finished)."""
        out: list[tuple[str, str]] = []
        held, self._held = self._held, ""
        self._emit(out, held)
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if self._at_start:
            text = text.lstrip()
        if not text:
            return
        self._at_start = False
        kind = "reasoning" if self.thinking else "content"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` are a proper prefix of `tag` (0 if none)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_answer(text: str) -> tuple[str, str]:
    """A whole answer's (thinking, answer): as the splitter gives them where a block closes (a closing tag with no
    opening one before it: the prompt opened the block); without a closing tag, ("", text) whole: whoever shows a
    stored answer may not know the model, and an ordinary answer may write `<think>`."""
    close, open_ = text.find(CLOSE), text.find(OPEN)
    if close < 0:
        return "", text
    splitter = ThinkingSplitter(opened=close >= 0 and (open_ < 0 or open_ > close))
    parts = splitter.feed(text) + splitter.flush()
    return ("".join(t for kind, t in parts if kind == "reasoning"), "".join(t for kind, t in parts if kind == "content"))


class Routing:
    """An answer's pieces sent on as they stream: the thinking to `on_reasoning`, the rest to `on_piece`; all of it
    to `on_piece` where there is no `on_reasoning` or the model does not reason. `opened()` says, at the first
    piece, whether the prompt opened the block. `close()` sends what the splitter held back."""

    def __init__(self, on_piece, on_reasoning=None, reasons: bool = True, opened=lambda: False):
        self.on_piece, self.on_reasoning = on_piece, on_reasoning if reasons else None
        self._opened, self._splitter = opened, None

    def __call__(self, piece: str) -> None:
        if self.on_reasoning is None:
            self.on_piece(piece)
            return
        if self._splitter is None:
            self._splitter = ThinkingSplitter(self._opened())
        self._send(self._splitter.feed(piece))

    def close(self) -> None:
        if self._splitter is not None:
            self._send(self._splitter.flush())

    def _send(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            (self.on_reasoning if kind == "reasoning" else self.on_piece)(text)
