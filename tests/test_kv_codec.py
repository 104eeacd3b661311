"""KV codecs: fp16 exact, KIVI int8/int4 within their per-group error bounds, sizes as the format says."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgectx.quant.kv_codec import KVCodecError, decode_kv, encode_kv, payload_nbytes

LEVELS = {"int8": 255, "int4": 15}


def _keys(h=3, t=4096, d=64, seed=0) -> torch.Tensor:
    """Key-like data: Gaussian, with a few outlier channels an order of magnitude larger (as KIVI measured)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, t, d, generator=g)
    x[:, :, [c for c in (3, 17, 40) if c < d]] *= 12
    return x.half()


def _reference_step(x: torch.Tensor, kind: str, codec: str, group: int, n_first: int, n_last: int) -> torch.Tensor:
    """Per element, the quantization step of its group, computed group by group (the readable oracle);
    0 for tokens kept in fp16."""
    h, t, d = x.shape
    step = torch.zeros(h, t, d, dtype=torch.float64)
    xs = x.double()
    for head in range(h):
        if kind == "key":  # per channel, over groups of tokens
            for g0 in range(n_first, t - n_last, group):
                g1 = min(g0 + group, t - n_last)
                blk = xs[head, g0:g1]
                step[head, g0:g1] = ((blk.amax(0) - blk.amin(0)) / LEVELS[codec])[None, :]
        else:  # per token, over groups of channels
            for tok in range(n_first, t - n_last):
                for c0 in range(0, d, group):
                    blk = xs[head, tok, c0 : c0 + group]
                    step[head, tok, c0 : c0 + group] = (blk.max() - blk.min()) / LEVELS[codec]
    return step


def _assert_within_half_step(x: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> float:
    """|x - y| <= step/2, allowing the fp16 step's round-up (2^-10 relative) and the output's fp16 rounding."""
    err = (x.double() - y.double()).abs()
    bound = step * (1 + 2**-9) / 2 + x.double().abs() * 2**-11 + 2**-24
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"error exceeds half a quantization step by {worst}"
    big = step > 0
    return float((err[big] / (step[big] / 2)).max()) if bool(big.any()) else 0.0


def test_fp16_round_trip_is_bit_exact_including_special_values():
    x = _keys(2, 37, 8)
    x[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]).half()
    x[1, 1, 0] = 2**-24  # smallest subnormal
    enc = encode_kv(x, "key", "fp16")
    assert enc.nbytes == x.numel() * 2
    y = decode_kv(enc.meta, enc.payload)
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_int_codecs_stay_within_half_a_step_of_each_group(codec, kind):
    x = _keys(2, 300, 48)  # 300 - 5 - 7 = 288 quantized tokens: 4 groups of 64 and a remainder of 32
    enc = encode_kv(x, kind, codec, group=64 if kind == "key" else 32, keep_first=5, keep_last=7)
    y = decode_kv(enc.meta, enc.payload)
    assert y.shape == x.shape and y.dtype == torch.float16
    step = _reference_step(x, kind, codec, enc.meta["group"], 5, 7)
    tightness = _assert_within_half_step(x, y, step)
    assert tightness > 0.9  # the bound is reached: codes really are rounded to this step, not finer


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_sinks_and_newest_tokens_stay_exact(codec):
    x = _keys(3, 500, 64)
    for kind in ("key", "value"):
        enc = encode_kv(x, kind, codec, group=64, keep_first=16, keep_last=100)
        assert enc.meta["keep_first"] == 16 and enc.meta["keep_last"] == 100
        y = decode_kv(enc.meta, enc.payload)
        assert torch.equal(y[:, :16], x[:, :16]) and torch.equal(y[:, -100:], x[:, -100:])
        assert not torch.equal(y[:, 16:-100], x[:, 16:-100])


