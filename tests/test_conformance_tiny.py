"""edgectx's logits against llama.cpp's on tiny random GGUF models of each supported architecture."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgectx.bench.reference import LlamaCppReference
from edgectx.engine import Engine
from tiny_gguf import write_tiny_gguf

Q = gguf.GGMLQuantizationType
CASES = {
    "llama": dict(arch="llama"),
    "llama-untied": dict(arch="llama", tied=False),
    # Quantized cases keep tied outputs: llama.cpp quantizes activations to 8 bits for quantized
    # weights (about 1.5% logit noise here), which flips near-ties of a random untied output layer.
    "llama-q8_0": dict(arch="llama", qtype=Q.Q8_0),
    "llama-f16": dict(arch="llama", qtype=Q.F16),
    "qwen2-q5_0": dict(arch="qwen2", qtype=Q.Q5_0),
    "llama-q4_1-llama3-freqs": dict(arch="llama", qtype=Q.Q4_1, freq_factors=True),
    "llama-linear-rope": dict(arch="llama", rope_scaling=("linear", 4.0)),
    "llama-yarn-rope": dict(arch="llama", rope_scaling=("yarn", 4.0), context_length=256),
    "mistral-style-gqa4": dict(arch="llama", n_heads=8, n_kv_heads=2, rope_base=1e6, qtype=Q.Q4_0),
    "qwen2-bias": dict(arch="qwen2", tied=False),
    "phi3-fused": dict(arch="phi3", tied=False, n_kv_heads=4),
    "qwen3-qk-norm-wide-heads": dict(arch="qwen3", tied=False, head_dim=32),  # q_dim 128 over a 64-wide model
    "qwen3-q8_0": dict(arch="qwen3", qtype=Q.Q8_0),
}


def _compare(path, n_tokens: int = 160, n_prefill: int = 128):
    rng = np.random.default_rng(1)
    engine = Engine.load(path, device="cpu")
    ids = [int(i) for i in rng.integers(0, 258, n_tokens)]
    ref = LlamaCppReference(path, n_ctx=256, n_threads=2, all_logits=True)
    ref.eval(ids)
    expected = ref.logits(0, n_tokens)
    ref.close()
    # Prefill in two chunks (a masked chunk over a cache), then decode one token at a time.
    with torch.inference_mode():
        parts = [engine.forward(ids[:80], all_logits=True), engine.forward(ids[80:n_prefill], all_logits=True)]
        parts += [engine.forward([t], all_logits=True) for t in ids[n_prefill:]]
    got = torch.cat(parts).numpy()
    return got, expected


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_llama_cpp(tmp_path, case):
    got, expected = _compare(write_tiny_gguf(tmp_path / f"{case}.gguf", **CASES[case]))
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
    # llama.cpp keeps K/V in fp16, and quantizes activations to 8 bits for quantized weights.
    quantized = CASES[case].get("qtype", Q.F32) != Q.F32
    tolerance = (0.2 if quantized else 0.03) * expected.std()
    max_diff = float(np.abs(got - expected).max())
    assert max_diff < tolerance, f"max |diff| {max_diff:.4f} vs tolerance {tolerance:.4f}"


def test_permuted_llama_differs_without_unpermute(tmp_path, monkeypatch):
    """Guard that the conformance test can fail: skipping the Q/K un-permutation must break agreement."""
    import edgectx.model.gguf as loader

    monkeypatch.setattr(loader, "_unpermute", lambda w, n_heads: w)
    got, expected = _compare(write_tiny_gguf(tmp_path / "llama.gguf", arch="llama"))
    assert np.abs(got - expected).max() > 0.1 * expected.std()


def test_qwen3_differs_without_its_qk_norms(tmp_path, monkeypatch):
    """Guard for the qwen3 cases: a loader that skipped the per-head Q/K norms must disagree with llama.cpp."""
    import dataclasses

    import edgectx.model.gguf as loader

    read = loader.read_spec
    monkeypatch.setattr(loader, "read_spec", lambda g: dataclasses.replace(read(g), qk_norm=False))
    got, expected = _compare(write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3", tied=False))
    assert np.abs(got - expected).max() > 0.1 * expected.std()


def test_a_spec_field_added_later_leaves_older_models_fingerprints_as_they_were(tmp_path):
    """qk_norm came with Qwen3: at its old value (False) it stays out of the digest, so every model supported before
    keeps its fingerprint (shipped heads, snapshots and conversations are keyed by it); a qwen3 file's counts it."""
    import dataclasses
    import json

    from edgectx.model.fingerprint import _spec_json
    from edgectx.model.gguf import open_gguf, read_spec

    spec = read_spec(open_gguf(write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")))
    before = {k: v for k, v in spec.__dict__.items() if k != "qk_norm"}  # the dict fingerprints hashed until then
    assert _spec_json(spec) == json.dumps(before, default=str, sort_keys=True).encode()
    assert b'"qk_norm": true' in _spec_json(dataclasses.replace(spec, arch="qwen3", qk_norm=True))
