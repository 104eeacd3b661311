"""Map tokens back to the characters of the text they came from, for citations.

Offsets go through bytes: each token's piece (the bytes it renders to) is matched against the UTF-8 text in
turn, and the byte where it starts is turned into a char offset. A byte-level BPE token can start inside a
character (世 may be three tokens of one byte each); such a token maps to the start of that character, so
the character's span belongs to the last token that starts inside it and the earlier ones get empty spans.
Tokens that render to nothing (a leading BOS, other control tokens) take the offset where the next text starts.

    offsets = token_char_offsets(tokenizer, text, ids)
    start, end = char_span(offsets, len(text), 10, 42)  # text[start:end] is what tokens 10..41 cover
"""

from __future__ import annotations

from typing import Protocol, Sequence

_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that do not start a character


class PieceSource(Protocol):
    def piece(self, token_id: int) -> bytes: ...

    def token_text(self, token_id: int) -> str: ...


def token_char_offsets(tokenizer: PieceSource, text: str, ids: Sequence[int]) -> list[int]:
    """For each of `ids`, the char offset in `text` where its token starts.

    `ids` must tokenize `text` or a prefix of it (with or without a leading BOS); otherwise ValueError.
    """
    data = text.encode("utf-8")
    offsets = []
    pos = 0  # byte in `data` where the next token starts
    chars_before = 0  # characters that start before `pos`
    fragment_start = True  # SentencePiece may put its dummy space before the first text after a control token
    for k, token_id in enumerate(ids):
        inside_char = pos < len(data) and 0x80 <= data[pos] < 0xC0
        offsets.append(chars_before - 1 if inside_char else chars_before)
        n_bytes = _bytes_of_token(tokenizer, token_id, data, pos, fragment_start)
        fragment_start = not tokenizer.piece(token_id)
        if n_bytes is None:
            raise ValueError(f"token {k} (id {token_id}, {tokenizer.piece(token_id)!r}) does not match the text at byte {pos}: "
                             f"the ids are not this text's tokens")
        chars_before += len(data[pos : pos + n_bytes].translate(None, _CONTINUATION))
        pos += n_bytes
    return offsets


def _bytes_of_token(tokenizer: PieceSource, token_id: int, data: bytes, pos: int, fragment_start: bool) -> int | None:
    """How many bytes of `data` from `pos` the token covers, or None when it does not match there."""
    piece = tokenizer.piece(token_id)
    if piece and data.startswith(piece, pos):
        return len(piece)
    if fragment_start and piece[:1] == b" " and data.startswith(piece[1:], pos):  # SentencePiece's dummy prefix: "hi" -> "▁hi"
        return len(piece) - 1
    if not piece:  # a control token: written out in the text when it was encoded with special=True
        written = tokenizer.token_text(token_id).encode("utf-8")
        return len(written) if written and data.startswith(written, pos) else 0
    return None


def char_span(offsets: Sequence[int], text_len: int, first_token: int, end_token: int) -> tuple[int, int]:
    """Chars [start, end) covered by tokens [first_token, end_token); the last token runs to `text_len`."""
    if not 0 <= first_token <= end_token <= len(offsets):
        raise ValueError(f"token range [{first_token}, {end_token}) is outside 0..{len(offsets)}")
    start = offsets[first_token] if first_token < len(offsets) else text_len
    end = offsets[end_token] if end_token < len(offsets) else text_len
    return start, end
