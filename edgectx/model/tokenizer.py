"""llama.cpp's exact tokenizer for a GGUF model (llama-cpp-python, `vocab_only=True`) and a UTF-8-safe
streaming detokenizer.

A token may end in the middle of a UTF-8 character (byte-level BPE splits 世 into three tokens), so
streamed text goes through an incremental decoder that holds incomplete sequences back.

    tok = Tokenizer(Path("model.gguf"))
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")
    stream = tok.stream_decoder(); text = "".join(stream.feed(i) for i in ids) + stream.flush()
"""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path
from typing import Protocol

from edgectx.errors import ModelFileError


@contextlib.contextmanager
def quiet_stderr():
    """Silence llama.cpp's C-level logging, which `verbose=False` does not fully stop."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


class TextTokenizer(Protocol):
    """What the engine, chat and documents need of a tokenizer: this llama.cpp one for GGUF models, or
    edgectx.model.hf_tokenizer's for Hugging Face directories. `piece` is the exact bytes a token renders to
    (control tokens: none); `token_text` writes control tokens out."""

    vocab_size: int
    bos_id: int
    eos_id: int
    add_bos: bool
    eog_ids: frozenset[int]

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]: ...

    def piece(self, token_id: int) -> bytes: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def stream_decoder(self) -> "StreamDecoder": ...


class StreamDecoder:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.piece(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    def __init__(self, path: Path):
        import llama_cpp

        try:
            with quiet_stderr():
                self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelFileError(f"llama.cpp cannot read the vocabulary of {path} ({e}): the file is damaged or too new.") from None
        model = self._llama._model
        self.vocab_size = model.n_vocab()
        self.bos_id = model.token_bos()
        self.eos_id = model.token_eos()
        self.add_bos = bool(model.add_bos_token())
        self._vocab = model.vocab
        self.eog_ids = frozenset(i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        self._pieces: dict[int, bytes] = {}

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`; `special` parses control tokens such as <|im_start|> written in the text."""
        if not text:
            return [self.bos_id] if add_bos else []
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def piece(self, token_id: int) -> bytes:
        """The bytes a token renders to; control tokens render to nothing."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._to_piece(token_id, special=False)
            self._pieces[token_id] = piece
        return piece

    def _to_piece(self, token_id: int, special: bool) -> bytes:
        import ctypes

        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # the piece needs -n bytes

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """The token as written in text, control tokens included (for templates and stop lists)."""
        return self._to_piece(token_id, special=True).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)
