"""Write tiny random GGUF models with the `gguf` package's writer, for conformance tests against llama.cpp.

Weights are drawn in Hugging Face layout and converted the way convert_hf_to_gguf does (llama Q/K
rows permuted for llama.cpp's rotary layout, phi3 QKV and gate/up fused, qwen3's per-head Q/K norms), so loading them exercises
the same paths as a real model. The vocabulary is byte-level BPE: 256 byte tokens, two merges and
three control tokens.

    path = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2", seed=0)
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_tokens() -> list[str]:
    """GPT-2's reversible byte -> printable-character mapping, one token per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + list(CONTROL_TOKENS)
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(CONTROL_TOKENS)) + [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    return tokens, [int(t) for t in types]


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotary halves -> llama.cpp adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# A reasoning model's template: the generation prompt opens a thinking block (as DeepSeek-R1's does) unless
# `enable_thinking` is false, which writes an empty one (as Qwen3's does). A tiny model's random weights never close
# the block: all it writes is thinking, unless asked for none.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn_dim: int = 128,
    context_length: int = 512,
    rope_base: float = 10000.0,
    tied: bool = True,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    rope_scaling: tuple[str, float] | None = None,
    freq_factors: bool = False,
    head_dim: int | None = None,
    chat_template: str = CHATML,
) -> Path:
    """`head_dim`: other than dim // n_heads (as Qwen3's 128 over a 1,024 model), written as the key length."""
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    vocab = len(tokens)
    explicit_head_dim = head_dim is not None and head_dim != dim // n_heads
    head_dim = head_dim or dim // n_heads
    eos = tokens.index("<|im_end|>")

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(head_dim)
    if explicit_head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    if rope_scaling:
        kind, factor = rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(int(context_length // factor))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def tensor(name: str, array: np.ndarray) -> None:
        if array.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, array.astype(np.float16))
        elif array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)

    tensor("token_embd.weight", rand(vocab, dim, scale=1.0))
    tensor("output_norm.weight", 1.0 + rand(dim, scale=0.1))
    if not tied:
        tensor("output.weight", rand(vocab, dim, scale=4.0))  # decisive logits: few near-ties
    if freq_factors:
        w.add_tensor("rope_freqs.weight", (1.0 + rng.uniform(0, 4, head_dim // 2)).astype(np.float32))
    s = dim**-0.5
    for i in range(n_layers):
        p = f"blk.{i}."
        q, k, v = rand(n_heads * head_dim, dim, scale=2 * s), rand(n_kv_heads * head_dim, dim, scale=2 * s), rand(n_kv_heads * head_dim, dim, scale=s)
        gate, up, down = rand(ffn_dim, dim, scale=s), rand(ffn_dim, dim, scale=s), rand(dim, ffn_dim, scale=ffn_dim**-0.5)
        tensor(p + "attn_norm.weight", 1.0 + rand(dim, scale=0.1))
        tensor(p + "ffn_norm.weight", 1.0 + rand(dim, scale=0.1))
        tensor(p + "attn_output.weight", rand(dim, n_heads * head_dim, scale=s))
        tensor(p + "ffn_down.weight", down)
        if arch == "phi3":
            tensor(p + "attn_qkv.weight", np.concatenate([q, k, v]))
            tensor(p + "ffn_up.weight", np.concatenate([gate, up]))
            continue
        if arch == "llama":
            q, k = _permute(q, n_heads), _permute(k, n_kv_heads)
        tensor(p + "attn_q.weight", q)
        tensor(p + "attn_k.weight", k)
        tensor(p + "attn_v.weight", v)
        if arch == "qwen2":
            for n, rows in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads)):
                w.add_tensor(p + f"attn_{n}.bias", rand(rows * head_dim, scale=0.3))
        if arch == "qwen3":  # each head's Q and K normalized before RoPE
            w.add_tensor(p + "attn_q_norm.weight", 1.0 + rand(head_dim, scale=0.3))
            w.add_tensor(p + "attn_k_norm.weight", 1.0 + rand(head_dim, scale=0.3))
        tensor(p + "ffn_gate.weight", gate)
        tensor(p + "ffn_up.weight", up)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
