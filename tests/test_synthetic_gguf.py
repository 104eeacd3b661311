"""Random-weight GGUF files for `bench speed --synthetic-gguf`: written once and cached, quantized by llama.cpp,
read by both engines alike, never left half-written; the CLI flags, and the busy neighbour processes."""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgectx.bench import synthetic_gguf as sg
from edgectx.bench.busy import busy_processes
from edgectx.bench.reference import LlamaCppReference
from edgectx.bench.synthetic_gguf import SHAPES, cached_path, synthetic_gguf
from edgectx.cli.main import build_parser, run
from edgectx.engine import Engine
from edgectx.errors import EdgectxError, UsageError
from edgectx.model.gguf import open_gguf, read_spec

TEXT = "The quick brown fox jumps over the lazy dog, and the synthetic model reads it like any other text."


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_q4(cache) -> Path:
    return synthetic_gguf("tiny", "q4_k_m", cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_reader(tiny_q4) -> gguf.GGUFReader:
    return gguf.GGUFReader(tiny_q4)


def _types(reader: gguf.GGUFReader) -> Counter:
    return Counter(t.tensor_type.name for t in reader.tensors)


def test_tiny_is_written_once_into_the_cache(cache, tiny_q4):
    assert tiny_q4 == cache / "synthetic-gguf" / "tiny.q4_k_m.gguf" == cached_path("tiny", "q4_k_m", cache)
    assert os.listdir(tiny_q4.parent) == [tiny_q4.name]  # the F16 intermediate and the temporary names are gone
    mtime = tiny_q4.stat().st_mtime_ns
    time.sleep(0.01)
    assert synthetic_gguf("tiny", "q4_k_m", cache_dir=cache) == tiny_q4
    assert tiny_q4.stat().st_mtime_ns == mtime


def test_tiny_has_the_shapes_tokenizer_and_k_quants(tiny_q4, tiny_reader):
    spec = read_spec(open_gguf(tiny_q4))
    want = SHAPES["tiny"]
    assert (spec.n_layers, spec.dim, spec.ffn_dim, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2, 256, 512, 4, 2, 64)
    assert (spec.vocab_size, spec.context_length, spec.rope_base, spec.tied_embeddings) == (49152, 131072, 500000.0, False)
    assert spec.rope_scaling.kind == "none" and spec.rope_freq_factors is None
    assert spec.norm_eps == pytest.approx(want.norm_eps)
    types = _types(tiny_reader)
    # Q4_K_M: Q4_K for most matrices, Q6_K for the output and some V / down projections; only the 5 norms stay F32
    assert types["Q4_K"] > 0 and types["Q6_K"] > 0 and types["F32"] == 5 and sum(types.values()) == 5 + 2 * 7 + 2
    embedded = {key: value for key, value, _, _ in sg._tokenizer_fields(49152)}  # what the writer copied, read once
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"} <= set(embedded)
    fields = tiny_reader.fields
    for key, value in embedded.items():
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        elif isinstance(value, bytes):
            value = value.decode()
        assert fields[key].contents() == value, key


def test_q8_0_holds_q8_0_matrices(cache):
    path = synthetic_gguf("tiny", "q8_0", cache_dir=cache)
    assert path.name == "tiny.q8_0.gguf"
    assert _types(gguf.GGUFReader(path)) == Counter({"Q8_0": 16, "F32": 5})


def _close(mine: np.ndarray, theirs: np.ndarray) -> None:
    """The same logits up to the two engines' rounding: their kernels differ in summation order and
    activation rounding, so compare the whole vector, not the argmax of random logits (near-ties)."""
    assert np.isfinite(mine).all() and 0.3 < theirs.std() < 3  # O(1) logits: the residual scaling works
    assert np.corrcoef(mine, theirs)[0, 1] > 0.995
    assert np.abs(mine - theirs).mean() < 0.05 * theirs.std()
    assert int(np.argmax(theirs)) in np.argsort(mine)[-5:]


def test_edgectx_and_llama_cpp_read_it_alike(tiny_q4, tiny_reader):
    engine = Engine.load(tiny_q4, device="cpu", n_ctx=256, n_threads=1)
    ids = engine.tokenizer.encode(TEXT)
    ref = LlamaCppReference(tiny_q4, n_ctx=256, n_threads=1)
    try:
        assert ref.llama.tokenize(TEXT.encode(), add_bos=False, special=False) == ids  # one tokenizer, two engines
        mine = engine.prefill(ids).float().numpy()
        ref.eval(ids)
        _close(mine, ref.last_logits())
        for _ in range(3):  # a few decoded tokens, fed to both
            token = int(np.argmax(ref.last_logits()))
            mine = engine.forward([token])[-1].float().numpy()
            ref.eval([token])
            _close(mine, ref.last_logits())
        assert ref.weight_bytes() == sum(int(t.n_bytes) for t in tiny_reader.tensors)
    finally:
        ref.close()


def test_unknown_names_and_quants_are_refused(tmp_path):
    with pytest.raises(UsageError, match="No synthetic GGUF named 'llama-70b': choose one of tiny, llama-1b"):
        synthetic_gguf("llama-70b", cache_dir=tmp_path)
    with pytest.raises(UsageError, match="No quantization 'q2_k'"):
        synthetic_gguf("tiny", "q2_k", cache_dir=tmp_path)
    assert not (tmp_path / "synthetic-gguf").exists()


def test_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def full(self, tensor, *args, **kwargs):
        calls.append(tensor.nbytes)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(EdgectxError, match=r"Could not write tiny.q4_k_m.gguf in .* \(No space left on device\)"):
        synthetic_gguf("tiny", cache_dir=tmp_path)
    assert os.listdir(tmp_path / "synthetic-gguf") == []


def test_a_failed_quantization_or_too_little_space_leaves_no_file(tmp_path, monkeypatch):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *args: 1)
    with pytest.raises(EdgectxError, match="llama.cpp's quantizer could not write tiny.q4_k_m.gguf"):
        synthetic_gguf("tiny", cache_dir=tmp_path)
    assert os.listdir(tmp_path / "synthetic-gguf") == []
    monkeypatch.setattr(sg.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**6})())
    with pytest.raises(EdgectxError, match=r"needs about 19.\d GB free in .* which has 0.0 GB"):
        synthetic_gguf("llama-8b", cache_dir=tmp_path)
    assert os.listdir(tmp_path / "synthetic-gguf") == []


