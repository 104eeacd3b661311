"""The decoder-only transformer (llama, mistral, qwen2, qwen3, phi3 families) as a plain PyTorch module.

The model knows nothing of caches, eviction or offload: each forward receives a `KVMemory` whose
per-layer `attend(q, k, v)` takes pre-RoPE projections and returns the attention output (gpt-fast
attaches caches from outside; so do we). Q/K/V and gate/up projections are fused at load time.
Tensors carry no batch dimension: edgectx runs one conversation per engine.

    model = Transformer(spec)
    logits = model(tokens, memory)  # tokens (T,), logits (1, vocab) for the last position
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgectx.model.kv import KVMemory
from edgectx.model.spec import ModelSpec


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: `F.rms_norm` on a GPU, LayerNorm over [x, -x] on the CPU.

    [x, -x] has mean 0 and variance mean(x^2), so LayerNorm's first half is exactly RMSNorm. On CPU
    the fused LayerNorm kernel is 3-4x faster than `F.rms_norm`, which decomposes into ~8 ops
    (measured 25 vs 90 us per decode call; 5 ms of a 44 ms decode step). On CUDA `F.rms_norm` is one fused
    kernel, while the LayerNorm form is four launches (neg, two cats, layer_norm), and eager decode there is
    bound by launches, not arithmetic (issue 21): 3 launches saved per norm, 195 a token on a 32-layer model.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.fused(x)
        return self.as_layer_norm(x)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def as_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        doubled = torch.cat((self.weight, self.weight))
        return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * dim,), doubled, None, self.eps)[..., :dim]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.wqkv = nn.Linear(spec.dim, spec.q_dim + 2 * spec.kv_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.q_dim, spec.dim, bias=False)
        # qwen3: each head's Q and K normalized before RoPE (what the memory stores as pre-RoPE keys)
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None

    def forward(self, x: torch.Tensor, layer_memory) -> torch.Tensor:
        return self.wo(self.attend(self.wqkv(x), layer_memory))

    def attend(self, qkv: torch.Tensor, layer_memory) -> torch.Tensor:
        """The Q, K, V projections (T, q_dim + 2 kv_dim) -> the attention output before W_o, (T, q_dim)."""
        s = self.spec
        n_tokens = qkv.shape[0]
        q, k, v = qkv.split((s.q_dim, s.kv_dim, s.kv_dim), dim=-1)
        q, k = q.view(n_tokens, s.n_heads, s.head_dim), k.view(n_tokens, s.n_kv_heads, s.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (n_heads, T, head_dim), (n_kv_heads, T, head_dim)
        v = v.view(n_tokens, s.n_kv_heads, s.head_dim).transpose(0, 1)
        out = layer_memory.attend(q, k, v)  # (n_heads, T, head_dim)
        return out.transpose(0, 1).reshape(n_tokens, s.q_dim)


class FeedForward(nn.Module):
    """SwiGLU with gate and up fused into one projection (gate first, as llama.cpp's fused phi3 ffn_up)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ffn_dim = spec.ffn_dim
        self.w_gate_up = nn.Linear(spec.dim, 2 * spec.ffn_dim, bias=False)
        self.w_down = nn.Linear(spec.ffn_dim, spec.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.ffn_dim, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attn = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.ffn = FeedForward(spec)
        # Set where the whole layer but attention runs as ggml graphs (edgectx.quant.ggml_layer: GGUF blocks
        # on the CPU): fewer, larger calls than the modules below, which share its weights and still serve
        # torch.compile (the graphs are ctypes calls it cannot trace).
        self.fused = None

    def forward(self, x: torch.Tensor, layer_memory) -> torch.Tensor:
        if self.fused is not None and not torch.compiler.is_compiling():
            return self.fused.after(self.attn.attend(self.fused.before(x), layer_memory), x)
        x = x + self.attn(self.attn_norm(x), layer_memory)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        # Set where every layer runs as ggml graphs: a one-token step of the whole model, attention included,
        # as one ggml graph (edgectx.quant.ggml_decode), where the memory offers each layer's context.
        self.decoder = None

    def forward(self, tokens: torch.Tensor, memory: KVMemory, all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` (T,) through the model, appending them to `memory`.

        Returns logits (T, vocab) with `all_logits`, else (1, vocab) for the last position only, which
        spares prefill the largest matmul. The caller commits the memory once the forward succeeds.
        """
        x = self.embed(tokens)  # (T, dim)
        if self.decoder is not None and tokens.shape[0] == 1 and not torch.compiler.is_compiling():
            key = getattr(memory, "steady_key", _nothing)()
            if key is not None:  # the last step's graph again, one column on (ContextMemory.steady_key)
                out = self.decoder.again(x, key)
                if out is not None:
                    memory.stepped_steady()
                    return out if self.decoder.vocab else self.lm_head(self.norm(out)).float()
            slots = [getattr(layer_memory, "decode_slot", _nothing)() for layer_memory in memory.layers]
            if all(slot is not None for slot in slots):
                return self._decode(x, slots, memory)
        for block, layer_memory in zip(self.layers, memory.layers):
            x = block(x, layer_memory)
        if not all_logits:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()

    def _decode(self, x: torch.Tensor, slots: list, memory: KVMemory) -> torch.Tensor:
        """One token through `decoder`; each layer's memory then records its Q, K and V."""
        s = self.spec
        out, qkv = self.decoder(x, slots, getattr(memory, "step_key", _nothing)())
        n = qkv.shape[0]  # every layer's views at once (one call each, not one per layer)
        q, k, v = qkv.split((s.q_dim, s.kv_dim, s.kv_dim), dim=1)
        qs = q.view(n, s.n_heads, 1, s.head_dim).unbind(0)
        ks, vs = (t.view(n, s.n_kv_heads, 1, s.head_dim).unbind(0) for t in (k, v))
        for layer_memory, q, k, v, row, slot in zip(memory.layers, qs, ks, vs, qkv.unbind(0), slots):
            layer_memory.decoded(q, k, v, row, written=slot.writes is not None)
        return out if self.decoder.vocab else self.lm_head(self.norm(out)).float()


def _nothing() -> None:
    return None
