"""`edgectx plan`: its figures are what the memory really allocates, and its verdict is an exit status."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from edgectx.model.gguf import open_gguf, read_spec
from edgectx.memory.context import ContextMemory
from edgectx.memory.config import MemoryConfig
from edgectx.memory.plan import GIB, VALID_BYTES, device_kv, plan_memory
from edgectx.model.rope import Rope
from edgectx.memory.scoring import WindowScorer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def embedded_spec(embedded_model):
    return read_spec(open_gguf(embedded_model))  # metadata only, as `edgectx plan` reads it


def _prefill(spec, config, n_tokens, dtype, keep=None, scorer=None):
    """Drive a real ContextMemory with random pre-RoPE Q, K, V (the memory only sees shapes and scores)."""
    scorer = scorer or WindowScorer()  # the scorer moves no bytes
    memory = ContextMemory(spec, Rope(spec, CPU), CPU, dtype, config, scorer=scorer)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_tokens, config.chunk_tokens):
        t = min(config.chunk_tokens, n_tokens - start)
        memory.begin(t)
        for layer in memory.layers:
            q = torch.randn(spec.n_heads, t, spec.head_dim, generator=gen, dtype=dtype)
            k, v = (torch.randn(spec.n_kv_heads, t, spec.head_dim, generator=gen, dtype=dtype) for _ in range(2))
            layer.attend(q, k, v)
        memory.commit()
    memory.ready()  # as Engine.prefill leaves it: the context rebuilt for the decode steps
    if keep is not None:
        keep.append(memory)
    return memory.stats()


@pytest.mark.parametrize("cache_blocks", ["auto", 16])  # a CPU's "auto": no block cache (retrieval gathers from the store)
def test_device_and_host_figures_equal_what_the_memory_reports(embedded_spec, cache_blocks):
    spec, n_tokens = embedded_spec, 1400  # five full chunks and a partial one
    config = replace(MemoryConfig.for_budget(512, chunk_tokens=256), cache_blocks=cache_blocks)
    stats = _prefill(spec, config, n_tokens, torch.float32)
    assert stats["evicted_tokens"] > 0  # past the budget, retrieval running
    assert (stats["cached_blocks"] > 0) == (cache_blocks == 16) == (stats["device_block_cache_bytes"] > 0)
    kv = device_kv(spec, config, n_tokens, elem_bytes=4)
    assert kv.resident_kv_bytes == stats["sink_bytes"] + stats["window_bytes"] + stats["retained_bytes"]
    assert kv.resident_bytes == stats["device_resident_bytes"]
    assert kv.block_cache_bytes == stats["device_block_cache_bytes"]
    assert kv.repr_bytes == stats["device_repr_bytes"]
    # the attention context carries a duplicate mask only when retrieved blocks overlap resident tokens
    mask_bytes = spec.n_layers * spec.n_kv_heads * (config.resident_tokens + config.top_k_blocks * config.block_size
                                                     + config.chunk_tokens + 1) * VALID_BYTES
    assert kv.work_bytes - mask_bytes <= stats["device_work_bytes"] <= kv.work_bytes
    assert kv.total_bytes - mask_bytes <= stats["device_kv_bytes"] <= kv.total_bytes
    plan = plan_memory(spec, n_tokens, 8 * GIB, config, "fp16", 64 * GIB, elem_bytes=4)
    assert plan.host_kv_bytes == stats["host_kv_bytes"] == 23_040 * n_tokens
    assert plan.host_reserved_bytes == stats["host_reserved_bytes"]


def test_pinned_store_query_buffer_and_copy_pool_equal_the_real_memory():
    """Issue 21, defects 7 and 11: the figures the plan left out, against a real ContextMemory's own tensors."""
    from edgectx.memory.plan import next_power_of_two
    from edgectx.memory.scoring import AttentionMassScorer
    from edgectx.model.spec import ModelSpec

    # SmolLM2-135M's KV shapes (3 KV heads of 64) in two layers: its 4096-token segments hold 3 MiB a layer
    spec = ModelSpec(arch="llama", n_layers=2, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=64, vocab_size=10,
                     context_length=8192)
    n_tokens, config = 4400, MemoryConfig.for_budget(512, chunk_tokens=256)  # two segments, the second one begun
    held = []
    _prefill(spec, config, n_tokens, torch.float32, keep=held, scorer=AttentionMassScorer())  # keeps recent queries
    memory = held[0]
    plan = plan_memory(spec, n_tokens, 8 * GIB, config, "fp16", 64 * GIB, elem_bytes=4)
    segments = [seg.numel() * seg.element_size() for layer in memory.layers for seg in layer.store.segments]
    assert len(segments) == 4 and sum(segments) == plan.host_reserved_bytes
    # torch's pinned allocator takes 4 MiB for each 3 MiB segment (a power of two)
    assert segments[0] == 3 << 20 and plan.host_pinned_bytes == sum(map(next_power_of_two, segments)) == 4 * sum(segments) // 3
    assert plan_memory(spec, n_tokens, 8 * GIB, config, "fp16", 64 * GIB, elem_bytes=4, pinned=False).host_pinned_bytes == sum(segments)
    queries = sum(layer.q_recent.numel() * layer.q_recent.element_size() for layer in memory.layers)
    assert memory.layers[0].q_recent.shape[1] == config.n_observe and plan.query_buffer_bytes == queries
    assert plan.copy_pool_bytes > 0 and plan.allocator_slack_bytes > 0
    assert plan.device_total_bytes == (plan.weight_bytes + plan.device_kv_bytes + plan.activation_bytes + plan.runtime_bytes
                                       + queries + plan.copy_pool_bytes + plan.allocator_slack_bytes)
    # a store that fits in whole segments but not once pinned does not fit
    assert not plan_memory(spec, n_tokens, 8 * GIB, config, "fp16", sum(segments), elem_bytes=4).fits_host


