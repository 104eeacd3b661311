"""llama.cpp as the reference on a CPU that says AMX but cannot run it (edgectx.bench.reference): a child process
tries first; if it dies, the reference loads without llama.cpp's extra buffer types, and still answers."""

from __future__ import annotations

import numpy as np
import pytest

from edgectx.bench import reference
from edgectx.bench.reference import LlamaCppReference


@pytest.fixture
def fresh(monkeypatch):
    reference.extra_buffers_work.cache_clear()
    yield
    reference.extra_buffers_work.cache_clear()


def test_without_amx_nothing_is_probed(monkeypatch, fresh):
    monkeypatch.setattr(reference, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(reference, "_PROBE", "raise SystemExit(1)")
    assert reference.extra_buffers_work()


@pytest.mark.parametrize("probe,works", [("pass", True), ("import os; os.abort()", False), ("raise SystemExit(3)", False)])
def test_a_child_that_dies_turns_the_extra_buffers_off(monkeypatch, fresh, probe, works):
    monkeypatch.setattr(reference, "_cpu_has_amx", lambda: True)
    monkeypatch.setattr(reference, "_PROBE", probe)
    assert reference.extra_buffers_work() is works


def test_the_reference_loads_without_extra_buffers_and_restores_the_defaults(monkeypatch, embedded_model):
    import llama_cpp
    from llama_cpp import llama as llama_module

    seen = []
    defaults = llama_module.llama_cpp.llama_model_default_params
    monkeypatch.setattr(reference, "extra_buffers_work", lambda: False)
    real_init = llama_cpp.Llama.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append(self.model_params.use_extra_bufts)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", init)
    ref = LlamaCppReference(embedded_model, n_ctx=64, n_threads=1)
    logits = ref.eval_logits(list(range(1, 9)))
    assert seen == [False] and not ref.extra_buffers and np.isfinite(logits).all() and logits.shape[0] == 8
    assert llama_module.llama_cpp.llama_model_default_params is defaults and defaults().use_extra_bufts
