"""The GPU path at a real model's layer shape, rehearsed on the CPU (issue 21).

What `edgectx bench speed --synthetic llama-3.1-8b` runs on CUDA, at that model's layer shape (32 layers, 32 query
heads over 8 KV heads) but narrow (dim 256, head_dim 16) so that a CPU runs it in about a minute: the memory's
bookkeeping on the device (`device_bookkeeping`: the staged block store, retrieval by ids gathered from the host
store, compact positions counted on the device), the GPU's defaults (2,048-token chunks, a 2,048-token budget,
retrieval every 16th decode step, eviction every 64th) and decode steps through the CUDA-graph runner
(`capture_eager`: each replay runs the step captured then again, so a step reading anything but its static inputs
goes wrong), then a chat's next turn after an answer taken back (the memory cut mid-answer, a message read, decoding
again). It is held to the CPU's plain path, which reads every count back.

The other device-path tests use 2-layer models with 2 KV heads and budgets of 256 tokens. The first synthetic 8B
chunk past the budget found what they had not: compact positions counted on the device past the host bound the
rotary tables were sized by (tests/test_host_syncs.py), an index past the tables' end, which on CUDA is a device
assert that ends the process. This runs the whole bench path at that shape, so that the next one shows here first.

Triton's decode kernel runs as its torch reference here (the interpreter takes 1.4 s a launch at this shape; the
kernel is held to that reference in tests/test_kernels.py, compiled on a GPU by packaging/gpu-check.sh).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from edgectx import kernels
from edgectx.model.synthetic import build_synthetic

# packaging/host_ops.py counts the same path's host work: its shape, defaults and engine are these
_spec = importlib.util.spec_from_file_location("host_ops", Path(__file__).parent.parent / "packaging" / "host_ops.py")
host_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_ops)
SHAPE, GPU_DEFAULTS = host_ops.SHAPE, host_ops.GPU_DEFAULTS
N_PROMPT, N_DECODE = 8192, 72  # three chunks past the budget; decode through an eviction (64) and 4 retrievals


@pytest.mark.slow
def test_the_synthetic_8b_bench_path_runs_on_the_cpu_as_the_plain_path_does(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda device: True)  # the GPU's attention and graph steps
    monkeypatch.setattr(kernels, "decode", host_ops.reference_decode)
    torch.manual_seed(0)
    model, spec = build_synthetic(SHAPE, torch.device("cpu"), torch.float32, weights="fp16")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (N_PROMPT + N_DECODE,), generator=gen).tolist()
    # then, as a chat's next turn after an answer taken back: the memory cut to 40 tokens into the answer (mid-block,
    # retained tokens per head), a new message read, and decoding again
    again = ids[: N_PROMPT + 40] + torch.randint(0, spec.vocab_size, (300,), generator=gen).tolist()
    runs = {}
    for device_path in (False, True):
        engine = host_ops.gpu_path_engine(model, spec, device_path)
        with torch.inference_mode():
            engine.prefill(ids[:N_PROMPT])
            logits = [engine.next_logits] + [engine.forward([t])[-1] for t in ids[N_PROMPT:]]  # teacher-forced
        stats = engine.memory.stats()
        assert engine.sync(again[:-24]) == N_PROMPT + 40  # what it kept
        logits += [engine.next_logits] + [engine.forward([t])[-1] for t in again[-24:]]
        runs[device_path] = (torch.stack(logits), engine, stats)
    (want, plain, plain_stats), (got, device, device_stats) = runs[False], runs[True]
    assert device.memory.layers[0].gathers_on_device and not plain.memory.layers[0].gathers_on_device
    tokens = ("tokens", "sink_tokens", "window_tokens", "retained_tokens", "evicted_tokens", "host_tokens")
    stats = [{key: run[key] for key in tokens} for run in (plain_stats, device_stats)]
    assert stats[0]["evicted_tokens"] > 0 and stats[0] == stats[1]
    assert device.memory.stats()["tokens"] == len(again) == len(device.tokens)
    assert device.memory.stats()["device_block_cache_bytes"] == 0  # blocks come from pinned memory: no cache
    assert torch.equal(got[0], want[0])  # the prefill: bit for bit
    # decode: to float32 rounding (the device path masks duplicates with an all-true mask; the graph step attends
    # over the context's capacity), and never a different token
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    runner = device.step.stats()
    # every step replays (the evicting one too); a second capture when the rotary tables double (compact positions
    # number every head's distinct tokens: past 8,192 after the 16th step's retrieval here), more after the cut (its
    # rebuilt tiers are new buffers)
    assert runner["replays"] == N_DECODE + 24 and runner["captures"] <= 4 and runner["failed"] is None, runner
    assert device.memory.record.n_retrievals >= N_DECODE // GPU_DEFAULTS.retrieve_every
