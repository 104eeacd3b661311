"""One way to open a model from either source: a GGUF file or a Hugging Face checkpoint directory.

Each source supplies the same five things: the `ModelSpec`, a tokenizer (`TextTokenizer`), the chat
template, the weights' fingerprint (what keys snapshots and retaining heads) and the loaded `Transformer`.

    source = open_model(Path("model.gguf"))   # or Path("~/models/Qwen2.5-0.5B-Instruct")
    tokenizer = source.tokenizer()
    model = source.load_model(torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edgectx.model import gguf as gguf_loader
from edgectx.model import hf as hf_loader
from edgectx.model.chat_template import ChatTemplate
from edgectx.model.files import path_kind
from edgectx.model.transformer import Transformer
from edgectx.model.spec import ModelSpec
from edgectx.model.tokenizer import TextTokenizer


@dataclass
class ModelSource:
    path: Path
    kind: str  # gguf | hf
    spec: ModelSpec
    handle: gguf_loader.GGUFFile | hf_loader.HFDir

    def tokenizer(self) -> TextTokenizer:
        if self.kind == "hf":
            from edgectx.model.hf_tokenizer import load_hf_tokenizer

            return load_hf_tokenizer(self.path)
        from edgectx.model.tokenizer import Tokenizer

        return Tokenizer(self.path)

    def chat_template(self, tokenizer: TextTokenizer) -> ChatTemplate:
        if self.kind == "hf":
            from edgectx.model.hf_tokenizer_config import read_tokenizer_settings

            source = read_tokenizer_settings(self.path).chat_template
        else:
            source = self.handle.get("tokenizer.chat_template")
        return ChatTemplate(source, bos_token=tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id >= 0 else "",
                            eos_token=tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id >= 0 else "")

    def fingerprint(self) -> str:
        from edgectx.model.fingerprint import dir_fingerprint, weights_fingerprint

        return dir_fingerprint(self.handle) if self.kind == "hf" else weights_fingerprint(self.handle)

    def load_model(self, device: torch.device, dtype: torch.dtype, make_linear=None,
                   progress: Callable[[int, int], None] | None = None, weights: str = "auto") -> Transformer:
        loader = hf_loader if self.kind == "hf" else gguf_loader
        return loader.load_model(self.handle, device, dtype, make_linear=make_linear, progress=progress, weights=weights)


def open_model(path: Path) -> ModelSource:
    """Open a .gguf file or a checkpoint directory, validating it, without loading the weights."""
    path = Path(path).expanduser()
    if path_kind(path) == "dir":  # path_kind refuses FIFOs and devices, and turns an unreachable path into a sentence
        hf = hf_loader.open_hf_dir(path)
        return ModelSource(hf.path, "hf", hf_loader.read_spec(hf), hf)
    g = gguf_loader.open_gguf(path)
    return ModelSource(g.path, "gguf", gguf_loader.read_spec(g), g)
