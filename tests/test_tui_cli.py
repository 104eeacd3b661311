"""How the command line reaches the TUI: `edgectx` in a pipe keeps the line chat, `--help` never imports Textual."""

from __future__ import annotations

import os
import subprocess
import sys

from cli_helpers import run_cli
from tiny_gguf import write_tiny_gguf


def test_help_lists_tui_and_does_not_import_textual():
    code = ("import sys\nfrom edgectx.cli.main import run\ntry:\n    run(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('textual loaded:', 'textual' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert " tui " in result.stdout
    assert result.stdout.strip().endswith("textual loaded: False")


def test_bare_edgectx_in_a_pipe_runs_the_line_chat(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "config.toml").write_text(f'model = "{model}"\n')
    assert os.environ["EDGECTX_CONFIG"] == str(tmp_path / "config.toml")  # conftest's isolated config
    result = run_cli(input="")  # stdin is a pipe at end of file: the chat starts, then leaves at once
    assert result.returncode == 0, result.stderr
    assert "Commands: /reset" in result.stderr and "Traceback" not in result.stderr


def test_tui_sampling_flags_then_the_config_then_the_defaults():
    from edgectx.cli.main import build_parser
    from edgectx.config import Config
    from edgectx.cli.options import sampling_from

    args = build_parser().parse_args(["tui", "--temperature", "0.1", "--top-k", "7", "--seed", "3", "--max-tokens", "64"])
    config = Config(temperature=0.9, top_p=0.5)
    sampling = sampling_from(args, config)
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed) == (0.1, 7, 0.5, 3)
    assert args.max_tokens == 64
    defaults = sampling_from(build_parser().parse_args(["tui"]), Config())
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.repeat_penalty) == (0.7, 40, 0.9, 1.1)