def test_stale_temporary_files_of_dead_runs_are_swept(tmp_path):
    folder = tmp_path / "synthetic-gguf"
    folder.mkdir()
    dead = folder / ".tiny.q4_k_m.gguf.999999999.f16.tmp"  # no such process
    alive = folder / f".tiny.q4_k_m.gguf.{os.getppid()}.tmp"  # a live process's write in progress
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    sg._remove_stale(folder / "tiny.q4_k_m.gguf")
    assert not dead.exists() and alive.exists()


def test_cli_flags_parse_and_bad_combinations_are_refused():
    args = build_parser().parse_args(["bench", "speed", "--synthetic-gguf", "llama-8b", "--quant", "q8_0", "--busy", "2"])
    assert (args.synthetic_gguf, args.quant, args.busy) == ("llama-8b", "q8_0", 2)
    with pytest.raises(UsageError, match="--synthetic-gguf and --synthetic are different benches"):
        run(["bench", "speed", "--synthetic-gguf", "tiny", "--synthetic", "tiny"])
    with pytest.raises(UsageError, match="--synthetic-gguf writes its own model, so drop --model"):
        run(["bench", "speed", "--synthetic-gguf", "tiny", "--model", "x.gguf"])
    with pytest.raises(UsageError, match="--quant goes with --synthetic-gguf"):
        run(["bench", "speed", "--quant", "q8_0"])
    with pytest.raises(UsageError, match="--busy goes with a GGUF"):
        run(["bench", "speed", "--synthetic", "tiny", "--busy", "1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "speed", "--synthetic-gguf", "llama-70b"])


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_busy_processes_burn_cpu_and_stop():
    with busy_processes(0) as none:
        assert none == []
    with busy_processes(2) as pids:
        assert len(pids) == 2
        time.sleep(1.0)
        assert all(_cpu_ticks(pid) > 20 for pid in pids)  # spinning: over 0.2 s of CPU each in the second
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_each_engine_reports_its_weight_bytes(tiny_q4, tiny_reader):
    from edgectx.bench.speed import _measure  # one engine at one length, here in this process

    file_bytes = sum(int(t.n_bytes) for t in tiny_reader.tensors)
    threads = torch.get_num_threads()
    try:
        theirs = _measure("llama_cpp", str(tiny_q4), "cpu", 1, 64, 2, None, None, False)
        mine = _measure("edgectx", str(tiny_q4), "cpu", 1, 64, 2, None, None, False)
    finally:
        torch.set_num_threads(threads)  # _measure sets it for its engine
    assert theirs["weight_bytes"] == file_bytes
    # at least the file's blocks; more where edgectx widens some matrices to 16 bits
    assert mine["weight_bytes"] >= file_bytes * 0.99 and mine["decode_tok_s"] > 0


@pytest.mark.long  # three engines in child processes beside a busy one: minutes on a loaded 2-core machine
def test_bench_speed_on_the_tiny_file_reuses_it_and_records_busy(cache, tiny_q4, tiny_reader, monkeypatch, capsys):
    monkeypatch.setenv("EDGECTX_CACHE", str(cache))
    mtime = tiny_q4.stat().st_mtime_ns
    assert run(["bench", "speed", "--synthetic-gguf", "tiny", "--context", "64", "--decode-tokens", "2",
                "--threads", "1", "--busy", "1", "--json"]) == 0
    out = capsys.readouterr()
    assert "Writing" not in out.err and tiny_q4.stat().st_mtime_ns == mtime  # the cached file, reused
    result = json.loads(out.out)
    assert result["model"] == "tiny.q4_k_m.gguf" and result["busy"] == 1
    row = result["runs"][0]
    file_bytes = sum(int(t.n_bytes) for t in tiny_reader.tensors)
    assert row["llama_cpp"]["weight_bytes"] == file_bytes
    assert all(row[kind]["weight_bytes"] >= file_bytes * 0.99 for kind in ("edgectx", "edgectx_memory"))


def test_the_qwen3_shape_plans_its_qk_norms_and_a_wider_q():
    """Qwen3-0.6B's plan: per-head Q/K norms in every layer and Q twice the model's width (16 heads of 128)."""
    from edgectx.bench.synthetic_gguf import SHAPES, _tensor_plan

    spec = SHAPES["qwen3-0.6b"]
    plan = {name: dims for name, dims, _ in _tensor_plan(spec)}
    assert spec.arch == "qwen3" and spec.qk_norm and spec.q_dim == 2 * spec.dim
    assert all(plan[f"blk.{i}.attn_{n}_norm.weight"] == (128,) for i in range(spec.n_layers) for n in "qk")
    assert plan["blk.0.attn_q.weight"] == (2048, 1024) and plan["blk.0.attn_output.weight"] == (1024, 2048)
    assert "blk.0.attn_q_norm.weight" not in {name for name, _, _ in _tensor_plan(SHAPES["llama-1b"])}
