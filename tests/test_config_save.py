"""The config file written back by the TUI's settings: values round-trip through TOML, unknown keys and tables
stay, bad values are refused with one sentence and leave the file as it was."""

from __future__ import annotations

import tomllib

import pytest

from edgectx.config import config_path, load_config, save_config
from edgectx.config import dumps_toml
from edgectx.errors import UsageError


def test_toml_writer_round_trips():
    data = {"a": 1, "b": 'quote " and\nnewline and ✓', "c": [1, "q", 2.5], "f": True, "x": -0.25,
            "keys": {"regenerate": "ctrl+r", "odd key": "f5"}, "nested": {"t": {"w": 1}}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_save_keeps_unknown_keys_and_round_trips(tmp_path):
    path = config_path()
    path.write_text('model_paths = ["/models"]\nfuture_option = "kept"\n\n[plugins]\nname = "x"\n')
    config = save_config({"temperature": 0.2, "top_k": 5, "theme": "nord", "keys": {"regenerate": "f5"}})
    assert (config.temperature, config.top_k, config.theme, config.keys) == (0.2, 5, "nord", {"regenerate": "f5"})
    raw = tomllib.loads(path.read_text())
    assert raw["future_option"] == "kept" and raw["plugins"] == {"name": "x"} and raw["model_paths"] == ["/models"]
    assert load_config() == config
    save_config({"temperature": None})  # None removes a key
    assert "temperature" not in tomllib.loads(path.read_text()) and load_config().temperature is None
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("changes, words", [
    ({"temperature": 9.0}, "temperature must be a number between 0.0 and 5.0 (got 9.0)"),
    ({"top_p": "high"}, "top_p must be a number between 0.0 and 1.0 (got 'high')"),
    ({"top_k": 2.5}, "top_k must be a whole number at least 0 (got 2.5)"),
    ({"snapshot_codec": "zip"}, "snapshot_codec must be one of fp16, int8, int4 (got 'zip')"),
    ({"budget": 10}, "budget must be a token count of at least 64"),
    ({"keys": {"regenerate": 5}}, "[keys] must map action names to keys"),
    ({"thinking": "no"}, "thinking must be true or false (got 'no')"),
])
def test_a_bad_value_is_one_sentence_and_the_file_stays(changes, words):
    path = config_path()
    path.write_text("temperature = 0.5\n")
    with pytest.raises(UsageError) as e:
        save_config(changes)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_text() == "temperature = 0.5\n"


def test_a_malformed_file_is_refused_when_loading(tmp_path):
    config_path().write_text("max_tokens = 0\n")
    with pytest.raises(UsageError, match="max_tokens must be a whole number at least 1"):
        load_config()
