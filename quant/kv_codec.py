"""KV cache codecs for snapshots: lossless fp16, and KIVI-style asymmetric int8 / int4.

KIVI (Liu et al., 2024) observes that keys have outlier *channels* and values do not, so keys are
quantized per channel (min and scale over groups of `group` tokens, separately for every head_dim
channel) and values per token (groups of `group` channels within each token). Every group stores its
minimum and step (scale) in fp16; a code c in [0, 2^bits - 1] decodes to `min + c * scale`. As in
KIVI, the newest tokens stay in full precision, and so do the first ones (attention sinks, which
every later query attends to): `keep_first` and `keep_last` tokens are stored as fp16.

The payload layout (all little-endian) is documented in docs/snapshot-format.md; `payload_nbytes`
gives its exact size from the meta alone, so a reader can check a file's claims before decoding.

    enc = encode_kv(k, "key", "int4", group=64)  # k (n_kv_heads, n_tokens, head_dim) fp16
    k_hat = decode_kv(enc.meta, enc.payload)      # same shape, fp16; |k - k_hat| <= scale / 2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from edgectx.quant.formats import SNAPSHOT_CODECS as CODECS

KINDS = ("key", "value")
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP = 64  # int4 at 64: 4.5 bits per value with the fp16 stats; at 32, 5 bits (see the tests' size table)
DEFAULT_KEEP_FIRST = 64  # MemoryConfig's default sinks
DEFAULT_KEEP_LAST = 128  # KIVI's full-precision residual of newest tokens

if sys.byteorder != "little":  # payloads are the tensors' memory, which must be little-endian
    raise ImportError("edgectx's KV codecs need a little-endian machine")


class KVCodecError(ValueError):
    """Meta or payload that do not describe a valid encoded KV tensor."""


@dataclass(frozen=True)
class EncodedKV:
    meta: dict  # JSON-able: codec, kind, shape and, for int codecs, group, keep_first, keep_last
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class _Layout:
    """Sizes of one encoded tensor, derived from its meta."""

    codec: str
    kind: str
    shape: tuple[int, int, int]  # (n_kv_heads, n_tokens, head_dim)
    group: int
    n_first: int
    n_last: int

    @property
    def n_mid(self) -> int:  # quantized tokens
        return self.shape[1] - self.n_first - self.n_last

    @property
    def stats_shape(self) -> tuple[int, int, int]:
        h, _, d = self.shape
        if self.kind == "key":
            return (h, -(-self.n_mid // self.group), d)  # per channel, over groups of tokens
        return (h, self.n_mid, -(-d // self.group))  # per token, over groups of channels

    @property
    def n_codes(self) -> int:
        return self.shape[0] * self.n_mid * self.shape[2]

    @property
    def nbytes(self) -> int:
        h, t, d = self.shape
        if self.codec == "fp16":
            return 2 * h * t * d
        n_stats = self.stats_shape[0] * self.stats_shape[1] * self.stats_shape[2]
        code_bytes = self.n_codes if self.codec == "int8" else (self.n_codes + 1) // 2
        return 2 * h * (self.n_first + self.n_last) * d + 2 * 2 * n_stats + code_bytes


def _layout(meta: dict) -> _Layout:
    """Validate meta (from an untrusted file) and derive the payload's layout."""
    if not isinstance(meta, dict):
        raise KVCodecError("KV codec meta is not an object")
    codec, kind, shape = meta.get("codec"), meta.get("kind"), meta.get("shape")
    if codec not in CODECS or kind not in KINDS:
        raise KVCodecError(f"unknown KV codec {codec!r} or kind {kind!r}")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_count(n) for n in shape)):
        raise KVCodecError(f"KV shape {shape!r} is not three non-negative integers")
    expected = {"codec", "kind", "shape"} | ({"group", "keep_first", "keep_last"} if codec != "fp16" else set())
    if set(meta) != expected:
        raise KVCodecError(f"KV codec meta has fields {sorted(meta)}, expected {sorted(expected)}")
    if codec == "fp16":
        return _Layout(codec, kind, tuple(shape), 1, 0, 0)
    group, n_first, n_last = meta["group"], meta["keep_first"], meta["keep_last"]
    if not (_is_count(group) and group >= 1 and _is_count(n_first) and _is_count(n_last) and n_first + n_last <= shape[1]):
        raise KVCodecError(f"KV group {group!r} or kept tokens {n_first!r}+{n_last!r} do not fit {shape[1]} tokens")
    return _Layout(codec, kind, tuple(shape), group, n_first, n_last)


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40


def payload_nbytes(meta: dict) -> int:
    """The exact payload size `meta` describes; raises KVCodecError if meta is invalid."""
    return _layout(meta).nbytes


# -- group statistics and codes ---------------------------------------------------------------------


