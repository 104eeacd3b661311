"""How many threads a forward pass should use on the CPU: the engine's count while the cores are free, fewer
while other processes are using them.

PyTorch and ggml share one OpenMP runtime whose threads spin-wait between parallel regions. On a quiet
machine that is what makes a decode step fast (a 1B Q4_K_M model on 2 cores: 34 tok/s spinning against 23 with
OMP_WAIT_POLICY=PASSIVE, whose every region pays a thread wake-up). With another CPU-bound process on the same
cores, a spinning team waits on a thread the kernel has descheduled, for milliseconds per product (the same
decode: 8 tok/s, a 77% loss; llama.cpp loses 70%). One thread never waits on another: 15 tok/s beside the same
process. So before a forward pass, at most every `interval` seconds, `ThreadGovernor` reads the CPU time the
whole machine spent (/proc/stat) minus this process's own (os.times) and sizes the team to the cores left.

    governor = ThreadGovernor(2)
    governor.apply()   # before each forward: sets torch's (and ggml's) thread count if the share changed
"""

from __future__ import annotations

import os
import time


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent not idle, since boot (None where /proc is absent)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already counted in user and nice
    return (sum(ticks) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def threads_for(n_threads: int, n_cpus: int, others_busy_cores: float) -> int:
    """The team size for `n_threads` wanted on `n_cpus` cores while other processes keep `others_busy_cores`
    of them busy: the cores left, rounded, at least 1."""
    return max(1, min(n_threads, round(n_cpus - others_busy_cores)))


class ThreadGovernor:
    def __init__(self, n_threads: int, ggml: bool = False, interval: float = 0.25):
        self.n_threads, self.ggml, self.interval = max(1, n_threads), ggml, interval
        self.enabled = os.environ.get("EDGECTX_ADAPT_THREADS", "1") != "0" and self.n_threads > 1
        try:
            self.n_cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            self.n_cpus = os.cpu_count() or 1
        self.current = self.n_threads
        self.others_busy_cores = 0.0
        self._last = (time.monotonic(), _machine_busy_seconds(), _own_seconds())

    def apply(self) -> int:
        """Set the thread count for the next forward pass; returns it."""
        if not self.enabled:
            return self.current
        now = time.monotonic()
        then, machine_then, own_then = self._last
        if now - then < self.interval:
            return self.current
        machine, own = _machine_busy_seconds(), _own_seconds()
        self._last = (now, machine, own)
        if machine is None or machine_then is None:
            return self.current
        # others' cores: machine-wide CPU time not ours, over the wall time (both read at once: the difference
        # is others' work even while ours fills the cores)
        self.others_busy_cores = max(0.0, ((machine - machine_then) - (own - own_then)) / (now - then))
        wanted = threads_for(self.n_threads, self.n_cpus, self.others_busy_cores)
        if wanted != self.current:
            self._set(wanted)
        return self.current

    def _set(self, n: int) -> None:
        import torch

        torch.set_num_threads(n)
        if self.ggml:
            from edgectx.quant.ggml_cpu import set_threads

            set_threads(n)
        self.current = n
