"""Write one tiny random model twice: as a Hugging Face checkpoint directory and as a GGUF file.

The tokenizer is trained here on a few KB of the standard library's source: a SentencePiece BPE model
(Llama 2's settings: byte fallback, identity normalization, a dummy prefix) or a byte-level BPE
`tokenizer.json` built with the tokenizers library. The GGUF gets the same vocabulary (llama.cpp's
"llama" SPM or "gpt2" BPE tokenizer) and the weights converted as convert_hf_to_gguf converts them
(llama Q/K rows permuted for llama.cpp's rotary layout), so both sources must give the same logits.

    hf_dir, gguf_path = write_tiny_pair(tmp_path, arch="llama", tokenizer="spm")
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

from tiny_gguf import CHATML, _permute

CONTROL = ("<|im_start|>", "<|im_end|>")


def training_text() -> str:
    """About 12 KB of real text and code (textwrap's source), plus a line of accented and CJK text."""
    return Path(textwrap.__file__).read_text(encoding="utf-8")[:12000] + "\nCafé déjà vu, naïve façade. 世界你好。\n"


def train_sentencepiece(out_dir: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in training_text().splitlines() if line.strip()),
        model_writer=model, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, control_symbols=list(CONTROL), split_digits=True, minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def train_bpe_json(out_dir: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", *CONTROL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text().splitlines(keepends=True), trainer)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def train_metaspace_json(out_dir: Path, vocab_size: int = 300) -> Path:
    """A Llama/Mistral-style tokenizer.json: ▁ for spaces, a prepended ▁, <0xNN> byte-fallback tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *CONTROL], show_progress=False)
    tok.train_from_iterator(training_text()[:6000].splitlines(keepends=True), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens, as SentencePiece-converted tokenizers carry them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    path = out_dir / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def _weights(arch: str, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
             tied: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim, s = dim // n_heads, dim**-0.5

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, dim, scale=1.0), "model.norm.weight": 1.0 + rand(dim, scale=0.1)}
    if not tied:
        w["lm_head.weight"] = rand(vocab, dim, scale=2.0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        q, k, v = rand(n_heads * head_dim, dim, scale=2 * s), rand(n_kv_heads * head_dim, dim, scale=2 * s), rand(n_kv_heads * head_dim, dim, scale=s)
        gate, up = rand(ffn_dim, dim, scale=s), rand(ffn_dim, dim, scale=s)
        w[p + "input_layernorm.weight"] = 1.0 + rand(dim, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + rand(dim, scale=0.1)
        w[p + "self_attn.o_proj.weight"] = rand(dim, n_heads * head_dim, scale=s)
        w[p + "mlp.down_proj.weight"] = rand(dim, ffn_dim, scale=ffn_dim**-0.5)
        if arch == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
            w[p + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
            continue
        w.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
        if arch == "qwen2":
            for n, rows in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads)):
                w[p + f"self_attn.{n}_proj.bias"] = rand(rows * head_dim, scale=0.3)
        if arch == "qwen3":
            for n in "qk":
                w[p + f"self_attn.{n}_norm.weight"] = 1.0 + rand(head_dim, scale=0.3)
    return w


def _gguf_tensors(arch: str, w: dict[str, np.ndarray], n_layers: int, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """convert_hf_to_gguf's renaming (and llama's Q/K permutation)."""
    out = {"token_embd.weight": w["model.embed_tokens.weight"], "output_norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w:
        out["output.weight"] = w["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             **{f"self_attn.{n}_proj.{kind}": f"attn_{n}.{kind}" for n in "qkv" for kind in ("weight", "bias")},
             **{f"self_attn.{n}_norm.weight": f"attn_{n}_norm.weight" for n in "qk"}}
    for i in range(n_layers):
        for hf_name, gguf_name in names.items():
            array = w.get(f"model.layers.{i}.{hf_name}")
            if array is None:
                continue
            if arch == "llama" and hf_name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                array = _permute(array, n_heads if "q_proj" in hf_name else n_kv_heads)
            out[f"blk.{i}.{gguf_name}"] = array
    return out


def _add_vocab(writer: gguf.GGUFWriter, hf_dir: Path) -> tuple[int, int | None]:
    """The directory's vocabulary as llama.cpp's tokenizer metadata; returns (eos id, bos id)."""
    T = gguf.TokenType
    if (hf_dir / "tokenizer.json").is_file():
        spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = dict(spec["model"]["vocab"])
        added = {t["content"]: t["id"] for t in spec["added_tokens"]}
        vocab.update(added)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([int(T.CONTROL if t in added else T.NORMAL) for t in tokens])
        writer.add_token_merges(merges)
        writer.add_add_bos_token(False)
        return vocab["<|im_end|>"], None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    types = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i) else T.NORMAL for i in range(n)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([int(t) for t in types])
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.add_unk_token_id(sp.unk_id())
    return sp.piece_to_id("<|im_end|>"), sp.bos_id()


def llama3_factors(rope_base: float, head_dim: int, factor: float, low: float, high: float, old_context: int) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf writes for Llama 3.1's rope scaling."""
    wavelen = 2 * np.pi * rope_base ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (old_context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, mid)).astype(np.float32)


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict, rope_base: float, head_dim: int, config: dict) -> dict[str, np.ndarray]:
    """What convert_hf_to_gguf writes for config.json's rope_scaling: metadata, or factor tensors."""
    kind = rope["rope_type"]
    if kind == "longrope":  # phi3: short/long factor tensors and a magnitude correction
        context, original = config["max_position_embeddings"], config["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(context / original) / math.log(original)))
        return {"rope_factors_short.weight": np.array(rope["short_factor"], np.float32),
                "rope_factors_long.weight": np.array(rope["long_factor"], np.float32)}
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_factors(rope_base, head_dim, rope["factor"], rope["low_freq_factor"],
                                                    rope["high_freq_factor"], rope["original_max_position_embeddings"])}
    writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
    writer.add_rope_scaling_factor(rope["factor"])
    if "original_max_position_embeddings" in rope:
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    return {}