def test_plan_compares_the_host_store_with_available_ram_not_total(monkeypatch, capsys):
    import edgectx.cli.plan as cli_plan
    from edgectx.memory import plan as plan_module

    monkeypatch.setattr(plan_module, "host_ram_bytes", lambda: 512 * GIB)  # a big machine, mostly in use
    monkeypatch.setattr(cli_plan, "available_ram_bytes", lambda: 4 * GIB)
    code, _, err = _plan(capsys, "--synthetic", "qwen2.5-7b", "--context", "131072", "--gpu-mem-gib", "80", "--weights", "nf4")
    assert code == 1 and len(err) == 1 and "host block store" in err[0] and "4.0 GiB are available" in err[0]


def _plan(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Run `edgectx plan ARGS` in-process: (exit status, stdout, stderr lines)."""
    from edgectx.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, [line for line in err.splitlines() if line.strip()]


def test_embedded_model_plan_from_the_command_line(embedded_model, embedded_spec, capsys):
    code, out, err = _plan(capsys, "--model", str(embedded_model), "--context", "131072", "--gpu-mem-gib", "8",
                           "--weights", "fp16", "--json")
    assert code == 0 and not err
    plan = json.loads(out)
    assert plan["host_kv_bytes"] == 23_040 * 131072 == plan["full_kv_bytes"]
    assert plan["device_kv"]["resident_kv_bytes"] == MemoryConfig().resident_tokens * 23_040  # 1536 tokens kept
    assert plan["fits_device"] and plan["device_total_bytes"] < 2 * GIB
    assert plan["weight_bytes"] == embedded_spec.weight_bytes("fp16")


def test_plan_that_does_not_fit_exits_1_with_one_sentence(capsys):
    # Llama-3.1-8B in fp16 with full attention at 128K: 15 GiB of weights + 16 GiB of KV
    code, out, err = _plan(capsys, "--synthetic", "llama-3.1-8b", "--context", "131072", "--gpu-mem-gib", "24",
                           "--weights", "fp16", "--budget", "full")
    assert code == 1 and "does NOT fit" in out
    assert len(err) == 1 and err[0].startswith("edgectx: llama-3.1-8b at 131,072 tokens needs ") and "but 24 GiB were given" in err[0]
    code, out, err = _plan(capsys, "--synthetic", "llama-3.1-8b", "--context", "131072", "--gpu-mem-gib", "24",
                           "--weights", "nf4", "--host-mem-gib", "64")
    assert code == 0 and not err and "fits" in out


def test_host_store_too_big_for_ram_is_refused(capsys):
    code, _, err = _plan(capsys, "--synthetic", "qwen2.5-7b", "--context", "131072", "--gpu-mem-gib", "80",
                         "--host-mem-gib", "4", "--weights", "nf4")
    assert code == 1 and len(err) == 1 and "host block store" in err[0] and "7.0 GiB of RAM" in err[0]


def test_unknown_synthetic_name_is_one_sentence(capsys):
    code, _, err = _plan(capsys, "--synthetic", "gpt-5", "--context", "1000", "--gpu-mem-gib", "8")
    assert code == 2 and err == ["edgectx: There is no synthetic model 'gpt-5': choose one of llama-3.1-8b, "
                                 "phi-3-mini-128k, qwen2.5-7b, tiny."]


def test_the_cli_still_starts_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, edgectx.cli.main; edgectx.cli.main.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_gpu_plan_sizes_the_auto_block_cache_as_the_memory_does(capsys):
    from edgectx.memory.device import AUTO_CACHE_MAX_BLOCKS, auto_cache_blocks
    from edgectx.model.synthetic import synthetic_spec

    from edgectx.memory.config import default_chunk_tokens

    spec, config = synthetic_spec("llama-3.1-8b"), MemoryConfig(chunk_tokens=default_chunk_tokens("cuda"))  # a GPU's
    code, out, _ = _plan(capsys, "--synthetic", "llama-3.1-8b", "--context", "131072", "--gpu-mem-gib", "24",
                         "--weights", "nf4", "--host-mem-gib", "64", "--json")  # (RAM: whatever else runs)
    plan = json.loads(out)
    free = 24 * GIB - spec.weight_bytes("nf4") - plan["runtime_bytes"]
    blocks = auto_cache_blocks(config, spec, free)
    assert code == 0 and blocks == AUTO_CACHE_MAX_BLOCKS  # 24 GiB leaves room for the largest cache
    assert plan["device_kv"]["block_cache_bytes"] == spec.n_layers * blocks * spec.n_kv_heads * 128 * 2 * 128 * 2
    tight = auto_cache_blocks(config, spec, 2 * GIB)  # a nearly full card: the cache shrinks to what fits
    assert config.top_k_blocks <= tight < AUTO_CACHE_MAX_BLOCKS


def test_a_gguf_model_is_planned_with_its_own_blocks(embedded_model, capsys):
    """Issue 21: on CUDA a GGUF file keeps its quantized blocks (quant/gguf_cuda.py), so `plan` counts the file's
    tensor bytes, not nf4 weights re-quantized from it."""
    g = open_gguf(embedded_model)
    file_bytes = sum(int(t.n_bytes) for t in g.tensors.values())
    code, out, err = _plan(capsys, "--model", str(embedded_model), "--context", "8192", "--gpu-mem-gib", "8", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["weights"] == "gguf" and plan["weight_bytes"] == file_bytes
    assert plan["weight_bytes"] != read_spec(g).weight_bytes("nf4")
    code, out, err = _plan(capsys, "--synthetic", "llama-3.1-8b", "--context", "8192", "--gpu-mem-gib", "24",
                           "--weights", "gguf")
    assert code != 0 and len(err) == 1 and "--weights gguf" in err[0]


def test_the_prefill_chunk_defaults_to_the_devices(capsys):
    """Unasked, the chunk is 512 tokens on a CPU and 2,048 on a GPU (edgectx.memory.config.DEFAULT_CHUNK_TOKENS):
    `plan`, which plans for a GPU, sizes a 2,048-token chunk's activations; --chunk still decides."""
    import argparse

    from edgectx.cli.options import add_memory_args, memory_config_from
    from edgectx.config import Config

    parser = argparse.ArgumentParser()
    add_memory_args(parser)
    parser.add_argument("--device")
    assert memory_config_from(parser.parse_args(["--device", "cpu"])).chunk_tokens == 512
    assert memory_config_from(parser.parse_args([]), Config(device="cpu")).chunk_tokens == 512  # the config file's
    assert memory_config_from(parser.parse_args([]), device="cuda").chunk_tokens == 2048
    assert memory_config_from(parser.parse_args(["--chunk", "300"]), device="cuda").chunk_tokens == 300
    common = ("--synthetic", "llama-3.1-8b", "--context", "131072", "--gpu-mem-gib", "24", "--weights", "nf4",
              "--host-mem-gib", "64", "--json")
    plans = {}
    for chunk in (None, "2048", "512"):
        code, out, _ = _plan(capsys, *common, *(("--chunk", chunk) if chunk else ()))
        assert code == 0
        plans[chunk] = json.loads(out)
    assert plans[None] == plans["2048"] and plans[None]["chunk_tokens"] == 2048
    assert plans["512"]["chunk_tokens"] == 512 and plans["512"]["activation_bytes"] < plans[None]["activation_bytes"]
    code, out, _ = _plan(capsys, *common[:-1])
    assert "activations (2,048-token chunk)" in out
