"""Start real servers for the tests: `edgectx serve` and llama-cpp-python's own OpenAI server, each a subprocess
on a free local port, stopped (and waited for) when the test ends.

    with edgectx_server(model, "--budget", "256") as url:   # "http://127.0.0.1:PORT/v1"
        OpenAI(base_url=url, api_key="none").chat.completions.create(...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(command: list[str], port: int, health: str, timeout_s: float = 120.0, env: dict | None = None):
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd="/",
                               env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the server exited ({process.returncode}): {log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start in time")
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


@contextlib.contextmanager
def edgectx_server(model, *args: str, env: dict | None = None):
    """`edgectx serve` on `model`; yields its base URL (ending in /v1)."""
    port = free_port()
    command = [sys.executable, "-m", "edgectx", "serve", "--model", str(model), "--port", str(port), *args]
    with _process(command, port, "/health", env=env):
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def llama_cpp_server(model, n_ctx: int = 2048):
    """llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, through edgectx.bench.llama_server:
    without AMX where this CPU cannot run it); yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "edgectx.bench.llama_server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", "--n_ctx", str(n_ctx), "--n_threads", "1", "--verbose", "False"]
    with _process(command, port, "/v1/models"):
        yield f"http://127.0.0.1:{port}/v1"
