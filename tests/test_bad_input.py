"""Bad model files end in one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from edgectx.errors import ModelFileError, UnsupportedModelError
from edgectx.model.gguf import open_gguf, read_spec
from cli_helpers import assert_one_sentence, run_cli
from tiny_gguf import write_tiny_gguf


@pytest.fixture
def truncated(tmp_path):
    path = write_tiny_gguf(tmp_path / "full.gguf")
    data = path.read_bytes()
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    return cut


@pytest.fixture
def header_cut(tmp_path):
    data = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "header.gguf"
    cut.write_bytes(data[:300])  # inside the metadata
    return cut


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        open_gguf(tmp_path / "nope.gguf")
    assert_one_sentence(run_cli("chat", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"), "not found")


def test_directory(tmp_path):
    with pytest.raises(ModelFileError, match="directory"):
        open_gguf(tmp_path)


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model\n" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        open_gguf(path)
    assert_one_sentence(run_cli("chat", "--model", str(path), "--prompt", "hi"), "not a GGUF")


def test_truncated_tensor_data(truncated):
    with pytest.raises(ModelFileError, match="truncated"):
        open_gguf(truncated)
    assert_one_sentence(run_cli("chat", "--model", str(truncated), "--prompt", "hi"), "truncated")


def test_truncated_header(header_cut):
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        open_gguf(header_cut)
    assert_one_sentence(run_cli("bench", "speed", "--model", str(header_cut)), "corrupt")


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(UnsupportedModelError, match="'falcon'"):
        read_spec(open_gguf(path))
    assert_one_sentence(run_cli("chat", "--model", str(path), "--prompt", "hi"), "falcon", "supports")


def test_malformed_config(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [unclosed\n")
    monkeypatch.setenv("EDGECTX_CONFIG", str(bad))
    assert_one_sentence(run_cli("models"), "not valid TOML")


def test_bad_cli_value_is_usage_error():
    result = run_cli("bench", "speed", "--context", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_bad_memory_budget_in_config(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('budget = "lots"\n')
    monkeypatch.setenv("EDGECTX_CONFIG", str(config))
    assert_one_sentence(run_cli("chat", "--prompt", "hi"), "budget")


def test_budget_too_small_for_its_tiers_is_one_sentence():
    assert_one_sentence(run_cli("bench", "fidelity", "--budget", "64", "--context", "128"), "budget")
