"""Hugging Face checkpoint directories as a model source: the same weights as a directory and as GGUF give
the same tokens and logits; bad directories end in one sentence; the CLI chats with a directory; snapshots
are keyed by the directory's fingerprint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cli_helpers import assert_one_sentence, run_cli
from edgectx.config import load_config
from edgectx.engine import Engine
from edgectx.errors import ModelFileError, SnapshotError, UnsupportedModelError
from edgectx.model.hf import open_hf_dir, read_spec
from edgectx.memory.config import MemoryConfig
from edgectx.model.source import open_model
from edgectx.model.discover import discover, resolve_model
from tiny_hf import training_text, write_tiny_pair

CASES = {
    "llama-spm": dict(arch="llama", tokenizer="spm", tied=False),
    "qwen2-json-bias": dict(arch="qwen2", tokenizer="json", tied=False),
    "qwen3-json-qk-norm": dict(arch="qwen3", tokenizer="json", tied=False),
    "phi3-spm-fused": dict(arch="phi3", tokenizer="spm", n_kv_heads=4),
    "llama-json-llama3-rope": dict(arch="llama", tokenizer="json", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-spm-yarn-rope": dict(arch="llama", tokenizer="spm", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    "phi3-spm-longrope": dict(arch="phi3", tokenizer="spm", extra_config={"original_max_position_embeddings": 256}, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [1.0 + i for i in range(8)]}),
}


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """pair(case) -> (directory, gguf path), written once per session."""
    made = {}

    def make(case: str):
        if case not in made:
            made[case] = write_tiny_pair(tmp_path_factory.mktemp(case), name=case, **CASES[case])
        return made[case]

    return make


def _text() -> str:
    return training_text()[2000:4500] + " Café 世界 🙂"


def _logits(engine: Engine, ids: list[int], chunks: tuple[int, ...]) -> torch.Tensor:
    """Logits after every token: prefill in `chunks`, then the rest one token at a time."""
    parts, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            parts.append(engine.forward(ids[start : start + size], all_logits=True))
            start += size
        parts += [engine.forward([t], all_logits=True) for t in ids[start:]]
    return torch.cat(parts)


@pytest.mark.parametrize("case", list(CASES))
def test_directory_and_gguf_give_the_same_tokens_and_logits(pair, case, monkeypatch):
    # float32 K and V: the two sides chunk differently, whose ~1e-5 kernel differences a float16 cache rounds
    # to its own steps (1e-3 here)
    monkeypatch.setenv("EDGECTX_KV_DTYPE", "float32")
    hf_dir, gguf_path = pair(case)
    # the same arithmetic for both (fp16-packed): the GGUF default multiplies by its blocks through ggml instead
    from_dir, from_gguf = Engine.load(hf_dir, device="cpu"), Engine.load(gguf_path, device="cpu", weights="fp16")
    assert from_dir.spec.vocab_size == from_gguf.spec.vocab_size and from_dir.spec.n_layers == 2
    text = _text()
    ids = from_dir.tokenizer.encode(text, add_bos=from_dir.tokenizer.add_bos)
    # The directory's tokenizer (sentencepiece / tokenizers) and llama.cpp's agree on the same vocabulary.
    assert ids == from_gguf.tokenizer.encode(text, add_bos=from_gguf.tokenizer.add_bos)
    ids = ids[:320]
    assert len(ids) == 320
    got = _logits(from_dir, ids, chunks=(100, 150, 50))  # a chunked prefill over a cache, then 20 decode steps
    expected = _logits(from_gguf, ids, chunks=(320,))
    assert got.shape == (320, from_dir.spec.vocab_size)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), f"max |diff| {(got - expected).abs().max():.2e}"
    assert expected.std() > 1.0  # logits that are not all alike, so agreement means something


def test_agreement_needs_the_gguf_permutation(pair, monkeypatch):
    """Guard: HF Q/K rows are not permuted, GGUF's are; loading the GGUF without undoing it must disagree."""
    import edgectx.model.gguf as loader

    hf_dir, gguf_path = pair("llama-spm")
    monkeypatch.setattr(loader, "_unpermute", lambda w, n_heads: w)
    ids = Engine.load(hf_dir, device="cpu").tokenizer.encode(_text())[:64]
    got = _logits(Engine.load(hf_dir, device="cpu"), ids, chunks=(64,))
    assert (got - _logits(Engine.load(gguf_path, device="cpu"), ids, chunks=(64,))).abs().max() > 0.1


def test_spec_from_config(pair):
    spec = read_spec(open_hf_dir(pair("llama-json-llama3-rope")[0]))
    assert spec.rope_freq_factors[0] == 1.0 and spec.rope_freq_factors[-1] == 8.0  # high frequencies kept, low ones stretched
    assert read_spec(open_hf_dir(pair("qwen2-json-bias")[0])).qkv_bias
    yarn = read_spec(open_hf_dir(pair("llama-spm-yarn-rope")[0])).rope_scaling
    assert (yarn.kind, yarn.factor, yarn.original_context) == ("yarn", 4.0, 256)
    longrope = read_spec(open_hf_dir(pair("phi3-spm-longrope")[0]))
    assert longrope.rope_freq_factors_long[-1] == 8.0 and longrope.rope_scaling.original_context == 256
    assert abs(longrope.rope_scaling.attn_factor - 1.25**0.5) < 1e-9  # sqrt(1 + ln(1024/256) / ln 256)