def test_keys_per_channel_beat_keys_per_token_on_outlier_channels():
    """KIVI's reason for quantizing keys per channel: outlier channels inflate every per-token step."""
    x = _keys(3, 2048, 64)
    normal = [c for c in range(64) if c not in (3, 17, 40)]
    err = {}
    for kind in ("key", "value"):  # "value" groups channels within each token
        enc = encode_kv(x, kind, "int4", group=64, keep_first=0, keep_last=0)
        y = decode_kv(enc.meta, enc.payload).float()
        err[kind] = float((y - x.float())[..., normal].norm() / x.float()[..., normal].norm())
    # Per token, a step spans the outliers' range (~25 sigma against ~5 for a channel's 64 tokens): ~5x the error.
    assert err["key"] < 0.1 and err["value"] > 4 * err["key"], err


@pytest.mark.parametrize("t", [0, 1, 2, 11, 12, 13, 63, 64, 65, 129])
@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_odd_small_and_empty_token_counts(t, codec):
    x = _keys(3, t, 20, seed=t)
    for kind in ("key", "value"):
        enc = encode_kv(x, kind, codec, group=8, keep_first=4, keep_last=8)
        assert enc.nbytes == payload_nbytes(enc.meta)
        y = decode_kv(enc.meta, enc.payload)
        assert y.shape == (3, t, 20) and y.dtype == torch.float16
        if codec == "fp16" or t <= 12:  # everything fits the kept tokens
            assert torch.equal(y, x)
        else:
            n_last = enc.meta["keep_last"]
            _assert_within_half_step(x, y, _reference_step(x, kind, codec, 8, 4, n_last))


def test_a_one_token_remainder_group_is_exact():
    """A remainder group of one token per channel has min == max: step 0, so the key comes back exactly."""
    x = _keys(2, 4 + 16 + 1, 8)
    enc = encode_kv(x, "key", "int4", group=16, keep_first=4, keep_last=0)
    y = decode_kv(enc.meta, enc.payload)
    assert torch.equal(y[:, -1], x[:, -1]) and not torch.equal(y[:, 4:-1], x[:, 4:-1])


def test_int4_bit_layout_low_nibble_first():
    x = torch.arange(16, dtype=torch.float16).reshape(1, 16, 1)  # one channel, codes 0..15 with min 0, step 1
    enc = encode_kv(x, "key", "int4", group=16, keep_first=0, keep_last=0)
    expected = struct.pack("<ee", 0.0, 1.0) + bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    assert enc.payload == expected
    enc3 = encode_kv(torch.tensor([[[4.0], [19.0], [11.0]]]).half(), "key", "int4", group=4, keep_first=0, keep_last=0)
    assert enc3.payload == struct.pack("<ee", 4.0, 1.0) + bytes([0xF0, 0x07])  # odd count: the last high nibble is 0


def test_the_fp16_step_is_rounded_up_so_the_maximum_is_reachable():
    x = torch.tensor([[[0.0], [2.0]]]).half()  # step 2/15 rounds down in fp16 (0.13330): the max would clip
    enc = encode_kv(x, "key", "int4", group=2, keep_first=0, keep_last=0)
    (step,) = struct.unpack("<e", enc.payload[2:4])
    assert step * 15 >= 2 and step == pytest.approx(2 / 15, rel=2**-10)
    top = float(decode_kv(enc.meta, enc.payload)[0, 1, 0])
    assert 2.0 <= top <= 2.0 + step / 2  # code 15, not a clipped 14 (which would miss by most of a step)


def test_int8_value_layout_kept_tokens_then_stats_then_codes():
    x = torch.tensor([[[1.0, 2.0], [0.0, 255.0], [7.0, 9.0]]]).half()  # (1 head, 3 tokens, 2 channels)
    enc = encode_kv(x, "value", "int8", group=2, keep_first=1, keep_last=1)
    assert enc.payload == struct.pack("<eeeeee", 1, 2, 7, 9, 0, 1) + bytes([0, 255])