def write_tiny_pair(out: Path, arch: str = "llama", tokenizer: str = "spm", seed: int = 0, n_layers: int = 2,
                    dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2, ffn_dim: int = 128,
                    context_length: int = 1024, rope_base: float = 10000.0, tied: bool = True,
                    rope_scaling: dict | None = None, extra_config: dict | None = None, name: str | None = None) -> tuple[Path, Path]:
    """`rope_scaling`: config.json's, e.g. {"rope_type": "linear", "factor": 4.0}; the GGUF gets the same.
    `extra_config`: more config.json fields (phi3's original_max_position_embeddings)."""
    name = name or f"{arch}-{tokenizer}"
    hf_dir = out / name
    hf_dir.mkdir(parents=True)
    tok_path = train_sentencepiece(hf_dir) if tokenizer == "spm" else train_bpe_json(hf_dir)
    if tokenizer == "spm":
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=str(tok_path)).get_piece_size()
        special = {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True}
    else:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)
        special = {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": CHATML}), encoding="utf-8")
    weights = _weights(arch, vocab, dim, n_layers, n_heads, n_kv_heads, ffn_dim, tied, seed)
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                "phi3": "Phi3ForCausalLM"}[arch]],
              "model_type": arch, "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "max_position_embeddings": context_length,
              "rms_norm_eps": 1e-5, "rope_theta": rope_base, "tie_word_embeddings": tied, "vocab_size": vocab,
              "torch_dtype": "float32", **({"rope_scaling": rope_scaling} if rope_scaling else {}), **(extra_config or {})}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    gguf_path = out / f"{name}.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), arch)
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_base)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_vocab_size(vocab)
    eos, bos = _add_vocab(writer, hf_dir)
    writer.add_eos_token_id(eos)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_chat_template(CHATML)
    extra = _add_rope_scaling(writer, rope_scaling, rope_base, dim // n_heads, config) if rope_scaling else {}
    for tensor_name, array in {**_gguf_tensors(arch, weights, n_layers, n_heads, n_kv_heads), **extra}.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_dir, gguf_path
