"""The observation window's ring buffer holds exactly what `torch.cat((window, q))[:, -keep:]` would."""

import torch

from edgectx.memory.recent import RecentQueries


def test_window_matches_concatenation_over_mixed_appends():
    g = torch.Generator().manual_seed(0)
    keep = 16
    recent = RecentQueries(3, 4, keep, torch.device("cpu"), torch.float32)
    expected = torch.empty(3, 0, 4)
    sizes = [1] * 40 + [5, 16, 1, 17, 3] + [1] * 30 + [8, 8, 8] + [0, 1]
    for n in sizes:
        q = torch.randn(3, n, 4, generator=g)
        recent.append(q)
        expected = torch.cat((expected, q), dim=1)[:, -keep:]
        assert torch.equal(recent.window, expected)


def test_set_keeps_the_last_queries_and_appends_continue():
    recent = RecentQueries(2, 2, 4, torch.device("cpu"), torch.float32)
    q = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    recent.set(q)
    assert torch.equal(recent.window, q[:, -4:])
    recent.set(q[:, :0])
    assert recent.window.shape == (2, 0, 2)
    recent.append(q[:, :1])
    assert torch.equal(recent.window, q[:, :1])


def test_a_decode_step_does_not_copy_the_window():
    recent = RecentQueries(2, 8, 64, torch.device("cpu"), torch.float32)
    recent.append(torch.randn(2, 64, 8))
    before = recent.window.data_ptr()
    recent.append(torch.randn(2, 1, 8))  # room past the window: written in place, the window slides by one row
    assert recent.window.data_ptr() == before + 8 * 4


def test_the_window_keeps_its_own_dtype_whatever_it_is_given():
    """A memory keeps its recent queries in the tiers' dtype (float16 on the CPU: half a float32 window's RAM);
    float32 queries appended or set (a restore of an older snapshot) are rounded into it."""
    recent = RecentQueries(2, 4, keep=3, device=torch.device("cpu"), dtype=torch.float16)
    q = torch.randn(2, 5, 4) * 1000
    recent.set(q)
    assert recent.window.dtype == torch.float16 and torch.equal(recent.window, q[:, -3:].half())
    more = torch.randn(2, 1, 4)
    recent.append(more)
    assert recent.buffer.dtype == torch.float16 and torch.equal(recent.window[:, -1:], more.half())
