"""Locret retaining heads: a small MLP per layer predicting how much attention each token will receive.

Per layer, `silu(x @ fc1.T) @ fc2.T` maps a token's pre-RoPE [Q, K, V] projections (concatenated, as
the model computes them) to one score per KV head: its predicted "causal importance", the largest
attention logit later queries will give it. `HeadsScorer` plugs the scores into ContextMemory's
eviction interface; they are computed once per token, beside attention, in prefill and decode.

Heads are safetensors files whose metadata names the model they belong to (its weights fingerprint);
loading refuses heads made for another model. `edgectx heads train` writes them (edgectx.train.heads);
`import_locret` converts the heads published with Locret (a state dict of per-layer fc1/fc2 weights).
Lookup order for a model: the user's data dir (`heads/<fingerprint>.safetensors`), then the heads that
ship with edgectx for the embedded model.

    heads = load_heads(path, spec, fingerprint)
    memory = ContextMemory(spec, rope, device, dtype, config, scorer=HeadsScorer(heads))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgectx.config import data_dir
from edgectx.errors import EdgectxError
from edgectx.model.spec import ModelSpec

FORMAT = "edgectx-retaining-heads"
VERSION = 1
SHIPPED_DIR = Path(__file__).parents[1] / "data" / "heads"  # edgectx/data/heads, package data


class HeadsError(EdgectxError):
    """Retaining heads that cannot be read or do not belong to the model."""


@dataclass
class HeadsInfo:
    fingerprint: str  # the model's weights fingerprint (edgectx.model.fingerprint)
    model_name: str
    source: str  # "trained" | "locret-import"
    training: dict = field(default_factory=dict)  # settings, time and loss curve of `heads train`


class RetainingHeads(nn.Module):
    """All layers' heads as two stacked weights: fc1 (n_layers, hidden, in), fc2 (n_layers, n_kv, hidden)."""

    def __init__(self, spec: ModelSpec, hidden: int):
        super().__init__()
        self.spec = spec
        n_in = spec.q_dim + 2 * spec.kv_dim
        self.fc1 = nn.Parameter(torch.empty(spec.n_layers, hidden, n_in))
        self.fc2 = nn.Parameter(torch.empty(spec.n_layers, spec.n_kv_heads, hidden))
        for w in (self.fc1, self.fc2):  # nn.Linear's default initialization, per layer
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    @property
    def hidden(self) -> int:
        return self.fc1.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n_layers, T, in) -> scores (n_layers, T, n_kv): every layer at once (training)."""
        return torch.bmm(F.silu(torch.bmm(x, self.fc1.transpose(1, 2))), self.fc2.transpose(1, 2))

    def layer_scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, n_kv) for one layer (inference)."""
        return F.silu(x @ self.fc1[layer].T) @ self.fc2[layer].T


