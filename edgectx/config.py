"""Where edgectx keeps its files, and the user's config file (TOML).

Data (conversations, snapshots) lives under platformdirs' user data dir, or `$EDGECTX_HOME` when set;
files edgectx can rebuild (models the benchmarks write) under `cache_dir()`; the config file under
the user config dir, or `$EDGECTX_CONFIG`. A missing config file is an empty config; a malformed one
(bad TOML, or a value of the wrong kind) is a clear error naming the file. The TUI's settings screen
writes it back with `save_config`: only the keys it changes, the others (unknown ones too) kept,
through a temporary file renamed over the old one.

    cfg = load_config()
    cfg.model_paths  # extra GGUF files or folders listed by `edgectx models`
    save_config({"temperature": 0.2, "keys": {"regenerate": "ctrl+r"}})
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from edgectx.errors import UsageError
from edgectx.quant.formats import SNAPSHOT_CODECS, WEIGHT_FORMATS

APP = "edgectx"


def data_dir() -> Path:
    home = os.environ.get("EDGECTX_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """`$EDGECTX_CACHE`, else `$EDGECTX_HOME/cache` (one variable moves everything), else the user cache dir."""
    explicit = os.environ.get("EDGECTX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("EDGECTX_HOME")
    return Path(home).expanduser() / "cache" if home else Path(platformdirs.user_cache_dir(APP, appauthor=False))


def config_path() -> Path:
    explicit = os.environ.get("EDGECTX_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_config_dir(APP, appauthor=False)) / "config.toml"


@dataclass(frozen=True)
class Config:
    model: str | None = None  # default model path; the embedded SmolLM2 when unset
    model_paths: tuple[str, ...] = ()  # extra GGUF files or folders to list
    system: str | None = None  # default system prompt
    device: str = "auto"
    threads: int | None = None
    budget: int | str | None = None  # device KV budget in tokens, or "full"; `chat --budget` overrides it
    positions: str | None = None  # compact | original
    scorer: str | None = None  # auto | heads | attention | window
    snapshot_codec: str | None = None  # fp16 | int8 | int4 (default int4): how ingest and chat --doc store snapshots
    weights: str | None = None  # auto | fp16 | nf4 | int8 (default auto); `--weights` overrides it
    temperature: float | None = None  # sampling defaults of the TUI (the flags override them); None: built-in
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    theme: str | None = None  # the TUI's Textual theme
    # whether a reasoning model (Qwen3) thinks before answering: unset as its template has it, false asks for none
    # (its template's enable_thinking; `--no-thinking` says false for one run)
    thinking: bool | None = None
    engine_url: str | None = None  # a remote engine (OpenAI chat API) for chat and the TUI, e.g. http://host:8000/v1
    keys: dict = field(default_factory=dict)  # TUI action -> key(s), e.g. {"regenerate": "ctrl+r"}
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for later versions


def _number(value, name: str, kind: type, low: float, high: float | None, path: Path):
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        what = "a number" if kind is float else "a whole number"
        raise UsageError(f"In {path}, {name} must be {what} {span} (got {value!r}).")
    return kind(value)


def _validated(raw: dict, path: Path) -> Config:
    known = {f for f in Config.__dataclass_fields__ if f != "extra"}
    paths = raw.get("model_paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UsageError(f"In {path}, model_paths must be a list of strings.")
    for name in ("model", "system", "device", "positions", "scorer", "theme", "weights", "engine_url"):
        if name in raw and not isinstance(raw[name], str):
            raise UsageError(f"In {path}, {name} must be a string (got {raw[name]!r}).")
    weights = raw.get("weights")
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise UsageError(f"In {path}, weights must be one of {', '.join(WEIGHT_FORMATS)} (got {weights!r}).")
    codec = raw.get("snapshot_codec")
    if codec is not None and codec not in SNAPSHOT_CODECS:
        raise UsageError(f"In {path}, snapshot_codec must be one of {', '.join(SNAPSHOT_CODECS)} (got {codec!r}).")
    budget = raw.get("budget")
    if budget is not None and budget != "full" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 64):
        raise UsageError(f"In {path}, budget must be a token count of at least 64, or \"full\" (got {budget!r}).")
    thinking = raw.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise UsageError(f"In {path}, thinking must be true or false (got {thinking!r}).")
    keys = raw.get("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in keys.items()):
        raise UsageError(f'In {path}, [keys] must map action names to keys, e.g. regenerate = "ctrl+r".')
    numbers = {"temperature": (float, 0.0, 5.0), "top_p": (float, 0.0, 1.0), "top_k": (int, 0, None),
               "max_tokens": (int, 1, None), "threads": (int, 1, None)}
    checked = {name: _number(raw[name], name, *spec, path) for name, spec in numbers.items() if raw.get(name) is not None}
    return Config(
        model=raw.get("model"), model_paths=tuple(paths), system=raw.get("system"), device=raw.get("device", "auto"),
        budget=budget, positions=raw.get("positions"), scorer=raw.get("scorer"), snapshot_codec=codec,
        weights=weights, theme=raw.get("theme"), thinking=thinking, keys=dict(keys), engine_url=raw.get("engine_url"),
        **checked,
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _read_raw(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"The config file {path} is not valid TOML ({e}): fix or delete it.") from None


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    return _validated(_read_raw(path), path)


def save_config(changes: dict, path: Path | None = None) -> Config:
    """Set the given keys (None removes one) in the config file, keeping every other key; returns the new config.

    The result is validated before anything is written, so a bad value raises UsageError and the file stays
    as it was; the new file replaces the old one by rename, so a crash leaves one or the other, whole."""
    path = path or config_path()
    raw = _read_raw(path)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    config = _validated(raw, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps_toml(raw))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"Cannot write the config file {path}: {e.strerror}.") from None
    return config


# -- writing TOML (Python's tomllib only reads): strings, numbers, booleans, lists of those, and tables of them,
# which is all a config holds; the output reads back equal with tomllib.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes, except that TOML has no \/ (json never emits it).
    return json.dumps(text, ensure_ascii=False)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: tables inside tables
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict) -> str:
    plain = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{_key(k)}]\n" + "".join(f"{_key(kk)} = {_value(vv)}\n" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(["\n".join(plain) + "\n" if plain else ""] + tables).lstrip("\n")
