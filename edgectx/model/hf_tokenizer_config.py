"""What a Hugging Face model directory says about its tokens: special tokens, BOS, end-of-turn ids and the
chat template, gathered from tokenizer_config.json, special_tokens_map.json, generation_config.json,
config.json and chat_template.jinja (newer `transformers` saves the template there).

    settings = read_tokenizer_settings(Path("~/models/Qwen2.5-0.5B-Instruct"))
    settings.chat_template, settings.eos_token, settings.extra_eos_ids
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgectx.errors import ModelFileError

# Control tokens that end a turn in common chat formats (llama.cpp treats the same ones as end-of-generation).
END_OF_TURN_TOKENS = frozenset({"<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|end_of_text|>", "</s>"})


@dataclass
class TokenizerSettings:
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool | None = None  # None: the tokenizer's own default
    chat_template: str | None = None
    added_tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (content, special)
    extra_eos_ids: frozenset[int] = frozenset()  # generation_config.json / config.json eos_token_id
    bos_id: int | None = None  # config.json / generation_config.json bos_token_id


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}): download it again.") from None
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _template(path: Path, config: dict[str, Any]) -> str | None:
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not source and (path / "chat_template.jinja").is_file():
        source = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not source:
        source = _json(path / "chat_template.json").get("chat_template")
    return source if isinstance(source, str) and source else None


def read_tokenizer_settings(path: Path) -> TokenizerSettings:
    config = _json(path / "tokenizer_config.json")
    special_map = _json(path / "special_tokens_map.json")
    generation = _json(path / "generation_config.json")
    model_config = _json(path / "config.json")
    added = {}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(token, dict) and str(key).isdigit() and _token_content(token):
            added[int(key)] = (token["content"], bool(token.get("special", False)))
    add_bos = config.get("add_bos_token")
    bos_ids = _ids(generation.get("bos_token_id")) or _ids(model_config.get("bos_token_id"))
    return TokenizerSettings(
        bos_token=_token_content(config.get("bos_token")) or _token_content(special_map.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")) or _token_content(special_map.get("eos_token")),
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        chat_template=_template(path, config),
        added_tokens=added,
        extra_eos_ids=frozenset(_ids(generation.get("eos_token_id")) | _ids(model_config.get("eos_token_id"))),
        bos_id=min(bos_ids) if bos_ids else None,
    )
