"""`bench speed` stops its clocks only once the GPU has finished (issue 21, defect 11): CUDA work is queued
asynchronously, so a clock read right after `engine.prefill` returns measures the queueing, not the prefill."""

from __future__ import annotations

import torch

from edgectx.bench import speed


class FakeEngine:
    """Records the order of prefill, forward and the clock reads; claims to be on a GPU."""

    device = torch.device("cuda", 0)

    def __init__(self, events):
        self.events = events

    def reset(self):
        pass

    def prefill(self, ids):
        self.events.append("prefill")
        return torch.zeros(8)

    def forward(self, ids):
        self.events.append("forward")
        return torch.zeros(1, 8)

    def stats(self):
        return {"device_kv_bytes": 0, "host_kv_bytes": 0}


def test_prefill_and_decode_clocks_stop_after_a_synchronize(monkeypatch):
    events = []
    clock = iter(range(1, 100))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: events.append("clock") or float(next(clock)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    speed._edgectx_run(FakeEngine(events), [1, 2, 3], decode_tokens=2)
    assert events == ["sync", "clock", "prefill", "sync", "clock", "clock", "forward", "forward", "sync", "clock"]