def _padded_groups(y: torch.Tensor, group: int) -> torch.Tensor:
    """(A, N, B) -> (A, G, group, B), the last group padded by repeating its last row (min/max unchanged)."""
    a, n, b = y.shape
    n_groups = -(-n // group)
    pad = n_groups * group - n
    if pad:
        y = torch.cat((y, y[:, -1:].expand(a, pad, b)), dim=1)
    return y.reshape(a, n_groups, group, b)


def _quantize(y: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (A, N, B) fp16, groups along N -> mins, scales (A, G, B) fp16 and codes (A, N, B) uint8."""
    levels = (1 << bits) - 1
    yg = _padded_groups(y, group)  # (A, G, group, B)
    mn, mx = yg.amin(dim=2), yg.amax(dim=2)  # exact: fp16 values
    span = mx.double() - mn.double()  # exact in float64, not always in float32
    scale = (span / levels).half()
    # Round the step up where fp16 rounded it down, so min + levels * scale reaches max: no code clips.
    short = scale.double() * levels < span
    scale = torch.where(short, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()[:, :, None]
    codes = ((yg.float() - mn.float()[:, :, None]) / safe).round_().clamp_(0, levels).to(torch.uint8)
    a, n, b = y.shape
    return mn, scale, codes.reshape(a, -1, b)[:, :n]


def _dequantize(codes: torch.Tensor, mn: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """codes (A, N, B) uint8, mins and scales (A, G, B) -> (A, N, B) fp16."""
    a, n, b = codes.shape
    cg = _padded_groups(codes, group).float()  # (A, G, group, B)
    y = cg * scale.float()[:, :, None] + mn.float()[:, :, None]
    return y.reshape(a, -1, b)[:, :n].half()


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 -> bytes: element 2i in the low nibble, 2i+1 in the high nibble (C order)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat((flat, flat.new_zeros(1)))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=1).reshape(-1)[:n]


def _as_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:  # empty slices may have strides that view() refuses
        return b""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


# -- public API -------------------------------------------------------------------------------------


def encode_kv(x: torch.Tensor, kind: str, codec: str = "int4", group: int = DEFAULT_GROUP,
              keep_first: int = DEFAULT_KEEP_FIRST, keep_last: int = DEFAULT_KEEP_LAST) -> EncodedKV:
    """Encode K or V (n_kv_heads, n_tokens, head_dim); other float dtypes are rounded to fp16 first."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise KVCodecError("encode_kv needs a float tensor shaped (n_kv_heads, n_tokens, head_dim)")
    if codec not in CODECS or kind not in KINDS:
        raise KVCodecError(f"codec must be one of {CODECS} and kind one of {KINDS}, not {codec!r}/{kind!r}")
    x = x.detach().half()
    h, t, d = x.shape
    if codec == "fp16":
        return EncodedKV({"codec": codec, "kind": kind, "shape": [h, t, d]}, _as_bytes(x))
    if group < 1 or keep_first < 0 or keep_last < 0:
        raise KVCodecError("group must be >= 1 and keep_first, keep_last >= 0")
    if not bool(torch.isfinite(x).all()):
        raise KVCodecError("int codecs need finite K/V values")
    n_first = min(keep_first, t)
    n_last = min(keep_last, t - n_first)
    meta = {"codec": codec, "kind": kind, "shape": [h, t, d], "group": group, "keep_first": n_first, "keep_last": n_last}
    mid = x[:, n_first : t - n_last]  # (h, n_mid, d): the quantized tokens
    parts = [x[:, :n_first], x[:, t - n_last :]]
    if mid.numel():
        if kind == "key":
            mn, scale, codes = _quantize(mid, group, BITS[codec])  # stats (h, groups of tokens, d)
        else:
            n_mid = mid.shape[1]
            mn, scale, codes = _quantize(mid.reshape(h * n_mid, d, 1), group, BITS[codec])  # groups of channels
            mn, scale = mn.reshape(h, n_mid, -1), scale.reshape(h, n_mid, -1)  # (h, n_mid, groups of channels)
        parts += [mn, scale, codes if codec == "int8" else _pack4(codes)]
    payload = b"".join(_as_bytes(p) for p in parts)
    assert len(payload) == payload_nbytes(meta)
    return EncodedKV(meta, payload)


def decode_kv(meta: dict, payload: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode what `encode_kv` made: fp16 (n_kv_heads, n_tokens, head_dim) on `device`."""
    lay = _layout(meta)
    if len(payload) != lay.nbytes:
        raise KVCodecError(f"KV payload has {len(payload)} bytes, its meta describes {lay.nbytes}")
    h, t, d = lay.shape
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    buf = buf.to(device)
    if lay.codec == "fp16":
        return buf.view(torch.float16).reshape(h, t, d)
    pos = 0

    def take(n_bytes: int) -> torch.Tensor:
        nonlocal pos
        pos += n_bytes
        return buf[pos - n_bytes : pos]

    first = take(2 * h * lay.n_first * d).view(torch.float16).reshape(h, lay.n_first, d)
    last = take(2 * h * lay.n_last * d).view(torch.float16).reshape(h, lay.n_last, d)
    n_mid = lay.n_mid
    if lay.n_codes == 0:
        mid = torch.empty(h, n_mid, d, dtype=torch.float16, device=buf.device)
    else:
        n_stats = lay.stats_shape[0] * lay.stats_shape[1] * lay.stats_shape[2]
        mn = take(2 * n_stats).view(torch.float16).reshape(lay.stats_shape)
        scale = take(2 * n_stats).view(torch.float16).reshape(lay.stats_shape)
        raw = take(lay.nbytes - pos)
        codes = raw if lay.codec == "int8" else _unpack4(raw, lay.n_codes)
        if lay.kind == "key":
            mid = _dequantize(codes.reshape(h, n_mid, d), mn, scale, lay.group)
        else:
            flat = _dequantize(codes.reshape(h * n_mid, d, 1), mn.reshape(h * n_mid, -1, 1),
                               scale.reshape(h * n_mid, -1, 1), lay.group)
            mid = flat.reshape(h, n_mid, d)
    return torch.cat((first, mid, last), dim=1)
