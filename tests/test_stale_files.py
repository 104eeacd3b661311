"""Orphaned temporaries of killed benchmark runs are swept; a live writer's (or this process's) are kept."""

import os
import subprocess
import sys

from edgectx.bench import f32_reference


def test_reference_temporaries_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    orphan = tmp_path / f".model-f32.gguf.{dead}.tmp"
    mine = tmp_path / f".model-f32.gguf.{os.getpid()}.tmp"
    alive = tmp_path / f".model-f32.gguf.{os.getppid()}.tmp"
    kept = tmp_path / "model-f32.gguf"
    for f in (orphan, mine, alive, kept):
        f.write_bytes(b"x")
    f32_reference._remove_stale(tmp_path)
    assert not orphan.exists()
    assert mine.exists() and alive.exists() and kept.exists()
