"""The thread governor: the team shrinks while another process holds a core and grows back when it stops,
measured from the machine's own counters (a real busy process, not a stand-in)."""

import os
import time

import pytest
import torch

from edgectx.bench.busy import busy_processes
from edgectx.cpu_share import ThreadGovernor, threads_for


def test_threads_for_leaves_the_cores_others_use():
    assert threads_for(2, 2, 0.05) == 2
    assert threads_for(2, 2, 0.9) == 1
    assert threads_for(2, 2, 3.0) == 1  # never fewer than one
    assert threads_for(4, 8, 2.0) == 4  # never more than asked
    assert threads_for(8, 8, 2.6) == 5


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 cores")
def test_a_busy_process_takes_a_thread_and_gives_it_back(monkeypatch):
    monkeypatch.setenv("EDGECTX_ADAPT_THREADS", "1")  # the suite keeps it off (conftest)
    saved = torch.get_num_threads()
    n_cpus = len(os.sched_getaffinity(0))
    try:
        with busy_processes(n_cpus - 1):  # every core but one kept busy
            time.sleep(0.5)
            governor = ThreadGovernor(n_cpus, interval=0.5)  # counts from here, with the load running
            time.sleep(1.0)
            assert governor.apply() == 1 if n_cpus == 2 else governor.current < n_cpus, governor.others_busy_cores
            assert torch.get_num_threads() == governor.current
        governor.apply()  # the interval spanning the stop
        time.sleep(1.0)
        assert governor.apply() == n_cpus, governor.others_busy_cores
        assert torch.get_num_threads() == n_cpus
    finally:
        torch.set_num_threads(saved)


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EDGECTX_ADAPT_THREADS", "0")
    governor = ThreadGovernor(2, interval=0.0)
    assert not governor.enabled and governor.apply() == 2
