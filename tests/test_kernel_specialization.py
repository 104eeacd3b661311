"""How many times the Triton kernels compile over a decode (issue 21, defect 5), counted without a GPU.

Triton compiles a kernel once per cache key: the argument types, the constexprs, and for each integer argument
left specialized whether it is 1 or a multiple of 16. The key is computed here the way `JITFunction.run` does
(its binder for an NVIDIA target, then `compute_cache_key`), from the arguments `decode_attention` and
`block_scores` really launch with, intercepted at the launch. A decode that grows its context one key at a time,
with and without a duplicate mask, must land on one key per kernel: a compile inside a timed decode costs
about a second.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels must be imported with TRITON_INTERPRET=1 on a CPU (tests/conftest.py sets it)",
                allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature  # noqa: E402

from edgectx.kernels import block_scoring as scoring_mod  # noqa: E402
from edgectx.kernels import decode_attention as decode_mod  # noqa: E402


class KeyRecorder:
    """Stands in for a @triton.jit kernel: each launch adds the cache key Triton would compile it under (sm_90)."""

    def __init__(self, kernel):
        options = getattr(kernel, "kwargs", None)  # the interpreter's wrapper keeps @triton.jit's options here
        no_spec = options["do_not_specialize"] if options is not None else kernel.do_not_specialize
        jit = JITFunction(kernel.fn, do_not_specialize=no_spec)
        self.binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
        self.keys: set[str] = set()
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _, specialization, options = self.binder(*args, **kwargs)
            self.keys.add(compute_cache_key({}, specialization, options))
            self.launches += 1
        return launch


@pytest.fixture
def recorders(monkeypatch):
    found = {}
    for module, name in ((decode_mod, "_split_kernel"), (decode_mod, "_merge_kernel"), (scoring_mod, "_scores_kernel")):
        found[name] = KeyRecorder(getattr(module, name))
        monkeypatch.setattr(module, name, found[name])
    monkeypatch.setattr(decode_mod, "_programs_wanted", lambda device: 2 * 132)  # an H100's 132 SMs, twice over
    return found


def test_decode_attention_compiles_once_over_a_growing_context(recorders):
    n_kv, group, d = 8, 4, 128
    cos = sin = torch.zeros(8192, 32)
    q = torch.zeros(n_kv * group, 1, d, dtype=torch.bfloat16)
    lengths = list(range(1, 200)) + list(range(200, 6000, 37))  # every length early on, then a sparse sweep
    for step, n_keys in enumerate(lengths):
        k = torch.empty(n_kv, n_keys, d, dtype=torch.bfloat16)
        positions = torch.arange(n_keys)
        valid = torch.ones(n_kv, n_keys, dtype=torch.bool) if step % 3 == 0 else None  # duplicates come and go
        decode_mod.decode_attention(q, k, k, positions=positions, q_position=n_keys, cos=cos, sin=sin, valid=valid)
    split, merge = recorders["_split_kernel"], recorders["_merge_kernel"]
    assert split.launches == merge.launches == len(lengths)
    assert len(split.keys) == 1, f"{len(split.keys)} compiles of the split kernel over {len(lengths)} steps"
    assert len(merge.keys) == 1, f"{len(merge.keys)} compiles of the merge kernel over {len(lengths)} steps"


def test_block_scoring_compiles_once_per_query_shape(recorders):
    n_kv, group, d = 8, 4, 128
    reps = torch.empty(600, n_kv, d, dtype=torch.float16)
    for n_tokens in (1, 512):  # a decode step and a prefill chunk
        q = torch.empty(n_kv * group, n_tokens, d, dtype=torch.bfloat16)
        for n_eligible in range(1, 600, 7):  # the blocks eligible grow with the context
            scoring_mod.block_scores(q, reps, n_eligible)
    scores = recorders["_scores_kernel"]
    assert scores.launches == 2 * len(range(1, 600, 7)) and len(scores.keys) == 1, len(scores.keys)


def test_a_shape_class_change_does_compile_again(recorders):
    """The counter sees real specialization: another dtype is another kernel."""
    cos = sin = torch.zeros(512, 32)
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.zeros(8, 1, 64, dtype=dtype)
        k = torch.empty(2, 100, 64, dtype=dtype)
        decode_mod.decode_attention(q, k, k, positions=torch.arange(100), q_position=100, cos=cos, sin=sin)
    assert len(recorders["_split_kernel"].keys) == 2
