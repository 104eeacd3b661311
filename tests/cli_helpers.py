"""Run the `edgectx` command in a subprocess, as a user would, and check its error output."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: int = 300, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgectx", *args], capture_output=True, text=True, timeout=timeout, cwd="/", input=input)


def assert_one_sentence(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgectx: ")
    for word in words:
        assert word in lines[0]
