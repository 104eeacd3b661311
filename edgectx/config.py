"""Where edgectx keeps its files, and the user's config file (TOML).

Data (conversations, snapshots) lives under platformdirs' user data dir, or `$EDGECTX_HOME` when set;
the config file under the user config dir, or `$EDGECTX_CONFIG`. A missing config file is an empty
config; a malformed one is a clear error naming the file.

    cfg = load_config()
    cfg.model_paths  # extra GGUF files or folders listed by `edgectx models`
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from edgectx.errors import UsageError

APP = "edgectx"


def data_dir() -> Path:
    home = os.environ.get("EDGECTX_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP, appauthor=False))


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
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept for later versions


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"The config file {path} is not valid TOML ({e}): fix or delete it.") from None
    known = {"model", "model_paths", "system", "device", "threads", "budget", "positions", "scorer", "snapshot_codec", "weights"}
    paths = raw.get("model_paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UsageError(f"In {path}, model_paths must be a list of strings.")
    return Config(
        model=raw.get("model"),
        model_paths=tuple(paths),
        system=raw.get("system"),
        device=raw.get("device", "auto"),
        threads=raw.get("threads"),
        budget=raw.get("budget"),
        positions=raw.get("positions"),
        scorer=raw.get("scorer"),
        snapshot_codec=raw.get("snapshot_codec"),
        weights=raw.get("weights"),
        extra={k: v for k, v in raw.items() if k not in known},
    )
