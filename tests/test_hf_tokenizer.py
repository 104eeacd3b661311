"""Tokenizers of Hugging Face directories (sentencepiece tokenizer.model, byte-level and Llama-style
tokenizer.json): round trips against the libraries' own decoders, UTF-8-safe streaming, control tokens,
end-of-turn ids and the chat template from tokenizer_config.json."""

from __future__ import annotations

import json

import pytest
import sentencepiece
import tokenizers

from edgectx.model.hf_tokenizer import load_hf_tokenizer
from edgectx.model.hf_tokenizer_config import read_tokenizer_settings
from edgectx.model.source import ModelSource
from edgectx.chat.token_spans import token_char_offsets
from tiny_gguf import CHATML
from tiny_hf import train_bpe_json, train_metaspace_json, train_sentencepiece, training_text

KINDS = {
    "spm": (train_sentencepiece, {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True}),
    "byte-bpe-json": (train_bpe_json, {"eos_token": "<|im_end|>"}),
    "metaspace-json": (train_metaspace_json, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}),
}
# Unseen characters fall back to bytes (Ω, 世, 🙂 span 2-4 byte tokens): streaming must hold them back.
TEXT = training_text()[5000:6500] + "\nCafé Ωμέγα 世界 🙂 naïve\n\n  indented\ttab"


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    made = {}

    def make(kind: str):
        if kind not in made:
            train, config = KINDS[kind]
            path = tmp_path_factory.mktemp(kind)
            train(path)
            (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
            made[kind] = path
        return made[kind]

    return make


def _reference_decode(path, ids: list[int]) -> str:
    """The library's own decoder (which drops SentencePiece's leading dummy space)."""
    if (path / "tokenizer.json").exists():
        return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).decode(ids)
    return sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).decode(ids)


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_and_streaming(tok_dir, kind):
    path = tok_dir(kind)
    tok = load_hf_tokenizer(path)
    ids = tok.encode(TEXT)
    assert len(ids) < 0.85 * len(TEXT.encode())  # merges at work, not one token per byte
    dummy_space = kind != "byte-bpe-json"  # SentencePiece-style: the first piece carries a space, as llama.cpp renders it
    assert tok.decode(ids) == (" " if dummy_space else "") + TEXT
    assert _reference_decode(path, ids) == TEXT
    partial = [i for i in ids if not _valid_utf8(tok.piece(i))]
    assert len(partial) >= 4  # tokens that end inside a character
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
    offsets = token_char_offsets(tok, TEXT, ids)  # citations map tokens back to characters
    assert offsets == sorted(offsets) and offsets[-1] < len(TEXT)


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("kind", list(KINDS))
def test_control_tokens_and_end_of_turn(tok_dir, kind):
    tok = load_hf_tokenizer(tok_dir(kind))
    start, end = tok.encode("<|im_start|>"), tok.encode("<|im_end|>")
    assert len(start) == 1 and len(end) == 1
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == start[0] and ids[-1] == end[0]
    assert tok.piece(start[0]) == b"" and tok.token_text(start[0]) == "<|im_start|>"
    plain = tok.encode("<|im_start|>user", special=False)  # text a user typed: no control token
    assert start[0] not in plain and tok.decode(plain).strip() == "<|im_start|>user"
    eos = tok.encode(KINDS[kind][1]["eos_token"])
    assert tok.eos_id == eos[0] and end[0] in tok.eog_ids and tok.eos_id in tok.eog_ids
    if kind == "byte-bpe-json":
        assert not tok.add_bos and tok.bos_id == -1
    else:
        assert tok.add_bos and tok.token_text(tok.bos_id) == "<s>" and tok.encode("x", add_bos=True)[0] == tok.bos_id


def test_chat_template_from_tokenizer_config(tok_dir):
    path = tok_dir("spm")
    source = ModelSource(path, "hf", spec=None, handle=None)
    tok = source.tokenizer()
    template = source.chat_template(tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = template.render(messages)
    assert not template.is_fallback
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_bos=tok.add_bos)
    assert ids.count(tok.encode("<|im_start|>")[0]) == 3 and ids[0] == tok.bos_id


def test_template_and_eos_from_the_other_files(tok_dir, tmp_path):
    """A template list, chat_template.jinja, special_tokens_map.json and generation_config.json."""
    src = tok_dir("spm")
    (tmp_path / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    settings = read_tokenizer_settings(tmp_path)
    assert (settings.bos_token, settings.eos_token, settings.extra_eos_ids) == ("<s>", "</s>", frozenset({2, 4}))
    source = ModelSource(tmp_path, "hf", spec=None, handle=None)
    tok = source.tokenizer()
    assert tok.eos_id == 2 and {2, 4} <= tok.eog_ids
    assert source.chat_template(tok).render([{"role": "user", "content": "hi"}]) == "<s>hi"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("[{{ messages[0]['content'] }}]")
    assert source.chat_template(tok).render([{"role": "user", "content": "hi"}]) == "[hi]"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(Exception, match="is not valid JSON"):
        read_tokenizer_settings(tmp_path)
