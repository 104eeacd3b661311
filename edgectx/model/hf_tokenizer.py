"""Tokenizers for Hugging Face model directories, with the same interface as the llama.cpp one.

`tokenizer.json` goes through the `tokenizers` library; otherwise `tokenizer.model` through
sentencepiece. Either way a token's piece is the bytes it renders to, as llama.cpp renders them:
SentencePiece's ▁ is a space (so a leading dummy-prefix space stays, as with a GGUF SPM model), a
<0xNN> byte-fallback token is that byte, a byte-level BPE token maps back through GPT-2's byte table,
and control tokens render to nothing. Streaming goes through the shared UTF-8-safe `StreamDecoder`.

    tok = load_hf_tokenizer(Path("~/models/Qwen2.5-0.5B-Instruct"))
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")
    tok.decode(ids[3:])  # 'hi'
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgectx.errors import ModelFileError
from edgectx.model.hf_tokenizer_config import END_OF_TURN_TOKENS, TokenizerSettings, read_tokenizer_settings
from edgectx.model.tokenizer import StreamDecoder

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level table, reversed: each of 256 printable characters back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class _HFTokenizer:
    """What both directory tokenizers share: special tokens, BOS/EOS, a piece cache, decoding."""

    def __init__(self, settings: TokenizerSettings, specials: dict[str, int], vocab_size: int, default_add_bos: bool):
        self.vocab_size = vocab_size
        self._specials = specials  # control token text -> id, parsed out of text when special=True
        self._control_ids = frozenset(specials.values())
        self._pieces: dict[int, bytes] = {}
        self.bos_id = self._id_of(settings.bos_token, settings.bos_id)
        eos = self._id_of(settings.eos_token, None)
        eos_ids = set(settings.extra_eos_ids) | {i for text, i in specials.items() if text in END_OF_TURN_TOKENS}
        self.eos_id = eos if eos is not None else min(eos_ids, default=-1)
        self.eog_ids = frozenset(eos_ids | ({self.eos_id} if self.eos_id >= 0 else set()))
        self.add_bos = self.bos_id >= 0 and (default_add_bos if settings.add_bos is None else settings.add_bos)

    def _id_of(self, text: str | None, fallback: int | None) -> int:
        token_id = self._lookup(text) if text else None
        return token_id if token_id is not None else (fallback if fallback is not None else -1)

    def _lookup(self, text: str) -> int | None:
        raise NotImplementedError

    def piece(self, token_id: int) -> bytes:
        """The bytes a token renders to; control tokens render to nothing."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = b"" if token_id in self._control_ids else self._render(token_id)
            self._pieces[token_id] = piece
        return piece

    def _render(self, token_id: int) -> bytes:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class SentencePieceTokenizer(_HFTokenizer):
    """`tokenizer.model` through sentencepiece; control tokens (and <unk>, as llama.cpp does) written in
    the text are split out first."""

    def __init__(self, model_file: Path, settings: TokenizerSettings):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ModelFileError(f"sentencepiece cannot read {model_file} ({e}): download it again.") from None
        n = self._sp.get_piece_size()
        self._added = {i: text for i, (text, _) in settings.added_tokens.items()}
        specials = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        specials.update({text: i for i, (text, special) in settings.added_tokens.items() if special})
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")") if specials else None
        bos = self._sp.bos_id()
        if settings.bos_id is None and bos >= 0:
            settings.bos_id = bos
        if not settings.eos_token and self._sp.eos_id() >= 0:
            settings.eos_token = self._sp.id_to_piece(self._sp.eos_id())
        super().__init__(settings, specials, max([n - 1, *self._added]) + 1, default_add_bos=True)

    def _lookup(self, text: str) -> int | None:
        for i, added in self._added.items():
            if added == text:
                return i
        token_id = self._sp.piece_to_id(text)
        return None if self._sp.is_unknown(token_id) and text != self._sp.id_to_piece(token_id) else token_id

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`; `special` parses control tokens such as <s> written in the text.
        Each stretch of text (the whole text, or what follows a control token) gets SentencePiece's
        dummy-prefix space, as llama.cpp's SPM tokenizer does."""
        ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        parts = self._split.split(text) if special and self._split else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def _render(self, token_id: int) -> bytes:
        if token_id in self._added or token_id >= self._sp.get_piece_size():
            return self._added.get(token_id, "").encode("utf-8")
        text = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(_BYTE_TOKEN.fullmatch(text).group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """The token as written in text, control tokens included (for templates and stop lists)."""
        if token_id in self._control_ids:
            return self._added.get(token_id) or self._sp.id_to_piece(token_id)
        return self.piece(token_id).decode("utf-8", errors="replace")


class JsonTokenizer(_HFTokenizer):
    """`tokenizer.json` through the `tokenizers` library, which also parses its added tokens."""

    def __init__(self, json_file: Path, settings: TokenizerSettings):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(json_file))
            self._plain = tokenizers.Tokenizer.from_file(str(json_file))  # special=False: added tokens are text
            spec = json.loads(json_file.read_text(encoding="utf-8"))
        except Exception as e:  # the library raises bare Exceptions on malformed files
            raise ModelFileError(f"The tokenizers library cannot read {json_file} ({e}): download it again.") from None
        self._plain.encode_special_tokens = True
        decoder = json.dumps(spec.get("decoder") or {})
        self._byte_level = '"ByteLevel"' in decoder
        self._bytes = gpt2_byte_decoder()
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        specials = {t.content: i for i, t in added.items() if t.special}
        specials.update({text: i for i, (text, special) in settings.added_tokens.items() if special})
        bos_text = settings.bos_token
        default_add_bos = False
        if bos_text and self._tok.token_to_id(bos_text) is not None:
            with_specials = self._tok.encode("a", add_special_tokens=True).ids
            default_add_bos = with_specials[:1] == [self._tok.token_to_id(bos_text)]  # the post-processor adds it
        super().__init__(settings, specials, self._tok.get_vocab_size(with_added_tokens=True), default_add_bos)

    def _lookup(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`; `special` parses added tokens such as <|im_start|> written in the text."""
        ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        if text:
            ids += (self._tok if special else self._plain).encode(text, add_special_tokens=False).ids
        return ids

    def _render(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        text = self._tok.id_to_token(token_id)
        if text is None:
            return b""
        if self._byte_level and all(c in self._bytes for c in text):
            return bytes(self._bytes[c] for c in text)
        byte = _BYTE_TOKEN.fullmatch(text)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id]
        return self.piece(token_id).decode("utf-8", errors="replace")


def load_hf_tokenizer(path: Path) -> SentencePieceTokenizer | JsonTokenizer:
    """The directory's tokenizer: tokenizer.json if present (the fast tokenizer), else tokenizer.model."""
    settings = read_tokenizer_settings(path)
    if (path / "tokenizer.json").is_file():
        return JsonTokenizer(path / "tokenizer.json", settings)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", settings)
    raise ModelFileError(f"{path} has neither tokenizer.json nor tokenizer.model: copy the tokenizer files from the model's repository.")
