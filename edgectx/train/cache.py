"""Read once, train many times: `edgectx heads train --cache DIR` keeps each sequence's training data.

Reading the text (full-attention passes that label every token) is most of a training run on a CPU;
fitting the heads is minutes. With a cache, a second run over the same text and label settings loads
each sequence's features and labels instead of reading it again, so trying another `--hidden`,
`--steps` or more text costs only the fit and the new sequences. One safetensors file per sequence,
named by a hash of everything its contents depend on: the model's fingerprint, the label settings and
the sequence's token ids. A damaged or mismatched file is read again and replaced, never trusted.

    cache = SequenceCache(Path("~/heads-cache"), engine.fingerprint, settings)
    hit = cache.load(ids, feature_shape, label_shape)   # None: read the sequence
    cache.save(ids, features, labels)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from edgectx.errors import UsageError

VERSION = 1
_LABEL_FIELDS = ("seq_len", "skip_first", "offset", "span", "label")  # the settings a sequence's data depends on


class SequenceCache:
    def __init__(self, root: Path, fingerprint: str, settings) -> None:
        self.root = Path(root).expanduser()
        labelling = {name: getattr(settings, name) for name in _LABEL_FIELDS}
        self._prefix = json.dumps({"version": VERSION, "model": fingerprint, **labelling}, sort_keys=True).encode()
        self.hits = self.misses = 0
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"The training cache {self.root} is a file, not a directory: pass a directory to --cache.")
        try:  # before any reading: a bad directory should not cost a sequence's pass first
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"Cannot write the training cache to {self.root}: {e.strerror or e}.") from None

    def path(self, ids: list[int]) -> Path:
        digest = hashlib.sha256(self._prefix)
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        return self.root / f"{digest.hexdigest()[:32]}.safetensors"

    def load(self, ids: list[int], feature_shape: tuple[int, ...], label_shape: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sequence's (features fp16, labels fp32), or None if it is not cached or its file is unusable."""
        from safetensors.torch import load_file

        try:  # missing, truncated, damaged or foreign: read the sequence again and overwrite the file
            data = load_file(str(self.path(ids)))
            features, labels = data["features"], data["labels"]
            usable = (tuple(features.shape) == feature_shape and features.dtype == torch.float16
                      and tuple(labels.shape) == label_shape and labels.dtype == torch.float32)
        except Exception:
            usable = False
        if not usable:
            self.misses += 1
            return None
        self.hits += 1
        return features, labels

    def save(self, ids: list[int], features: torch.Tensor, labels: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(ids)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp))
            tmp.replace(path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise UsageError(f"Cannot write the training cache to {self.root}: {e.strerror or e}.") from None