def test_realistic_sizes_and_errors(capsys):
    """3 KV heads x 32768 tokens x 64 dims (SmolLM2-135M's KV shape at 32K), before zstd."""
    x = _keys(3, 32768, 64, seed=1)
    v = torch.randn(3, 32768, 64, generator=torch.Generator().manual_seed(2)).half()
    fp16_bytes = x.numel() * 2
    rows, ratio, rel = [], {}, {}
    for codec in ("int8", "int4"):
        for group in (32, 64):
            for kind, data in (("key", x), ("value", v)):
                enc = encode_kv(data, kind, codec, group=group)  # 64 sinks and 128 newest tokens in fp16
                y = decode_kv(enc.meta, enc.payload).float()
                ratio[codec, group, kind] = enc.nbytes / fp16_bytes
                rel[codec, group, kind] = float((y - data.float()).norm() / data.float().norm())
                rows.append(f"{codec} group {group:2d} {kind:5s}: {ratio[codec, group, kind]:.4f} of fp16, "
                            f"relative Frobenius error {rel[codec, group, kind]:.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    # bits per value: codes + 2 fp16 stats per group; plus the 192 fp16 tokens
    kept = 192 / 32768
    for (codec, group, kind), r in ratio.items():
        bits = {"int8": 8, "int4": 4}[codec] + 32 / group
        assert r == pytest.approx(bits / 16 * (1 - kept) + kept, abs=1e-6)
    # Group 64 (the default) meets 0.30; group 32 cannot (its stats alone add 1 bit: 5/16 = 0.3125).
    assert ratio["int4", 64, "key"] <= 0.29 and ratio["int4", 64, "value"] <= 0.29
    assert ratio["int4", 32, "key"] > 0.31
    assert ratio["int8", 64, "key"] <= 0.54
    # Uniform rounding error has rms step/sqrt(12); a Gaussian group of 64 spans ~4.9 sigma, of 32 ~4.1 sigma,
    # so int4 keeps ~4.9/15/sqrt(12) = 0.094 (group 64) and 0.079 (group 32) of the norm, int8 17x less.
    assert 0.08 < rel["int4", 64, "value"] < 0.095
    assert 0.07 < rel["int4", 32, "value"] < 0.085
    assert rel["int8", 64, "value"] < 0.006
    assert rel["int4", 64, "key"] < 0.095  # per channel: the outlier channels cost nothing extra
    assert rel["int8", 64, "key"] < 0.006


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 3), t=st.integers(0, 90), d=st.integers(1, 24), group=st.integers(1, 40),
       keep_first=st.integers(0, 10), keep_last=st.integers(0, 10), codec=st.sampled_from(["int8", "int4"]),
       kind=st.sampled_from(["key", "value"]), seed=st.integers(0, 1000))
def test_any_shape_round_trips_within_bounds(h, t, d, group, keep_first, keep_last, codec, kind, seed):
    x = (torch.randn(h, t, d, generator=torch.Generator().manual_seed(seed)) * 10).half()
    enc = encode_kv(x, kind, codec, group=group, keep_first=keep_first, keep_last=keep_last)
    assert len(enc.payload) == payload_nbytes(enc.meta)
    y = decode_kv(enc.meta, enc.payload)
    step = _reference_step(x, kind, codec, group, enc.meta["keep_first"], enc.meta["keep_last"])
    _assert_within_half_step(x, y, step)


def test_invalid_meta_and_payload_are_refused():
    enc = encode_kv(_keys(2, 100, 16), "value", "int4", group=16)
    with pytest.raises(KVCodecError, match="payload has"):
        decode_kv(enc.meta, enc.payload[:-1])
    for bad in ({**enc.meta, "codec": "int3"}, {**enc.meta, "shape": [2, 100]}, {**enc.meta, "group": 0},
                {**enc.meta, "keep_first": 90}, {**enc.meta, "extra": 1}, {**enc.meta, "shape": [2, -1, 16]},
                {**enc.meta, "group": True}, [1, 2]):
        with pytest.raises(KVCodecError):
            payload_nbytes(bad)
    with pytest.raises(KVCodecError, match="finite"):
        encode_kv(torch.full((1, 4, 4), math.inf).half(), "key", "int8")
    with pytest.raises(KVCodecError):
        encode_kv(torch.zeros(4, 4), "key", "int8")
