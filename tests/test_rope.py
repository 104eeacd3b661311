"""Rope.rotate and Rope.tables: the same bits as the fused decode step's rotation, whatever the layout of positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgectx.model.rope import Rope
from edgectx.model.synthetic import synthetic_spec


def _swap_halves_rotation(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """x * cos + swap_halves(x) * signed_sin on the first rope_dim dims (what ggml_decode builds, op for op)."""
    head, tail = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    swapped = torch.cat((head[..., half:], head[..., :half]), dim=-1)
    return torch.cat((head * cos + swapped * signed_sin, tail), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("partial", [False, True])
def test_rotation_is_the_swap_halves_formula_bit_for_bit(dtype, partial):
    spec = synthetic_spec("tiny")
    if partial:
        spec = dataclasses.replace(spec, rope_dim=spec.head_dim // 2)
    rope = Rope(spec, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 5000, (3, 300), generator=gen)  # per KV head, as a rebuilt context has them
    x = (torch.randn(3, 300, spec.head_dim, generator=gen) * 3).to(dtype)
    cos, sin = rope.tables(positions, dtype, n_positions=5000)
    assert cos.shape == (3, 300, spec.rope_dim)
    assert torch.equal(rope.rotate(x, cos, sin), _swap_halves_rotation(x, cos, sin, spec.rope_dim))
    # a decode step's query: one position broadcast over the heads
    q = torch.randn(4, 1, spec.head_dim, generator=gen).to(dtype)
    cos1, sin1 = rope.range_tables(4321, 1, dtype)
    assert torch.equal(rope.rotate(q, cos1, sin1), _swap_halves_rotation(q, cos1, sin1, spec.rope_dim))


def test_tables_for_a_grid_of_positions_are_the_rows_for_each():
    spec = synthetic_spec("tiny")
    rope = Rope(spec, torch.device("cpu"))
    positions = torch.tensor([[7, 0, 4095], [1, 1, 9000]])
    cos, sin = rope.tables(positions, torch.float32)
    for (h, i), p in zip([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], positions.flatten().tolist()):
        row_cos, row_sin = rope.range_tables(p, 1, torch.float32)
        assert torch.equal(cos[h, i], row_cos[0]) and torch.equal(sin[h, i], row_sin[0])
    empty_cos, _ = rope.tables(positions[:, :0], torch.float32, n_positions=10)
    assert empty_cos.shape == (2, 0, spec.rope_dim)
