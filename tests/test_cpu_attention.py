"""The fused CPU decode step's float16 attention (edgectx.kernels.cpu_attention: two ggml custom ops in C, compiled
at first use) against float64 attention over the same float16 keys and values, run as the decode graph runs them:
one ggml graph, every thread a share of the keys; and the way back to ggml's flash attention when the library
cannot be built."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from edgectx.kernels import cpu_attention
from edgectx.quant.ggml_cpu import _F16, _F32, _InitParams, _TensorP, ggml_available, lib

pytestmark = pytest.mark.skipif(not ggml_available() or cpu_attention.ops() is None,
                                reason="ggml's libraries or a C compiler for an AVX2 CPU are missing here")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, threads: int,
            parts: int = 64) -> torch.Tensor:
    """q (n_heads, d) float32, k and v (n_kv, capacity, d) float16 of which the first `length` = k.shape[1] - 3
    columns are attended (the rest is room, as in a context), mask (n_heads, capacity) float16 or None -> (n_heads, d)
    through the two ops in a ggml graph of `threads` threads, the partials holding `parts` threads' shares."""
    g = lib()
    n_heads, d = q.shape
    n_kv, capacity, _ = k.shape
    length = capacity - 3
    ctx = g.ggml_init(_InitParams(64 * g.ggml_tensor_overhead() + g.ggml_graph_overhead() + 4096, None, True))
    try:
        qt = g.ggml_new_tensor_2d(ctx, _F32, d, n_heads)
        qt.contents.data = q.data_ptr()
        views = []
        for buf in (k, v):
            t = g.ggml_new_tensor_3d(ctx, _F16, d, length, n_kv)
            t.contents.data = buf.data_ptr()
            t.contents.nb[1], t.contents.nb[2] = d * 2, capacity * d * 2
            t.contents.nb[3] = n_kv * capacity * d * 2
            views.append(t)
        args = [qt, *views]
        if mask is not None:
            m = g.ggml_new_tensor_3d(ctx, _F16, length, 1, n_heads)
            m.contents.data = mask.data_ptr()
            m.contents.nb[1] = m.contents.nb[2] = capacity * 2
            args.append(m)
        partial, reduce = cpu_attention.ops()
        part = g.ggml_custom_4d(ctx, _F32, d + 2, n_heads, parts, 1, (_TensorP * len(args))(*args), len(args), partial,
                                -1, None)
        out = g.ggml_custom_4d(ctx, _F32, d, n_heads, 1, 1, (_TensorP * 1)(part), 1, reduce, -1, None)
        scratch = torch.empty((d + 2) * n_heads * parts, dtype=torch.float32)
        result = torch.full((n_heads, d), float("nan"))
        part.contents.data, out.contents.data = scratch.data_ptr(), result.data_ptr()
        graph = g.ggml_new_graph(ctx)
        g.ggml_build_forward_expand(graph, out)
        plan = g.ggml_graph_plan(graph, threads, None)
        work = torch.empty(plan.work_size + 64, dtype=torch.uint8)
        plan.work_data = work.data_ptr()
        assert g.ggml_graph_compute(graph, ctypes.byref(plan)) == 0
        return result
    finally:
        g.ggml_free(ctx)


def _reference(q, k, v, mask) -> torch.Tensor:
    n_heads, d = q.shape
    n_kv, length = k.shape[0], k.shape[1] - 3
    group = n_heads // n_kv
    keys, values = (t[:, :length].double().repeat_interleave(group, dim=0) for t in (k, v))
    scores = torch.einsum("hd,hkd->hk", q.double(), keys) / d**0.5
    if mask is not None:
        scores = scores + mask[:, :length].double()
    return torch.einsum("hk,hkd->hd", torch.softmax(scores, dim=-1), values)


