"""Temporary files left by a benchmark run that was killed before its cleanup ran.

The cached files the benchmarks write (a synthetic GGUF, a 32-bit reference) are built under a temporary name
that carries the writer's process id, then renamed. `remove_orphans` deletes those whose writer is gone.

    remove_orphans(folder.glob(".*.tmp"), lambda tmp: tmp.name.rsplit(".", 2)[-2])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable


def remove_orphans(temporaries: Iterable[Path], writer_pid: Callable[[Path], str]) -> None:
    """Delete each of `temporaries` whose writer (the process id `writer_pid` reads from its name) has exited."""
    for tmp in temporaries:
        pid = writer_pid(tmp)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's
