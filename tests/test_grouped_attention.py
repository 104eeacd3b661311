"""grouped_attention against SDPA over repeated K/V heads, on both of its CPU paths (plain products for a few
query rows, the fused kernel for more), with every mask form it takes; and chunk_attention, which runs a chunk's
earlier columns and the chunk itself apart, against one masked call."""

import pytest
import torch
import torch.nn.functional as F

from edgectx.model.kv import SMALL_QUERY_ROWS, _flash_with_lse, chunk_attention, grouped_attention


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


def _one_call(q, k, v, start, valid):
    """What a chunk's attention is: one SDPA call over repeated heads with the whole per-head mask."""
    n_heads, n_new, _ = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    seen = torch.ones(n_kv, start, dtype=torch.bool) if valid is None else valid[:, :start]
    causal = torch.ones(n_new, n_new, dtype=torch.bool).tril()
    mask = torch.cat((seen[:, None].expand(n_kv, n_new, start), causal.expand(n_kv, n_new, n_new)), dim=2)
    rep = lambda x: x.repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=rep(mask))


@pytest.mark.parametrize("n_heads,n_kv,n_new,start", [(9, 3, 512, 2048), (8, 8, 64, 300), (6, 2, 40, 0), (8, 2, 1, 90),
                                                      (4, 2, 3, 50), (32, 8, 2, 300)])
@pytest.mark.parametrize("holes", [False, True])
def test_chunk_attention_equals_one_masked_call(n_heads, n_kv, n_new, start, holes):
    gen = torch.Generator().manual_seed(n_new * 7 + start)
    q = torch.randn(n_heads, n_new, 64, generator=gen) * 2  # logits spread wide enough for the merge to matter
    k, v = (torch.randn(n_kv, start + n_new, 64, generator=gen) for _ in range(2))
    valid = None
    if holes:  # duplicate copies masked per KV head, as a rebuilt context's are; the chunk's own keys always valid
        valid = torch.rand(n_kv, start + n_new + 5, generator=gen) > 0.2
        valid[:, :1] = True
    assert _flash_with_lse() is not None  # the pinned torch has the kernel: the two-call path is what runs here
    got = chunk_attention(q, k, v, start, valid)
    torch.testing.assert_close(got, _one_call(q, k, v, start, valid), rtol=1e-5, atol=1e-5)
    assert got.shape == (n_heads, n_new, 64) and got.is_contiguous()


def test_chunk_attention_masks_what_valid_says():
    """A masked column must not be seen: a key that would take all the attention, masked, changes nothing."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 48, 32, generator=gen)
    k, v = (torch.randn(2, 148, 32, generator=gen) for _ in range(2))
    valid = torch.ones(2, 148, dtype=torch.bool)
    valid[1, 10] = False
    plain = chunk_attention(q, k, v, 100, valid)
    k[1, 10], v[1, 10] = q[3:].mean(dim=(0, 1)) * 50, 1e3  # head 1's queries would all look at column 10
    torch.testing.assert_close(chunk_attention(q, k, v, 100, valid), plain)
    assert (chunk_attention(q, k, v, 100, None)[3:] - plain[3:]).abs().max() > 1