def _inputs(n_heads: int, n_kv: int, d: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_heads, d, generator=gen) * 2
    k, v = (torch.randn(n_kv, length + 3, d, generator=gen).half() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("n_heads,n_kv,d", [(9, 3, 64), (4, 1, 64), (8, 8, 128), (32, 8, 128), (16, 2, 64)])
@pytest.mark.parametrize("length", [1, 7, 64, 65, 200, 2600])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_ops_attend_as_float64_attention_does(n_heads, n_kv, d, length, threads):
    q, k, v = _inputs(n_heads, n_kv, d, length)
    out = _attend(q, k, v, None, threads)
    torch.testing.assert_close(out.double(), _reference(q, k, v, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_masked_keys_get_no_weight_even_a_whole_threads_share(threads):
    """Per query head, -inf where its KV head's copy is a duplicate: here the first 70% of one KV head's keys (the
    first thread's whole share at two threads, a block fully masked) and a scattered fifth of the others'."""
    n_heads, n_kv, d, length = 9, 3, 64, 500
    q, k, v = _inputs(n_heads, n_kv, d, length, seed=1)
    gen = torch.Generator().manual_seed(2)
    blocked = torch.rand(n_kv, length + 3, generator=gen) < 0.2
    blocked[0, : int(0.7 * length)] = True
    mask = torch.zeros(n_kv, length + 3).masked_fill_(blocked, float("-inf")).half().repeat_interleave(3, dim=0)
    out = _attend(q, k, v, mask, threads)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # and the masked keys did count for nothing: changing their values changes nothing
    v2 = v.clone()
    v2[blocked] = 100
    assert torch.equal(_attend(q, k, v2, mask, threads), out)


def test_more_threads_than_partials_leave_the_rest_idle():
    q, k, v = _inputs(9, 3, 64, 300, seed=3)
    out = _attend(q, k, v, None, threads=3, parts=2)
    torch.testing.assert_close(out.double(), _reference(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_a_library_that_cannot_be_built_leaves_flash_attention_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGECTX_CACHE", str(tmp_path / "cache"))  # a cache dir with no library built yet
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: "/bin/false")  # a compiler that fails
    with caplog.at_level(logging.WARNING):
        assert cpu_attention.ops.__wrapped__() is None
    assert "building it with /bin/false failed" in caplog.text
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("EDGECTX_CPU_ATTENTION", "0")
    assert cpu_attention.ops.__wrapped__() is None


def test_a_built_library_is_reused_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECTX_CACHE", str(tmp_path / "cache"))
    assert cpu_attention.ops.__wrapped__() is not None
    built = list((tmp_path / "cache" / "kernels").glob("cpu_attention-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_attention, "_build", lambda *a: pytest.fail("built again"))
    assert cpu_attention.ops.__wrapped__() is not None
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("d", [64, 128])
def test_keys_rotate_into_a_float16_context_bit_for_bit_as_rope_rotate_then_rounding(d):
    """The memory's rebuild rotates in C what it rotated with Rope.rotate in float32 and rounded to float16: the same
    bits, for keys as large as a model's (the embedded model's reach ~20) and positions anywhere in the tables."""
    from edgectx.model.rope import Rope
    from edgectx.model.spec import ModelSpec

    spec = ModelSpec(arch="llama", n_layers=1, dim=4 * d, n_heads=4, n_kv_heads=1, head_dim=d, ffn_dim=64, vocab_size=10,
                     context_length=8192)
    rope = Rope(spec, torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    n_kv, n, capacity = 3, 700, 900
    src = (torch.randn(n_kv, n, d, generator=gen) * 20).half()
    positions = torch.randint(0, 5000, (n_kv, n), generator=gen)
    cos, sin = rope.signed_tables(5000)
    expected = rope.rotate(src, *rope.tables(positions, torch.float32, n_positions=5000)).half()
    dst = torch.zeros(n_kv, capacity, d, dtype=torch.float16)  # a context's buffer: heads `capacity` columns apart
    cpu_attention.rotate_into(dst[:, 100 : 100 + n], src, positions, cos, sin)
    assert torch.equal(dst[:, 100 : 100 + n], expected)
    assert not dst[:, :100].any() and not dst[:, 100 + n :].any()  # nothing written outside
    with pytest.raises(ValueError, match="outside the tables"):
        cpu_attention.rotate_into(dst[:, :n], src, positions + 5000, cos, sin)


@pytest.mark.parametrize("n_heads,n_kv,d,n_q", [(9, 3, 64, 1), (9, 3, 64, 16), (32, 8, 128, 4), (4, 4, 64, 3)])
def test_attention_mass_is_the_softmax_weights_summed_per_key(n_heads, n_kv, d, n_q):
    """What the eviction scorer observes and the retrieval record keeps: per key, the weight every query row of its
    KV head puts on it, each row seeing the keys its KV head's `valid` allows and, with indices, none newer than it."""
    length, capacity = 1000, 1100
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(n_heads, n_q, d, generator=gen) * 2
    k = torch.randn(n_kv, capacity, d, generator=gen).half()
    valid = torch.rand(n_kv, capacity, generator=gen) > 0.1
    idx = torch.randperm(capacity, generator=gen).expand(n_kv, -1).contiguous()
    q_idx = torch.arange(n_q, dtype=torch.int64) + 500  # each query sees the keys of index <= its own
    scratch = torch.empty(n_heads // n_kv * n_q * length)
    group = n_heads // n_kv
    scores = torch.einsum("hqd,hkd->hqk", q.double().reshape(n_kv, group * n_q, d), k[:, :length].double()) / d**0.5
    seen = valid[:, None, :length] & (idx[:, None, :length] <= q_idx.repeat(group)[None, :, None])
    expected = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1).sum(dim=1)
    got = cpu_attention.attention_mass(q, k, length, scratch, valid=valid, idx=idx, q_idx=q_idx)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    unmasked = torch.softmax(scores, dim=-1).sum(dim=1)
    torch.testing.assert_close(cpu_attention.attention_mass(q, k, length, scratch).double(), unmasked, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not take"):
        cpu_attention.attention_mass(q, k, length, scratch[:10])


@pytest.mark.parametrize("env", [{}, {"EDGECTX_HOME": "home"}, {"EDGECTX_CACHE": "cache", "EDGECTX_HOME": "home"}])
def test_the_library_lives_in_the_cache_dir_the_config_names(tmp_path, monkeypatch, env):
    from edgectx.config import cache_dir

    for name in ("EDGECTX_HOME", "EDGECTX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert cpu_attention._cache_folder() == cache_dir() / "kernels"


def test_the_ops_read_ggmls_tensor_struct_as_the_bindings_do():
    from edgectx.quant import ggml_decode

    assert ggml_decode._layout_agrees()
