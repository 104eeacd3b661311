"""Load a Hugging Face checkpoint directory (config.json + safetensors) into a `Transformer`.

The second model source beside GGUF: llama, mistral, qwen2 and phi3 checkpoints as `save_pretrained`
writes them, in one `model.safetensors` or sharded with `model.safetensors.index.json`. Weights are
read with the `safetensors` package layer by layer and go through the same `make_linear` as GGUF
weights, so a GPU quantizes them on load. HF stores Q/K rows in the half-split rotary layout the
model uses, so nothing is un-permuted here (GGUF's llama rows are; see gguf_loader).

    hf = open_hf_dir(Path("~/models/Qwen2.5-0.5B-Instruct"))
    model = load_model(hf, torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgectx.errors import ModelFileError, UnsupportedModelError
from edgectx.model.files import path_kind
from edgectx.model.transformer import Transformer
from edgectx.model.assembly import LayerWeights, LinearFactory, assemble_model
from edgectx.model.spec import SUPPORTED_ARCHS, ModelSpec, RopeScaling

INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: Path) -> bool:
    """A directory that holds a config.json and safetensors weights (what `edgectx models` lists)."""
    path = Path(path)
    try:
        return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    except OSError:  # a folder that cannot be entered holds nothing edgectx can list
        return False


@dataclass
class HFDir:
    path: Path
    config: dict[str, Any]
    files: dict[str, Path]  # tensor name -> the safetensors file holding it
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def has(self, name: str) -> bool:
        return name in self.files

    def _handle(self, file: Path):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelFileError(f"{file} is truncated or corrupt ({e}): download it again.") from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file(name)).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor as float32 (checkpoints store bf16, fp16 or fp32)."""
        from safetensors import SafetensorError

        try:
            return self._handle(self._file(name)).get_tensor(name).float()
        except SafetensorError as e:
            raise ModelFileError(f"{self._file(name)} cannot be read at {name} ({e}): download it again.") from None

    def _file(self, name: str) -> Path:
        file = self.files.get(name)
        if file is None:
            raise ModelFileError(f"{self.path} lacks the tensor {name}: the checkpoint is incomplete or not a "
                                 f"{self.config.get('model_type')} model.")
        return file


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelFileError(f"Cannot read {path}: {e.strerror}.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}): download it again.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} does not hold a JSON object: download it again.")
    return data


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index} lacks its weight_map: download it again.")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{path} lacks the shard {missing[0]} that {INDEX_FILE} names: finish the download.")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    # Mistral repositories also ship consolidated.safetensors, the same weights under other names.
    return sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))


def open_hf_dir(path: Path) -> HFDir:
    """Open a checkpoint directory: config.json, and every safetensors header (not the weights)."""
    path = Path(path).expanduser()
    if path_kind(path) != "dir":
        raise ModelFileError(f"{path} is not a directory: pass a Hugging Face model directory or a .gguf file.")
    if path_kind(path / "config.json") != "file":
        raise ModelFileError(f"{path} has no config.json: pass a Hugging Face model directory "
                             "(config.json and *.safetensors) or a .gguf file.")
    config = _read_json(path / "config.json")
    quantized = config.get("quantization_config") or config.get("quantization")  # the latter: MLX
    if quantized:
        method = quantized.get("quant_method", "a quantizer") if isinstance(quantized, dict) else "a quantizer"
        raise UnsupportedModelError(f"{path.name} is already quantized ({method}); edgectx reads fp16/bf16/fp32 "
                                    "checkpoints and quantizes them itself.")
    files = _weight_files(path)
    if not files:
        hint = " (it has PyTorch .bin weights: save it again with safetensors)" if any(path.glob("*.bin")) else ""
        raise ModelFileError(f"{path} has no *.safetensors weights{hint}.")
    hf = HFDir(path, config, {})
    for file in files:
        path_kind(file)  # a FIFO among the weights would block safe_open
        for name in hf._handle(file).keys():
            hf.files[name] = file
    return hf


