"""The `edgectx` command end to end: version, one-shot chat on the embedded model, models, doctor, benches."""

from __future__ import annotations

import json

from cli_helpers import run_cli
from edgectx import __version__
from tiny_gguf import write_tiny_gguf


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgectx {__version__}"


def test_one_shot_chat_with_embedded_model():
    result = run_cli("chat", "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Loading" not in result.stdout  # status goes to stderr only


def test_interactive_chat_reads_stdin_until_eof():
    proc = run_cli("chat", "--temperature", "0", "--max-tokens", "16", input="What is 2+2?\n/reset\nSay hi.\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 4  # three inputs, then the prompt that meets end of input
    assert "New conversation." in proc.stderr


def test_models_lists_embedded_and_user_folders(tmp_path, monkeypatch):
    home = tmp_path / "user"
    lm = home / ".lmstudio" / "models" / "pub" / "repo"
    lm.mkdir(parents=True)
    write_tiny_gguf(lm / "tiny-lm.gguf")
    hf = home / ".cache" / "huggingface" / "hub" / "models--org--tiny" / "snapshots" / "abc"
    hf.mkdir(parents=True)
    write_tiny_gguf(hf / "tiny-hf.gguf")
    blobs = home / ".ollama" / "models" / "blobs"
    blobs.mkdir(parents=True)
    write_tiny_gguf(blobs / "sha256-1234")
    manifest = home / ".ollama" / "models" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:1234"}]}))
    extra = tmp_path / "mine.gguf"
    write_tiny_gguf(extra)
    config = tmp_path / "config.toml"
    config.write_text(f'model_paths = ["{extra}"]\n')
    monkeypatch.setenv("EDGECTX_CONFIG", str(config))
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    by_source = {e["source"]: e for e in json.loads(result.stdout)}
    assert set(by_source) == {"embedded", "config", "lm-studio", "huggingface", "ollama"}
    assert by_source["ollama"]["name"] == "tiny:latest"
    assert by_source["lm-studio"]["name"] == "tiny-lm"


def test_doctor_reports_paths_and_default_model(tmp_path):
    result = run_cli("doctor", "--json")
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and result.returncode == 0
    assert checks["default model"]["ok"] and "SmolLM2" in checks["default model"]["detail"]
    assert checks["data dir"]["detail"] == str(tmp_path / "home")
    assert {"torch", "cuda", "bitsandbytes", "triton", "config"} <= set(checks)
    attention = checks["cpu attention"]  # compiled at first use into the cache dir (edgectx.kernels.cpu_attention)
    if attention["ok"]:
        assert attention["detail"].startswith(f"compiled: {tmp_path / 'home' / 'cache' / 'kernels'}")
    else:
        assert attention["detail"] and attention["advice"]


def test_doctor_says_why_the_cpu_attention_is_off(monkeypatch):
    monkeypatch.setenv("EDGECTX_CPU_ATTENTION", "0")
    report = json.loads(run_cli("doctor", "--json").stdout)
    attention = {c["name"]: c for c in report["checks"]}["cpu attention"]
    assert not attention["ok"] and "EDGECTX_CPU_ATTENTION=0" in attention["detail"] and report["ok"]


def test_bench_json_on_a_tiny_model(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024)
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(4000)))
    conf = run_cli("bench", "conformance", "--model", str(model), "--text", str(text), "--tokens", "300", "--json")
    assert conf.returncode == 0, conf.stderr
    result = json.loads(conf.stdout)
    assert result["n_tokens"] == 300 and result["top1_agreement"] >= 0.99 and abs(result["nll_rel_diff"]) < 0.01
    speed = run_cli("bench", "speed", "--model", str(model), "--text", str(text), "--context", "64,128", "--decode-tokens", "4", "--json")
    assert speed.returncode == 0, speed.stderr
    runs = json.loads(speed.stdout)["runs"]
    assert [r["context"] for r in runs] == [64, 128]
    assert all(r["edgectx"]["decode_tok_s"] > 0 and r["llama_cpp"]["prefill_tok_s"] > 0 and r["decode_ratio"] > 0 for r in runs)
    assert all(r["edgectx_memory"]["decode_tok_s"] > 0 and r["memory_decode_ratio"] > 0 for r in runs)
    assert all(r[k]["peak_rss_bytes"] > 2**20 for r in runs for k in ("llama_cpp", "edgectx", "edgectx_memory"))


def test_long_context_benches_on_a_tiny_model(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024)
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(4000)))
    common = ("--model", str(model), "--text", str(text), "--chunk", "64", "--json")
    exact = run_cli("bench", "fidelity", "--context", "500", "--budget", "1024", *common)
    assert exact.returncode == 0, exact.stderr
    exact = json.loads(exact.stdout)
    assert exact["top1_agreement"] == 1.0 and abs(exact["nll_rel_diff"]) < 1e-5 and exact["evicted_tokens"] == 0
    tight = json.loads(run_cli("bench", "fidelity", "--context", "500", "--budget", "256", *common).stdout)
    assert tight["evicted_tokens"] > 0 and tight["budget_tokens"] == 256 and 0 < tight["top1_agreement"] <= 1
    assert tight["elapsed_s"] > 0
    # the last 120 positions one token at a time, as generation feeds them: within the budget still full attention
    stepped = run_cli("bench", "fidelity", "--context", "500", "--budget", "1024", "--decode-tail", "120", *common)
    assert stepped.returncode == 0, stepped.stderr
    stepped = json.loads(stepped.stdout)
    assert stepped["decode_tail"] == 120 and stepped["decode_top1_agreement"] == 1.0
    assert abs(stepped["decode_nll_rel_diff"]) < 1e-4 and abs(stepped["nll_full"] - exact["nll_full"]) < 1e-3
    evicting = json.loads(run_cli("bench", "fidelity", "--context", "500", "--budget", "256", "--decode-tail", "120",
                                  *common).stdout)
    assert evicting["evicted_tokens"] > 0 and 0 < evicting["decode_top1_agreement"] <= 1
    too_long = run_cli("bench", "fidelity", "--context", "500", "--decode-tail", "500", *common)
    assert too_long.returncode != 0 and "--decode-tail" in too_long.stderr and "Traceback" not in too_long.stderr
    both = run_cli("bench", "fidelity", "--context", "500", "--budget", "256", "--scorer", "window,oracle", *common)
    assert both.returncode == 0, both.stderr
    assert [r["scorer"] for r in json.loads(both.stdout)["runs"]] == ["window", "oracle"]
    ppl = run_cli("bench", "longppl", "--context", "600", "--budget", "256", "--full-max", "300", *common)
    assert ppl.returncode == 0, ppl.stderr
    ppl = json.loads(ppl.stdout)
    assert ppl["buckets"] == ["0-600"] and ppl["nll_memory"][0] > 0 and ppl["nll_full"] == [None]
    mem = run_cli("bench", "memory", "--contexts", "300,600", "--budget", "256", *common)
    assert mem.returncode == 0, mem.stderr
    runs = json.loads(mem.stdout)["runs"]
    assert [r["context"] for r in runs] == [300, 600]
    assert runs[1]["host_kv_bytes"] > runs[0]["host_kv_bytes"] and runs[1]["evicted_tokens"] > runs[0]["evicted_tokens"]