def qkv_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE q (n_heads, T, d), k and v (n_kv, T, d) -> (T, in): the projections as the model emits them."""
    return torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in (q, k, v)], dim=-1)


class HeadsScorer:
    """Eviction scores from retaining heads: static per token, fixed once computed (Locret)."""

    name = "heads"
    observes = False
    scores_steps_together = True  # a decode step: every layer's one token in one batched product (step_scores)
    zero_steps = False

    def __init__(self, heads: RetainingHeads):
        self.heads = heads

    def new_token_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        x = qkv_features(q, k, v).to(self.heads.fc1.dtype)
        return self.heads.layer_scores(layer, x).T.float()

    def step_features(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token's input to the heads, (1, in); `step_scores` scores every layer's together."""
        return qkv_features(q, k, v)

    def step_scores(self, features: torch.Tensor) -> torch.Tensor:
        """features (n_layers, in), layer by layer -> scores (n_layers, n_kv, 1): 3 ops for the whole step
        where `new_token_scores` per layer made ~8 each."""
        return self.heads(features[:, None].to(self.heads.fc1.dtype)).transpose(1, 2).float()

    def update(self, stored: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        return stored


# -- files --------------------------------------------------------------------------------------------


def _shape_metadata(spec: ModelSpec) -> dict[str, str]:
    return {"n_layers": str(spec.n_layers), "n_heads": str(spec.n_heads), "n_kv_heads": str(spec.n_kv_heads),
            "head_dim": str(spec.head_dim)}


def save_heads(heads: RetainingHeads, path: Path, info: HeadsInfo) -> Path:
    """Write heads as fp16 safetensors with their metadata; atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "version": str(VERSION), "model_fingerprint": info.fingerprint,
                "model_name": info.model_name, "source": info.source, "activation": "silu",
                "hidden": str(heads.hidden), "training": json.dumps(info.training), **_shape_metadata(heads.spec)}
    tensors = {"fc1": heads.fc1.detach().to("cpu", torch.float16).contiguous(),
               "fc2": heads.fc2.detach().to("cpu", torch.float16).contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HeadsError(f"Cannot write the heads to {path}: {e.strerror or e}.") from None
    return path


def read_heads_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise HeadsError(f"Heads file not found: {path}.") from None
    except Exception as e:  # safetensors raises its own error type, or OSError, on damaged headers
        raise HeadsError(f"{path} is not a readable safetensors heads file ({type(e).__name__}).") from None
    if metadata.get("format") != FORMAT:
        raise HeadsError(f"{path} is a safetensors file but not edgectx retaining heads: convert Locret heads with `edgectx heads import`.")
    if metadata.get("version") != str(VERSION):
        raise HeadsError(f"{path} holds heads in format version {metadata.get('version')}; this edgectx reads version {VERSION}.")
    return metadata


def load_heads(path: Path, spec: ModelSpec, fingerprint: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[RetainingHeads, HeadsInfo]:
    """Read heads, refusing with one sentence heads that are damaged or belong to another model."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    meta = read_heads_metadata(path)
    if meta.get("model_fingerprint") != fingerprint:
        raise HeadsError(f"{path} holds retaining heads for another model ({meta.get('model_name', 'unknown')}): "
                         "train heads for this one with `edgectx heads train`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            fc1, fc2 = f.get_tensor("fc1"), f.get_tensor("fc2")
    except Exception as e:
        raise HeadsError(f"{path} is damaged: its tensors cannot be read ({type(e).__name__}).") from None
    n_in = spec.q_dim + 2 * spec.kv_dim
    if fc1.dim() != 3 or fc2.dim() != 3 or fc1.shape[0] != spec.n_layers or fc1.shape[2] != n_in \
            or tuple(fc2.shape) != (spec.n_layers, spec.n_kv_heads, fc1.shape[1]):
        raise HeadsError(f"{path} has heads of shape {tuple(fc1.shape)}/{tuple(fc2.shape)}, which do not fit this model.")
    if not (torch.isfinite(fc1).all() and torch.isfinite(fc2).all()):
        raise HeadsError(f"{path} is damaged: its weights are not finite numbers.")
    heads = RetainingHeads(spec, fc1.shape[1])
    with torch.no_grad():
        heads.fc1.copy_(fc1), heads.fc2.copy_(fc2)
    heads.requires_grad_(False)
    info = HeadsInfo(fingerprint, meta.get("model_name", ""), meta.get("source", ""), json.loads(meta.get("training") or "{}"))
    return heads.to(device=device, dtype=dtype), info


def user_heads_path(fingerprint: str) -> Path:
    """Where `heads train` and `heads import` put heads by default, and where lookup looks first."""
    return data_dir() / "heads" / f"{fingerprint[:16]}.safetensors"


def find_heads(fingerprint: str) -> Path | None:
    """The heads to use for a model by default: the user's own, else those shipped with edgectx."""
    for path in (user_heads_path(fingerprint), SHIPPED_DIR / f"{fingerprint[:16]}.safetensors"):
        if path.is_file():
            return path
    return None


# -- Locret's published heads -------------------------------------------------------------------------

_LOCRET_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.fc([12])\.weight$")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise HeadsError(f"{path} is not a readable safetensors file ({type(e).__name__}).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except FileNotFoundError:
        raise HeadsError(f"File not found: {path}.") from None
    except Exception as e:  # weights_only refuses pickled code; damaged zips raise their own errors
        raise HeadsError(f"{path} is not a plain PyTorch state dict of tensors ({type(e).__name__}): it cannot be imported safely.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadsError(f"{path} does not hold a state dict.")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def import_locret(path: Path, spec: ModelSpec) -> RetainingHeads:
    """Convert Locret's per-layer `...layers.{i}.self_attn.fc1/fc2.weight` tensors (bf16) into RetainingHeads."""
    path = Path(path).expanduser()
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for key, tensor in _read_state_dict(path).items():
        m = _LOCRET_KEY.search(key)
        if m:
            weights[int(m.group(1)), int(m.group(2))] = tensor
    if not weights:
        raise HeadsError(f"{path} holds no Locret retaining heads (no `layers.N.self_attn.fc1.weight` keys).")
    n_layers = 1 + max(layer for layer, _ in weights)
    missing = [f"layer {i} fc{j}" for i in range(n_layers) for j in (1, 2) if (i, j) not in weights]
    if missing:
        raise HeadsError(f"{path} is incomplete: it lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")
    fc1 = torch.stack([weights[i, 1] for i in range(n_layers)]).float()
    fc2 = torch.stack([weights[i, 2] for i in range(n_layers)]).float()
    n_in = spec.q_dim + 2 * spec.kv_dim
    if n_layers != spec.n_layers or fc1.shape[2] != n_in or fc2.shape[1] != spec.n_kv_heads or fc2.shape[2] != fc1.shape[1]:
        raise HeadsError(f"{path} has heads for a model with {n_layers} layers, input width {fc1.shape[2]} and "
                         f"{fc2.shape[1]} KV heads; this model has {spec.n_layers}, {n_in} and {spec.n_kv_heads}: "
                         "they were trained for another model.")
    heads = RetainingHeads(spec, fc1.shape[1])
    with torch.no_grad():
        heads.fc1.copy_(fc1), heads.fc2.copy_(fc2)
    return heads
