"""grouped_attention against SDPA over repeated K/V heads, on both of its CPU paths (plain products for a few
query rows, the fused kernel for more), with every mask form it takes."""

import pytest
import torch
import torch.nn.functional as F

from edgectx.model.kv import SMALL_QUERY_ROWS, grouped_attention


@pytest.mark.parametrize("n_heads,n_kv,n_tokens,n_keys", [(8, 2, 1, 50), (9, 3, 1, 700), (32, 8, 2, 300), (6, 2, 40, 90)])
@pytest.mark.parametrize("mask_dim", [None, 2, 3])
def test_grouped_attention_matches_attention_over_repeated_heads(n_heads, n_kv, n_tokens, n_keys, mask_dim):
    gen = torch.Generator().manual_seed(n_heads * 1000 + n_keys)
    group = n_heads // n_kv
    q = torch.randn(n_heads, n_tokens, 16, generator=gen)
    k, v = (torch.randn(n_kv, n_keys, 16, generator=gen) for _ in range(2))
    mask = None
    if mask_dim == 2:
        mask = torch.rand(n_tokens, n_keys, generator=gen) > 0.3
    elif mask_dim == 3:
        mask = torch.rand(n_kv, n_tokens, n_keys, generator=gen) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every row sees a key
    per_head = None if mask is None else (mask if mask.dim() == 2 else mask.repeat_interleave(group, dim=0))
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), attn_mask=per_head)
    got = grouped_attention(q, k, v, mask)
    assert (group * n_tokens <= SMALL_QUERY_ROWS) == (n_tokens < 40)  # both paths are exercised
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