def _rope_scaling(hf: HFDir, rope: dict[str, Any], theta: float, head_dim: int, rope_dim: int) -> tuple[RopeScaling, tuple | None, tuple | None]:
    """(scaling, freq_factors, long freq_factors) as convert_hf_to_gguf would write them."""
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    factor = float(rope.get("factor", 1.0) or 1.0)
    original = int(rope.get("original_max_position_embeddings") or hf.config.get("original_max_position_embeddings") or 0)
    if kind == "default":
        return RopeScaling(), None, None
    if kind == "linear":
        return RopeScaling("linear", factor), None, None
    if kind == "yarn":
        # HF's attention_factor replaces the 0.1*ln(factor)+1 magnitude that Rope applies itself.
        attn = rope.get("attention_factor")
        attn_factor = float(attn) / (1.0 + 0.1 * math.log(factor)) if attn and factor > 1 else 1.0
        return RopeScaling("yarn", factor, original, attn_factor, float(rope.get("beta_fast") or 32.0),
                           float(rope.get("beta_slow") or 1.0)), None, None
    if kind == "llama3":
        old = float(original or 8192)
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        factors = []
        for i in range(rope_dim // 2):
            wavelen = 2 * math.pi * theta ** (2 * i / rope_dim)
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return RopeScaling(), tuple(factors), None
    if kind in ("longrope", "su"):
        context = int(hf.config.get("max_position_embeddings", 0))
        scale = context / original if original else 1.0
        attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        short, long = (tuple(float(x) for x in rope.get(k) or ()) for k in ("short_factor", "long_factor"))
        if len(short) != rope_dim // 2 or len(long) != rope_dim // 2:
            raise ModelFileError(f"{hf.path / 'config.json'}: the longrope factors need {rope_dim // 2} values each, "
                                 f"not {len(short)} and {len(long)}.")
        return RopeScaling(original_context=original, attn_factor=attn), short, long
    raise UnsupportedModelError(f"{hf.path.name} uses RoPE scaling '{kind}', which edgectx does not support.")


def read_spec(hf: HFDir) -> ModelSpec:
    """Build the `ModelSpec` from config.json, refusing model types edgectx does not implement."""
    c = hf.config
    arch = c.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{hf.path.name} is a '{arch}' model; edgectx supports the {', '.join(SUPPORTED_ARCHS)} architectures."
        )

    def key(name: str) -> Any:
        if c.get(name) is None:
            raise ModelFileError(f"{hf.path / 'config.json'} lacks {name}: the checkpoint is incomplete.")
        return c[name]

    if c.get("mlp_bias") or (arch != "qwen2" and c.get("attention_bias")):
        raise UnsupportedModelError(f"{hf.path.name} has biases on its output or MLP projections, which edgectx does not support.")
    n_heads, dim = int(key("num_attention_heads")), int(key("hidden_size"))
    head_dim = int(c.get("head_dim") or dim // n_heads)
    rope_dim = int(head_dim * float(c.get("partial_rotary_factor", 1.0)))
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling, factors, factors_long = _rope_scaling(hf, rope, theta, head_dim, rope_dim)
    window = c.get("sliding_window") or 0
    if arch in ("qwen2", "qwen3") and not c.get("use_sliding_window"):
        window = 0
    return ModelSpec(
        arch=arch,
        n_layers=int(key("num_hidden_layers")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        ffn_dim=int(key("intermediate_size")),
        vocab_size=hf.shape("model.embed_tokens.weight")[0],
        context_length=int(key("max_position_embeddings")),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_base=theta,
        rope_dim=rope_dim,
        rope_scaling=scaling,
        rope_freq_factors=factors,
        rope_freq_factors_long=factors_long,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        tied_embeddings=bool(c.get("tie_word_embeddings")) or not hf.has("lm_head.weight"),
        sliding_window=int(window),
    )


def _layer_weights(hf: HFDir, spec: ModelSpec, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    t = hf.tensor
    if spec.arch == "phi3":  # fused already: qkv in Q, K, V order, gate_up gate first
        wqkv, w_gate_up = t(p + "self_attn.qkv_proj.weight"), t(p + "mlp.gate_up_proj.weight")
    else:
        wqkv = torch.cat([t(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        w_gate_up = torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")])
    bqkv = torch.cat([t(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None
    q_norm, k_norm = (t(p + f"self_attn.{n}_norm.weight") for n in "qk") if spec.qk_norm else (None, None)
    return LayerWeights(t(p + "input_layernorm.weight"), t(p + "post_attention_layernorm.weight"), wqkv,
                        t(p + "self_attn.o_proj.weight"), w_gate_up, t(p + "mlp.down_proj.weight"), bqkv, q_norm, k_norm)


def load_model(
    hf: HFDir,
    device: torch.device,
    dtype: torch.dtype,
    make_linear: LinearFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: str = "auto",
) -> Transformer:
    """Build the model layer by layer (peak memory: the model plus one layer of float32 weights).

    `make_linear(weight, bias)` turns float32 weights into a module; by default
    `edgectx.quant.linear_factories`' choice for the device and `weights`, as for GGUF models.
    """
    spec = read_spec(hf)
    head = None if spec.tied_embeddings else lambda: hf.tensor("lm_head.weight")
    return assemble_model(spec, device, dtype, hf.tensor("model.embed_tokens.weight"), hf.tensor("model.norm.weight"),
                          head, lambda i: _layer_weights(hf, spec, i), make_linear, weights, progress,
                          origin=(hf.path, "config.json"))
