"""Busy neighbours: CPU-bound processes spinning beside a benchmark, as on a desktop that is doing other work.

`bench speed --busy N` measures each engine with N of them running ("one other CPU-bound process beside
both engines"): they start, and are spinning, before the engine loads and warms up, and stop after it is
measured. Each spins on pure-Python arithmetic (one core, little memory traffic) and exits by itself if
the benchmark process dies without stopping it.

    with busy_processes(1) as pids:
        measure()
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Iterator


def _spin(parent_pid: int, ready) -> None:
    ready.set()
    x = 0
    while os.getppid() == parent_pid:  # orphaned (the benchmark was killed): stop
        for i in range(100_000):
            x = (x * 31 + i) % 1_000_003


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[int]]:
    """Run the body with `n` spinning processes (none for 0), whose process ids it is given."""
    if n <= 0:
        yield []
        return
    spawn = multiprocessing.get_context("spawn")
    events = [spawn.Event() for _ in range(n)]
    procs = [spawn.Process(target=_spin, args=(os.getpid(), ready), daemon=True) for ready in events]
    try:
        for p in procs:
            p.start()
        for ready in events:
            ready.wait(timeout=60)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
