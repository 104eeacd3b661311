"""`edgectx bench serve`: time to first token over HTTP, `edgectx serve` against llama.cpp's server, same model,
same machine, same run.

A two-turn conversation about one long document (real text: the Python standard library's sources, cut to
`document_tokens`), as any OpenAI client sends it: turn 1 is the document and a question in one user message;
turn 2 resends everything with the first answer and a second question. Each server runs as a subprocess on a
free local port, one after the other (never side by side), with the same threads; each turn is one streamed
request, timed from sending it to the first piece of answer text. Turn 2 is where prefix reuse shows: both
servers keep the previous prompt's KV and read only the new tokens.

llama.cpp's server is llama-cpp-python's (`python -m llama_cpp.server`): it always reuses the longest common
prefix of the previous prompt in its context, which is what `cache_prompt` turns on in llama.cpp's own server
(the requests send `"cache_prompt": true` too, for that server). Its context must hold the whole conversation
(`n_ctx` = document + 2048), past a small model's trained window: llama.cpp runs there without complaint
(RoPE unscaled, quality aside); edgectx reads it through the long-context memory within its budget.

    result = run_serve_bench(Path("model.gguf"), document_tokens=16384, threads=2)
    result["ttft_ratio"]  # {"turn1": edgectx / llama.cpp, "turn2": ...}; below 1: edgectx answers sooner
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from edgectx.bench.corpus import corpus_tokens
from edgectx.errors import EdgectxError
from edgectx.model.source import open_model

QUESTIONS = ("What is this document about? Answer in one sentence.", "Which function does it define first?")
START_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(command: list[str], port: int, ready_path: str):
    """Run a server until the block ends; its output goes to a temp file, shown if it fails to start."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                tail = " ".join(log.read()[-400:].split())
                raise EdgectxError(f"The server `{' '.join(command[:4])} ...` exited while starting ({tail}).")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EdgectxError(f"The server `{' '.join(command[:4])} ...` did not start within {START_TIMEOUT_S:.0f} s.")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _turn(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: seconds to the first answer text, the answer, and usage where the server sends it."""
    body = {"model": "bench", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "max_tokens": max_tokens, "cache_prompt": True}
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=httpx.Timeout(30, read=None)) as response:
        if response.status_code != 200:
            response.read()
            raise EdgectxError(f"{url} answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    pieces.append(piece)
    end = time.perf_counter()
    return {"ttft_s": round((first or end) - t0, 3), "total_s": round(end - t0, 3), "answer": "".join(pieces),
            "usage": usage}


def _conversation(url: str, document: str, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": f"<document>\n{document}\n</document>\n\n{QUESTIONS[0]}"}]
    turn1 = _turn(url, messages, max_tokens)
    messages += [{"role": "assistant", "content": turn1["answer"]}, {"role": "user", "content": QUESTIONS[1]}]
    turn2 = _turn(url, messages, max_tokens)
    return {"turn1": turn1, "turn2": turn2}


def run_serve_bench(path: Path, document_tokens: int = 16384, threads: int = 2, max_tokens: int = 32,
                    serve_args: tuple[str, ...] = ()) -> dict:
    """Both servers through the same two-turn conversation; `serve_args`: extra `edgectx serve` flags (memory)."""
    tokenizer = open_model(path).tokenizer()
    document = tokenizer.decode(corpus_tokens(tokenizer, document_tokens))
    n_ctx = document_tokens + 2048
    result = {"model": path.name, "document_tokens": document_tokens, "threads": threads, "max_tokens": max_tokens,
              "llama_cpp_n_ctx": n_ctx, "questions": list(QUESTIONS)}
    port = _free_port()
    edgectx = [sys.executable, "-m", "edgectx", "serve", "--model", str(path), "--port", str(port),
               "--threads", str(threads), *serve_args]
    with _server(edgectx, port, "/health") as url:
        result["edgectx"] = _conversation(url, document, max_tokens)
    port = _free_port()
    llama = [sys.executable, "-m", "edgectx.bench.llama_server", "--model", str(path), "--port", str(port), "--host", "127.0.0.1",
             "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False"]
    with _server(llama, port, "/v1/models") as url:
        result["llama_cpp"] = _conversation(url, document, max_tokens)
    result["ttft_ratio"] = {turn: round(result["edgectx"][turn]["ttft_s"] / max(result["llama_cpp"][turn]["ttft_s"], 1e-9), 3)
                            for turn in ("turn1", "turn2")}
    return result
