"""Synthetic models: real shapes (parameter counts as published), random weights that run, honest byte figures."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from edgectx.errors import UsageError
from edgectx.model.kv import FullKVCache
from edgectx.memory.context import ContextMemory
from edgectx.memory.config import MemoryConfig
from edgectx.model.rope import Rope
from edgectx.model.spec import ModelSpec
from edgectx.model.synthetic import PUBLISHED_PARAMS, SYNTHETIC, build_synthetic, llama3_freq_factors, synthetic_spec

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_real_specs_have_the_published_parameter_counts(name):
    spec = SYNTHETIC[name]
    assert abs(spec.num_params / PUBLISHED_PARAMS[name] - 1) < 0.01, spec.num_params
    assert len(spec.rope_freq_factors or ()) in (0, spec.rope_dim // 2)
    assert spec.context_length == 131072


def test_llama3_factors_match_the_scaling_rule():
    factors = llama3_freq_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert len(factors) == 64 and factors[0] == 1.0 and factors[-1] == 8.0  # short waves kept, long ones / 8
    assert all(a <= b for a, b in zip(factors, factors[1:]))  # the blend in between is monotone
    assert sum(1.0 < f < 8.0 for f in factors) > 0


def _run(model, spec, ids, memory_config=None):
    rope = Rope(spec, CPU)
    memory = (ContextMemory(spec, rope, CPU, torch.float32, memory_config) if memory_config
              else FullKVCache(spec, rope, CPU, torch.float32))
    logits = []
    with torch.inference_mode():
        for start in range(0, len(ids), 128):
            memory.begin(len(ids[start : start + 128]))
            logits.append(model(torch.tensor(ids[start : start + 128]), memory, all_logits=True))
            memory.commit()
    return torch.cat(logits), memory


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tiny_synthetic_model_runs_a_forward(arch):
    spec = dataclasses.replace(SYNTHETIC["tiny"], arch=arch, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    model, built = build_synthetic(spec, CPU, torch.float32, weights="fp16", seed=1)
    assert built is spec
    ids = torch.randint(0, spec.vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, _ = _run(model, spec, ids)
    assert logits.shape == (256, spec.vocab_size) and torch.isfinite(logits).all()
    assert 0.3 < float(logits.std()) < 30  # the scales keep activations O(1): neither vanishing nor exploding
    again, _ = build_synthetic(spec, CPU, torch.float32, weights="fp16", seed=1)
    assert torch.equal(_run(again, spec, ids[:128])[0], logits[:128])  # the seed fixes the weights


def test_tiny_synthetic_runs_with_the_long_context_memory():
    model, spec = build_synthetic("tiny", CPU, torch.float32)
    ids = torch.randint(0, spec.vocab_size, (640,), generator=torch.Generator().manual_seed(0)).tolist()
    config = MemoryConfig.for_budget(256, chunk_tokens=128)
    logits, memory = _run(model, spec, ids, config)
    assert torch.isfinite(logits).all() and memory.stats()["evicted_tokens"] > 0


def _held_bytes(model) -> int:
    from edgectx.quant.bnb_linear import linear_weight_bytes

    linears = [model.lm_head] + [m for b in model.layers for m in (b.attn.wqkv, b.attn.wo, b.ffn.w_gate_up, b.ffn.w_down)]
    dense = [model.embed.weight, model.norm.weight] + [p for b in model.layers for p in (b.attn_norm.weight, b.ffn_norm.weight)]
    dense += [m.bias for m in linears if getattr(m, "bias", None) is not None]
    return sum(linear_weight_bytes(m) for m in linears) + sum(p.numel() * p.element_size() for p in dense)


@pytest.mark.parametrize("weights", ["fp16", "nf4", "int8"])
def test_weight_bytes_is_what_the_built_model_holds(weights):
    if weights != "fp16":
        pytest.importorskip("bitsandbytes")
    spec = dataclasses.replace(SYNTHETIC["tiny"], dim=256, ffn_dim=1024, n_layers=2, qkv_bias=True, arch="qwen2")
    model, _ = build_synthetic(spec, CPU, torch.float32, weights=weights)
    held, planned = _held_bytes(model), spec.weight_bytes(weights, dense_bytes=4)  # float32 embeddings on a CPU
    # nf4 adds small fixed tables per layer (its 16-entry code, the second-level code): under 1% here
    assert abs(held / planned - 1) < 0.01, (held, planned)


def test_weight_bytes_figures_for_the_real_specs():
    spec = SYNTHETIC["llama-3.1-8b"]
    fp16, nf4 = spec.weight_bytes("fp16"), spec.weight_bytes("nf4")
    assert fp16 == 2 * spec.num_params  # untied: every parameter at 2 bytes
    assert 6.0e9 < nf4 < 6.1e9  # 6.98B block weights at 0.5625 B (float32 absmax per 64) + 2.1 GB of 16-bit embeddings and output
    with pytest.raises(ValueError, match="weight formats"):
        spec.weight_bytes("q4")


def test_unknown_synthetic_name_is_one_sentence():
    with pytest.raises(UsageError, match=r"no synthetic model 'llama-9': choose one of llama-3.1-8b, "):
        synthetic_spec("llama-9")


def test_spec_argument_is_used_as_given():
    spec = ModelSpec(arch="llama", n_layers=1, dim=64, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=96,
                     vocab_size=100, context_length=256)
    model, built = build_synthetic(spec, CPU, torch.float32)
    assert built is spec and model.lm_head.out_features == 100 and len(model.layers) == 1


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage the model holds: parameters, buffers, bitsandbytes' quantization states."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        state = getattr(t, "quant_state", None)
        for v in vars(state).values() if state is not None else ():
            if isinstance(v, torch.Tensor):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


def test_nf4_build_holds_the_bytes_the_plan_counts():
    """On bitsandbytes' CPU backend, an nf4 layer of Llama-3.1-8B's shapes holds exactly what `weight_bytes`
    (and so `edgectx plan`) counts: 4-bit codes, a float32 absmax per 64, 16-bit embeddings and output."""
    pytest.importorskip("bitsandbytes")
    spec = dataclasses.replace(synthetic_spec("llama-3.1-8b"), n_layers=1, vocab_size=1000)
    model, _ = build_synthetic(spec, CPU, torch.bfloat16, weights="nf4")
    code_tables = 4 * 16 * 4 * spec.n_layers  # each linear's 16-value NF4 code, float32 (4 linears a layer)
    assert _tensor_bytes(model) == spec.weight_bytes("nf4") + code_tables


@pytest.mark.gpu
def test_nf4_llama_8b_builds_without_holding_fp16_weights():
    """Measured from what was allocated before (the first GPU run counted the earlier tests' tensors too: 5% over)."""
    pytest.importorskip("bitsandbytes")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, spec = build_synthetic("llama-3.1-8b", torch.device("cuda"), torch.bfloat16, weights="nf4")
    allocated, peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
    planned = spec.weight_bytes("nf4")
    assert _tensor_bytes(model) == planned + 4 * 16 * 4 * spec.n_layers  # + the code tables, as on the CPU
    largest_matrix = max(o * i for o, i in spec.block_linear_shapes) * 2
    assert abs(allocated / planned - 1) < 0.02, (allocated, planned)
    assert peak < planned + 2 * largest_matrix + 2**28, (peak, planned)  # never the 16 GB fp16 model