def test_sharded_directory_loads_the_same(pair, tmp_path):
    hf_dir, _ = pair("llama-spm")
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded)
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    one, two = Engine.load(hf_dir, device="cpu"), Engine.load(sharded, device="cpu")
    ids = one.tokenizer.encode(_text())[:48]
    assert torch.equal(_logits(one, ids, (48,)), _logits(two, ids, (48,)))
    assert one.fingerprint == two.fingerprint  # the weights, however they are sharded


def test_fingerprint_follows_the_weights(pair, tmp_path):
    hf_dir, gguf_path = pair("llama-spm")
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    first = open_model(hf_dir).fingerprint()
    assert len(first) == 64 and open_model(copy).fingerprint() == first
    assert first != open_model(gguf_path).fingerprint()
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3  # a fine-tune touches the weights
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert open_model(copy).fingerprint() != first


def _broken(pair, tmp_path, name: str):
    hf_dir, _ = pair("llama-spm")
    broken = tmp_path / name
    shutil.copytree(hf_dir, broken)
    return broken


def test_directory_without_config(pair, tmp_path):
    broken = _broken(pair, tmp_path, "no-config")
    (broken / "config.json").unlink()
    with pytest.raises(ModelFileError, match="has no config.json"):
        open_model(broken)


def test_unsupported_model_type(pair, tmp_path):
    broken = _broken(pair, tmp_path, "gemma")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(UnsupportedModelError, match="'gemma2' model; edgectx supports the llama, mistral, qwen2, qwen3, phi3"):
        open_model(broken)


def test_truncated_safetensors(pair, tmp_path):
    broken = _broken(pair, tmp_path, "truncated")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        open_model(broken)
    assert_one_sentence(run_cli("chat", "--model", str(broken), "-p", "hi"), "truncated or corrupt")


def test_missing_tokenizer_and_missing_tensor(pair, tmp_path):
    broken = _broken(pair, tmp_path, "no-tokenizer")
    (broken / "tokenizer.model").unlink()
    with pytest.raises(ModelFileError, match="neither tokenizer.json nor tokenizer.model"):
        open_model(broken).tokenizer()
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ModelFileError, match="lacks the tensor model.layers.1.self_attn.k_proj.weight"):
        open_model(broken).load_model(torch.device("cpu"), torch.float32)


def test_cli_chats_with_a_directory(pair):
    hf_dir, _ = pair("qwen2-json-bias")
    result = run_cli("chat", "--model", str(hf_dir), "-p", "hi", "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # a random model's five tokens of answer
    assert "qwen2" in result.stderr  # the model line: spec.describe()
    assert_one_sentence(run_cli("bench", "conformance", "--model", str(hf_dir)), "reads only GGUF")


def test_models_lists_directories(pair, tmp_path, monkeypatch):
    hf_dir, _ = pair("llama-spm")
    mine = tmp_path / "models" / "mine"
    shutil.copytree(hf_dir, mine)
    snapshot = tmp_path / "user" / ".cache" / "huggingface" / "hub" / "models--org--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(hf_dir, snapshot)
    bert = snapshot.parents[2] / "models--org--bert" / "snapshots" / "def456"
    shutil.copytree(hf_dir, bert)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))  # not a chat model: not listed
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(f'model_paths = ["{tmp_path / "models"}"]\n')
    monkeypatch.setenv("EDGECTX_CONFIG", str(config))
    entries = {e.name: e for e in discover(load_config())}
    assert entries["mine"].path == mine and entries["mine"].source == "config"
    assert entries["org/tiny-llama"].path == snapshot and entries["org/tiny-llama"].source == "huggingface"
    assert "org/bert" not in entries
    size = (hf_dir / "model.safetensors").stat().st_size
    assert entries["mine"].size_bytes == size
    assert resolve_model("org/tiny-llama", load_config()) == snapshot
    assert np.isclose(size, entries["org/tiny-llama"].size_bytes)


def test_snapshots_are_keyed_by_the_directory_fingerprint(pair, tmp_path):
    hf_dir, gguf_path = pair("llama-spm")
    config = MemoryConfig(budget_tokens=128, n_sink=16, n_local=32, block_size=32, top_k_blocks=2, cache_blocks=4, chunk_tokens=64)
    live = Engine.load(hf_dir, device="cpu", memory_config=config)
    ids = live.tokenizer.encode(_text())[:300]
    live.prefill(ids)
    info = live.snapshot(tmp_path / "doc.edgectxs", codec="fp16")
    reopened = Engine.load(hf_dir, device="cpu", memory_config=config)
    assert reopened.restore(info.path).n_tokens == 300 and reopened.tokens == ids
    assert torch.equal(reopened.next_logits, live.next_logits)
    with pytest.raises(SnapshotError, match="another model"):  # the same weights as GGUF hash differently
        Engine.load(gguf_path, device="cpu", memory_config=config).restore(info.path)


def test_a_directory_is_quantized_on_load_like_a_gguf(pair):
    bnb = pytest.importorskip("bitsandbytes")
    hf_dir, gguf_path = pair("qwen2-json-bias")
    ids = list(range(5, 205))
    for weights, kind in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        from_dir = Engine.load(hf_dir, device="cpu", weights=weights)
        from_gguf = Engine.load(gguf_path, device="cpu", weights=weights)
        assert from_dir.weights == weights and isinstance(from_dir.model.layers[0].attn.wqkv, kind)
        assert not isinstance(from_dir.model.lm_head, kind)  # the output projection stays 16-bit
        # Same weights, same quantizer: the two sources still agree once both are quantized.
        assert torch.allclose(_logits(from_dir, ids, (200,)), _logits(from_gguf, ids, (200,)), atol=1e-3, rtol=0)
