"""`edgectx bench serve` on a tiny GGUF: both servers start, both turns are timed, and edgectx's second turn
comes from its memory."""

from __future__ import annotations

import json

from cli_helpers import run_cli
from tiny_gguf import write_tiny_gguf


def test_bench_serve_times_both_servers(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=1024)
    result = run_cli("bench", "serve", "--model", str(model), "--context", "600", "--max-tokens", "4",
                     "--budget", "256", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["document_tokens"] == 600 and report["llama_cpp_n_ctx"] == 600 + 2048
    for engine in ("edgectx", "llama_cpp"):
        for turn in ("turn1", "turn2"):
            assert 0 < report[engine][turn]["ttft_s"] <= report[engine][turn]["total_s"]
    first, second = report["edgectx"]["turn1"]["usage"], report["edgectx"]["turn2"]["usage"]
    assert first["prompt_tokens"] > 600 and first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"]
    ratio = report["ttft_ratio"]
    assert ratio["turn1"] == round(report["edgectx"]["turn1"]["ttft_s"] / report["llama_cpp"]["turn1"]["ttft_s"], 3)
