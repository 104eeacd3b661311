"""`bench conformance`'s 32-bit reference: the GGUF requantized to F32 by llama.cpp, cached and checked, and the
figures it adds (each engine against it, llama.cpp against itself)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from cli_helpers import assert_one_sentence, run_cli
from edgectx.bench.conformance import LLAMA, REFERENCE, Tally, _log_softmax_into
from edgectx.bench.f32_reference import f32_reference, reference_paths
from edgectx.bench.reference import LlamaCppReference
from edgectx.bench.report import conformance_lines
from edgectx.config import cache_dir
from edgectx.model.source import open_model
from tiny_gguf import write_tiny_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def cache_in_home(monkeypatch):
    """The reference files go under the isolated EDGECTX_HOME, whatever EDGECTX_CACHE the caller has set."""
    monkeypatch.delenv("EDGECTX_CACHE", raising=False)


@pytest.fixture
def q8_model(tmp_path):
    """A tiny Q8_0 model, as (path, weights fingerprint, number of weights)."""
    path = write_tiny_gguf(tmp_path / "tiny-q8.gguf", qtype=Q.Q8_0, context_length=1024)
    source = open_model(path)
    return path, source.fingerprint(), source.spec.num_params


@pytest.fixture
def text_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(4000)))
    return text


def test_f32_requantization_holds_the_same_weights_and_is_reused(q8_model):
    path, fingerprint, n_params = q8_model
    first = f32_reference(path, fingerprint, n_params)
    assert first.built and first.path.parent == cache_dir() / "f32-reference"
    assert sorted(p.name for p in first.path.parent.iterdir()) == sorted(p.name for p in reference_paths(fingerprint))
    source = {t.name: t for t in gguf.GGUFReader(path).tensors}
    made = gguf.GGUFReader(first.path).tensors
    assert {t.name for t in made} == set(source) and {t.tensor_type for t in made} == {Q.F32}
    assert Q.Q8_0 in {t.tensor_type for t in source.values()}
    for t in made:  # llama.cpp's dequantization, bit for bit the gguf package's
        expected = gguf.quants.dequantize(source[t.name].data, source[t.name].tensor_type)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), expected.reshape(-1))
    written = first.path.stat().st_mtime_ns
    second = f32_reference(path, fingerprint, n_params)
    assert not second.built and second.path == first.path and first.path.stat().st_mtime_ns == written


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "manifest not JSON", "manifest missing"])
def test_damaged_cached_file_is_made_again(q8_model, damage):
    path, fingerprint, n_params = q8_model
    made = f32_reference(path, fingerprint, n_params).path
    good = made.read_bytes()
    manifest = reference_paths(fingerprint)[1]
    if damage == "flipped bytes":
        middle = len(good) // 2
        with open(made, "r+b") as f:
            f.seek(middle)
            f.write(bytes(b ^ 0xFF for b in good[middle : middle + 64]))
    elif damage == "truncated":
        with open(made, "r+b") as f:
            f.truncate(len(good) - 100)
    elif damage == "manifest not JSON":
        manifest.write_text("{")
    else:
        manifest.unlink()
    again = f32_reference(path, fingerprint, n_params)
    assert again.built and again.path == made and made.read_bytes() == good
    assert not f32_reference(path, fingerprint, n_params).built


def test_reference_agrees_with_itself_and_not_with_quantized_llama_cpp(q8_model):
    path, fingerprint, n_params = q8_model
    reference = f32_reference(path, fingerprint, n_params).path
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 258, 200)]
    targets = torch.tensor(ids[1:] + [0])
    whole = LlamaCppReference(reference, n_ctx=256, n_threads=2, f32_kv=True)
    in_pieces = LlamaCppReference(reference, n_ctx=256, n_threads=1, n_batch=64, f32_kv=True)
    quantized = LlamaCppReference(path, n_ctx=256, n_threads=2)
    try:
        ref_logits = torch.from_numpy(whole.eval_logits(ids))
        # two calls continue one sequence: the chunks of a bench are one text, not separate ones
        again = torch.from_numpy(np.concatenate([in_pieces.eval_logits(ids[:90]), in_pieces.eval_logits(ids[90:])]))
        q8_logits = torch.from_numpy(quantized.eval_logits(ids))
    finally:
        for run in (whole, in_pieces, quantized):
            run.close()
    tally = Tally()
    tally.score(REFERENCE, ref_logits, targets)
    tally.score("again", again, targets, ref_logits)
    tally.score(LLAMA, q8_logits, targets, ref_logits)
    tally.compare_runs(ref_logits, again)
    same = tally.against_reference("again")
    assert same["top1"] == 1.0 and abs(same["nll_rel_diff"]) < 1e-6 and abs(same["kl_mean"]) < 1e-9
    assert tally.max_abs_logit_diff < 1e-3 * float(ref_logits.std())
    tally.compare_runs(ref_logits, q8_logits)
    assert tally.max_abs_logit_diff == pytest.approx(float((ref_logits - q8_logits).abs().max()), rel=1e-6)
    assert tally.against_reference(LLAMA)["kl_mean"] > 1e-6  # 8-bit activations: the comparison can tell


def test_buffered_log_softmax_matches_torch():
    logits = torch.randn(5, 300) * 20
    out, scratch = torch.empty(5, 300, dtype=torch.float64), torch.empty(5, 300, dtype=torch.float64)
    _log_softmax_into(out, logits, scratch)
    torch.testing.assert_close(out, torch.log_softmax(logits.double(), dim=-1), rtol=0, atol=1e-12)


def test_bench_json_keeps_old_keys_and_adds_the_reference(tmp_path, text_file):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024)
    common = ("bench", "conformance", "--model", str(model), "--text", str(text_file), "--tokens", "300", "--json")
    full = run_cli(*common, "--self-check")
    assert full.returncode == 0, full.stderr
    result = json.loads(full.stdout)
    assert result["n_tokens"] == 300 and result["top1_agreement"] >= 0.99 and abs(result["nll_rel_diff"]) < 0.01
    assert result["reference"]["kind"] == "llama.cpp F32 requantization" and result["reference"]["built"]
    for engine in ("edgectx_vs_reference", "llama_cpp_vs_reference"):
        assert set(result[engine]) == {"top1", "nll_rel_diff", "kl_mean"}
        assert result[engine]["top1"] >= 0.99 and 0 <= result[engine]["kl_mean"] < 1e-3
    assert result["nearer_reference"] in ("edgectx", "llama.cpp", "tie")
    own = result["llama_cpp_self"]
    assert own["n_batch"][1] == 64 and own["threads"][0] != own["threads"][1]
    assert own["top1"] >= 0.99 and own["max_abs_logit_diff"] >= 0
    assert 2**20 < result["peak_rss_bytes"] < 3 * 2**30

    fast = run_cli(*common, "--reference", "none")
    assert fast.returncode == 0, fast.stderr
    plain = json.loads(fast.stdout)
    added = {"reference", "edgectx_vs_reference", "llama_cpp_vs_reference", "nearer_reference", "llama_cpp_self"}
    assert not added & set(plain)
    for key in ("top1_agreement", "nll_edgectx", "nll_llama_cpp", "nll_rel_diff"):
        assert plain[key] == pytest.approx(result[key], rel=1e-9)


def test_unwritable_cache_is_one_sentence(tmp_path, text_file, monkeypatch):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EDGECTX_CACHE", str(blocker))
    result = run_cli("bench", "conformance", "--model", str(model), "--text", str(text_file), "--tokens", "100")
    assert_one_sentence(result, "--reference none")


def test_report_line_reads_the_right_way():
    result = {"reference": {"kind": "llama.cpp F32 requantization"}, "nearer_reference": "edgectx",
              "edgectx_vs_reference": {"top1": 0.998, "nll_rel_diff": 0.001, "kl_mean": 0.0004},
              "llama_cpp_vs_reference": {"top1": 0.963, "nll_rel_diff": 0.01, "kl_mean": 0.004},
              "llama_cpp_self": {"n_batch": [512, 64], "threads": [2, 1], "top1": 1.0, "max_abs_logit_diff": 0.0}}
    lines = conformance_lines(result)
    assert lines[0].startswith("against the 32-bit reference: edgectx top-1 0.998, llama.cpp 0.963 (llama.cpp rounds")
    assert lines[1].startswith("llama.cpp against itself (n_batch 512 vs 64, 2 vs 1 threads): top-1 1.000")
    assert conformance_lines({"top1_agreement": 0.97}) == []
