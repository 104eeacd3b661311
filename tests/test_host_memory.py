"""A released memory's host RAM goes back to the system (`empty_host_cache`, which `Engine.reset` and
`Engine.restore` call): glibc keeps freed heap memory in its arenas, and a long-context memory's block store
is made of segments small enough to live on the heap (3 MB each for the embedded model). And while it is in use,
a prefill chunk's freed transients leave no heap behind (`return_free_heap`, after each chunk on a CPU)."""

import json
import subprocess
import sys

import pytest

from edgectx.engine import Engine
from edgectx.memory import device as device_memory
from edgectx.memory.config import MemoryConfig
from edgectx.memory.device import _malloc_trim

# In a child process, with glibc told to keep 3 MB blocks on the heap and never to trim its top on free (so
# the case is certain, not left to glibc's adaptive thresholds): 192 MiB of segments among small live tensors,
# freed; RSS after the free, then after empty_host_cache.
CHILD = """
import ctypes, json, torch
from edgectx.memory.device import empty_host_cache
libc = ctypes.CDLL(None)
libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
segments, pins = [], []
for _ in range(64):
    segments.append(torch.empty(3 << 20, dtype=torch.uint8).fill_(1))
    pins.append(torch.empty(4096, dtype=torch.uint8))
del segments
freed = rss()
empty_host_cache(torch.device("cpu"))
print(json.dumps({"freed": freed - before, "emptied": rss() - before}))
"""


def _in_child(code: str) -> dict:
    """What `code`, run in a fresh Python process, prints as JSON."""
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim (Linux) is what returns the heap's pages")
def test_a_released_store_gives_its_ram_back():
    kept = _in_child(CHILD)
    assert kept["freed"] > 160 << 20, kept  # the case: glibc kept the freed segments
    assert kept["emptied"] < 32 << 20, kept  # and gave them back when asked


def test_reset_and_restore_give_back_the_memory_they_replace(embedded_model, monkeypatch, tmp_path):
    """The call sites: every memory the engine lets go of is followed by `empty_host_cache`."""
    e = Engine.load(embedded_model, device="cpu", weights="fp16")
    e.configure_memory(MemoryConfig())
    calls = []
    monkeypatch.setattr(device_memory, "empty_host_cache", lambda device: calls.append(device))
    e.reset()
    assert len(calls) == 1
    e.prefill(e.tokenizer.encode("The long-context memory keeps every token. " * 8))
    e.snapshot(tmp_path / "s.ectx", codec="fp16")
    replaced = e.memory
    e.restore(tmp_path / "s.ectx")
    assert len(calls) == 2 and e.memory is not replaced


# In a child process: a 16 MiB tensor freed (glibc's adaptive threshold then rises to 16 MiB), then 24 transient
# 6 MiB tensors, each followed by a small long-lived one, as a prefill chunk's activations fall between the memory's
# tensors; RSS once the transients are freed, then after `return_free_heap`.
GROWTH = """
import json, torch
from edgectx.memory.device import return_free_heap
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # freed at once
before = rss()
transients, kept = [], []
for _ in range(24):
    transients.append(torch.empty(6 << 20, dtype=torch.uint8).fill_(1))
    kept.append(torch.empty(64 << 10, dtype=torch.uint8).fill_(1))
del transients
freed = rss()
return_free_heap()
print(json.dumps({"freed": freed - before, "returned": rss() - before}))
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim (Linux)")
def test_a_chunks_freed_transients_leave_no_heap_behind():
    kept = _in_child(GROWTH)
    assert kept["freed"] > 100 << 20, kept  # the case: glibc kept the freed transients
    assert kept["returned"] < 16 << 20, kept  # and gave them back


def test_a_cpu_prefill_returns_the_free_heap_after_each_chunk(embedded_model, monkeypatch):
    e = Engine.load(embedded_model, device="cpu", weights="fp16")
    calls = []
    monkeypatch.setattr(device_memory, "return_free_heap", lambda: calls.append(len(e.tokens)))
    e.prefill(list(range(100, 400)), chunk_tokens=128)
    assert calls == [128, 256, 300]
