"""Snapshot files: round trips, token chains, every kind of damage ending in SnapshotError, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgectx.errors import EdgectxError, SnapshotError
from edgectx.memory.config import MemoryConfig
from edgectx.quant.kv_codec import decode_kv
from edgectx.snapshot.file import FORMAT_VERSION, MAGIC, PREFIX, open_snapshot, read_header, write_snapshot
from edgectx.snapshot.sections import bytes_section, tensor_section
from edgectx.snapshot.token_chain import common_prefix_chunks, token_chain

FP = "ab" * 32


def _kv(seed, t=200, h=2, d=16) -> torch.Tensor:
    return torch.randn(h, t, d, generator=torch.Generator().manual_seed(seed)).half()


def _raw_tensors() -> dict[str, torch.Tensor]:
    return {
        "layer.0.scores": torch.linspace(-3, 3, 60).reshape(3, 20),
        "layer.0.idx": torch.arange(60, dtype=torch.int64).reshape(3, 20) * 7,
        "layer.0.reprs": torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5)).bfloat16(),
        "layer.0.valid": torch.tensor([True, False, True]),
        "layer.0.count": torch.tensor(12345, dtype=torch.int32),  # 0-d
        "layer.0.none": torch.empty(0, 4, dtype=torch.float16),
    }


def _sections():
    """Several kinds: KV under each codec, raw tensors of several dtypes, bytes, empty ones."""
    return [
        tensor_section("layer.0.host.k", _kv(1), codec="int4", kv_kind="key", group=32, keep_first=4, keep_last=16),
        tensor_section("layer.0.host.v", _kv(2), codec="int8", kv_kind="value", group=16),
        tensor_section("layer.1.host.k", _kv(3), codec="fp16", kv_kind="key"),
        tensor_section("layer.1.host.v", _kv(4, t=0), codec="int4", kv_kind="value"),
        *(tensor_section(name, t) for name, t in _raw_tensors().items()),
        bytes_section("retrieval.json", json.dumps({"blocks": [1, 5, 9]}).encode()),
        bytes_section("empty", b""),
    ]


IDS = torch.randint(0, 50000, (1000,), generator=torch.Generator().manual_seed(7))


def _write(path, ids=IDS, sections=None, **kw) -> Path:
    kw.setdefault("model_fingerprint", FP)
    kw.setdefault("model_name", "tiny")
    kw.setdefault("memory_config", MemoryConfig().to_dict())
    return write_snapshot(path, _sections() if sections is None else sections, token_ids=ids, **kw)


def _read_all(path, expect_fingerprint=FP) -> dict:
    with open_snapshot(path, expect_fingerprint) as snap:
        out = {name: snap.read(name) for name in snap.names}
        out["tokens"] = snap.tokens()
    return out


def _same(a, b) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.fixture
def snap_path(tmp_path) -> Path:
    return _write(tmp_path / "doc.edgectxs")


# -- round trip ---------------------------------------------------------------------------------------


def test_round_trip_of_tensor_and_bytes_sections(snap_path):
    got = _read_all(snap_path)
    assert set(got) == {s.name for s in _sections()} | {"tokens"}
    for name, t in _raw_tensors().items():  # raw: exact, dtype and shape included
        assert _same(got[name], t), name
    assert got["retrieval.json"] == b'{"blocks": [1, 5, 9]}' and got["empty"] == b""
    assert torch.equal(got["layer.1.host.k"], _kv(3))  # fp16 KV: exact
    assert got["layer.1.host.v"].shape == (2, 0, 16)
    for name, kv, kind, codec, opts in (("layer.0.host.k", _kv(1), "key", "int4", dict(group=32, keep_first=4, keep_last=16)),
                                        ("layer.0.host.v", _kv(2), "value", "int8", dict(group=16))):
        assert torch.equal(got[name], decode_kv(*_encoded(kv, kind, codec, **opts)))  # what the codec gives, bit for bit
    k = got["layer.0.host.k"]
    assert torch.equal(k[:, :4], _kv(1)[:, :4]) and torch.equal(k[:, -16:], _kv(1)[:, -16:])
    assert float((k.float() - _kv(1).float()).abs().max()) < 0.6  # int4 over a 32-token group of N(0, 1)
    assert torch.equal(got["tokens"], IDS)


def _encoded(x, kind, codec, **opts):
    from edgectx.quant.kv_codec import encode_kv

    enc = encode_kv(x, kind, codec, **opts)
    return enc.meta, enc.payload


def test_header_fields_and_cheap_header_read(snap_path):
    h = read_header(snap_path)
    assert h.format_version == FORMAT_VERSION == 1
    assert h.model_fingerprint == FP and h.model_name == "tiny" and h.memory_config == MemoryConfig().to_dict()
    assert h.n_tokens == 1000 and h.chunk_tokens == 256 and len(h.token_chain) == 4
    assert h.token_chain == tuple(token_chain(IDS))
    assert [s.name for s in h.sections][:2] == ["tokens", "layer.0.host.k"]
    assert h.created.endswith("+00:00")
    with open_snapshot(snap_path) as snap:
        assert snap.header == h
    _write(snap_path, meta={"document": "a.pdf", "turns": [1, 2]})
    assert read_header(snap_path).meta == {"document": "a.pdf", "turns": [1, 2]}


def test_file_layout_matches_the_documented_prefix(snap_path):
    raw = snap_path.read_bytes()
    magic, version, n_header = PREFIX.unpack_from(raw)
    assert magic == MAGIC == b"EDGECTXS" and version == 1
    body = raw[14 : 14 + n_header]
    assert raw[14 + n_header : 46 + n_header] == hashlib.sha256(raw[: 14 + n_header]).digest()
    header = json.loads(body)
    first = header["sections"][0]
    stored = raw[46 + n_header + first["offset"] :][: first["stored_length"]]
    assert hashlib.sha256(stored).hexdigest() == first["sha256"]
    assert zstandard.ZstdDecompressor().decompress(stored) == IDS.numpy().astype("<i8").tobytes()


def test_realistic_int4_snapshot_size(tmp_path, capsys):
    """One layer's host K and V at 32K tokens (3 heads x 64 dims), int4 group 64, zstd level 3."""
    k, v = _kv(11, t=32768, d=64), _kv(12, t=32768, d=64)
    sections = [tensor_section("k", k, "int4", "key"), tensor_section("v", v, "int4", "value")]
    path = write_snapshot(tmp_path / "big", sections, token_ids=torch.arange(32768), model_fingerprint=FP)
    fp16_bytes = 2 * k.numel() * 2
    raw_bytes = sum(len(s.payload) for s in sections)
    ratio_raw, ratio_file = raw_bytes / fp16_bytes, path.stat().st_size / fp16_bytes
    with capsys.disabled():
        print(f"\nint4 K+V, 3x32768x64: {ratio_raw:.4f} of fp16 before zstd, {ratio_file:.4f} as a file")
    assert ratio_raw <= 0.29 and ratio_file <= ratio_raw + 0.01  # random codes barely compress; the ids do


# -- token chain --------------------------------------------------------------------------------------


def test_chain_definition():
    ids = list(range(300))
    link0 = hashlib.sha256(bytes(32) + struct.pack("<256I", *ids[:256])).digest()
    link1 = hashlib.sha256(link0 + struct.pack("<44I", *ids[256:])).digest()
    assert token_chain(ids) == [link0.hex(), link1.hex()]
    assert token_chain([]) == []


def test_common_prefix_chunks():
    ids = torch.randint(0, 1 << 31, (256 * 5 + 17,), generator=torch.Generator().manual_seed(3))
    chain = token_chain(ids)
    assert len(chain) == 6
    assert common_prefix_chunks(chain, ids) == 6
    longer = torch.cat((ids, torch.tensor([5, 6, 7])))
    assert common_prefix_chunks(chain, longer) == 5  # the stored partial chunk is not a prefix of a longer one
    assert common_prefix_chunks(chain, ids[: 256 * 3 + 5]) == 3
    assert common_prefix_chunks(chain, []) == 0 and common_prefix_chunks([], ids) == 0
    for k in range(6):
        changed = ids.clone()
        changed[256 * k + 100 % (17 if k == 5 else 256)] += 1
        assert common_prefix_chunks(chain, changed) == k
    assert common_prefix_chunks(chain, ids.tolist()) == 6  # a list, a tensor: the same ids
    with pytest.raises(ValueError):
        token_chain([-1])


def test_reusable_tokens_from_the_header(snap_path):
    h = read_header(snap_path)
    conversation = torch.cat((IDS, torch.tensor([1, 2, 3])))
    assert h.reusable_tokens(conversation) == 768  # 3 whole chunks; the stored 4th chunk is partial
    assert h.reusable_tokens(IDS) == 1000
    edited = IDS.clone()
    edited[300] += 1
    assert h.reusable_tokens(edited) == 256


# -- damage -------------------------------------------------------------------------------------------


def _damage(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _layout(raw: bytes) -> tuple[int, dict]:
    n_header = struct.unpack_from("<I", raw, 10)[0]
    return n_header, json.loads(raw[14 : 14 + n_header])


def _forge(path: Path, header: dict, data: bytes, version: int = 1) -> Path:
    """A file with a valid header checksum around an edited header: what a careless or hostile writer makes."""
    body = json.dumps(header).encode()
    prefix = struct.pack("<8sHI", MAGIC, version, len(body)) + body
    path.write_bytes(prefix + hashlib.sha256(prefix).digest() + data)
    return path


def _error(path: Path, **kw) -> str:
    with pytest.raises(SnapshotError) as info:
        _read_all(path, **kw)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_at_every_offset(snap_path, tmp_path):
    raw = snap_path.read_bytes()
    bad = tmp_path / "cut"
    assert "empty" in _error(_damage(bad, b""))
    n_header, header = _layout(raw)
    data_start = 46 + n_header
    ends = {data_start + s["offset"] + s["stored_length"] + d for s in header["sections"] for d in (-1, 0, 1)}
    cuts = set(range(1, data_start + 64)) | set(range(data_start, len(raw), 53)) | ends
    _damage(bad, raw)
    for n in sorted((c for c in cuts if c < len(raw)), reverse=True):  # every byte of prefix and header, then a sample
        os.truncate(bad, n)  # (rewriting the file each time is 100x slower)
        message = _error(bad)
        assert "truncated" in message, (n, message)


def test_flipped_bytes_in_each_part_name_the_part(snap_path, tmp_path):
    raw = snap_path.read_bytes()
    n_header, header = _layout(raw)
    bad = tmp_path / "bad"

    def flipped(pos: int, mask: int = 0x01) -> Path:
        data = bytearray(raw)
        data[pos] ^= mask
        return _damage(bad, bytes(data))

    for pos in range(8):
        assert "not an edgectx snapshot" in _error(flipped(pos))
    assert "newer edgectx" in _error(flipped(8, 0x02))  # version 3
    assert "format version 0" in _error(flipped(8, 0x01))
    assert "header length" in _error(flipped(13, 0x10))
    table_start = 14 + raw[14 : 14 + n_header].index(b'"sections"')
    for pos in (14, 14 + n_header // 2, table_start + 40, 14 + n_header - 1, 14 + n_header, 14 + n_header + 31):
        assert "header fails its SHA-256" in _error(flipped(pos)), pos
    data_start = 46 + n_header
    for s in header["sections"]:
        for at in (0, s["stored_length"] // 2, s["stored_length"] - 1):
            path = flipped(data_start + s["offset"] + at, 0x80)
            with open_snapshot(path) as snap:  # lazy: the table is fine, one section is not
                with pytest.raises(SnapshotError, match=f"section '{s['name']}' fails its SHA-256"):
                    snap.read(s["name"])
                others = [n for n in snap.names if n != s["name"]]
                assert all(snap.read(n) is not None for n in others)


def test_wrong_model_and_newer_version(snap_path, tmp_path):
    message = _error(snap_path, expect_fingerprint="cd" * 32)
    assert "another model" in message and "tiny" in message
    raw = snap_path.read_bytes()
    n_header, header = _layout(raw)
    newer = _forge(tmp_path / "v2", {**header, "format_version": 2}, raw[46 + n_header :], version=2)
    message = _error(newer)
    assert "newer edgectx" in message and "version 2" in message and "up to 1" in message
    with pytest.raises(SnapshotError, match="newer edgectx"):
        read_header(newer)


def test_not_a_snapshot(tmp_path):
    assert "not an edgectx snapshot" in _error(_damage(tmp_path / "x.gguf", b"GGUF" + bytes(100)))
    assert "not an edgectx snapshot" in _error(_damage(tmp_path / "t.txt", b"hello"))
    assert "not found" in _error(tmp_path / "missing")
    (tmp_path / "dir").mkdir()
    assert "folder" in _error(tmp_path / "dir")
    assert isinstance(SnapshotError("x"), EdgectxError)


@pytest.mark.parametrize("edit, words", [
    (lambda h: h["sections"][1].update(offset=h["sections"][1]["offset"] - 1), "section table is inconsistent"),
    (lambda h: h["sections"][2].update(offset=h["sections"][2]["offset"] + 5), "section table is inconsistent"),
    (lambda h: h["sections"][-1].update(stored_length=h["sections"][-1]["stored_length"] + 1), "truncated"),
    (lambda h: h["sections"][-1].update(stored_length=h["sections"][-1]["stored_length"] - 1), "unexpected bytes"),
    (lambda h: h["sections"][1].update(raw_length=1 << 40), "imply"),
    (lambda h: h["sections"][-1].update(raw_length=1 << 40), "claims"),
    (lambda h: h["sections"][2].update(name=h["sections"][1]["name"]), "twice"),
    (lambda h: h["sections"][1].update(dtype="float64"), "invalid codec, dtype or shape"),
    (lambda h: h["sections"][1].update(shape=[3, -300, 16]), "invalid codec, dtype or shape"),
    (lambda h: h["sections"][1]["codec"].update(group=0), "do not fit"),
    (lambda h: h["sections"][1].update(compression="lz4"), "compression"),
    (lambda h: h["sections"][1].update(sha256="zz"), "sha256"),
    (lambda h: h["sections"].pop(0), "token ids section"),
    (lambda h: h.update(n_tokens=2000), "token chain does not fit"),
    (lambda h: h.update(n_tokens=999), "token ids section"),
    (lambda h: h.update(memory_config=[]), "memory_config"),
    (lambda h: h.update(format="other"), "malformed"),
    (lambda h: h["sections"][1].update(name="\n" * 100000), "malformed"),  # a giant name: the sentence stays short
])
def test_forged_section_tables_are_refused(snap_path, tmp_path, edit, words):
    raw = snap_path.read_bytes()
    n_header, header = _layout(raw)
    edit(header)
    message = _error(_forge(tmp_path / "forged", header, raw[46 + n_header :]))
    assert "corrupt" in message or "truncated" in message
    assert words in message and len(message) < 600, message


def test_a_lying_zstd_frame_cannot_allocate_more_than_the_table_says(snap_path, tmp_path):
    raw = snap_path.read_bytes()
    n_header, header = _layout(raw)
    data = bytearray(raw[46 + n_header :])
    s = header["sections"][-1]  # the empty bytes section: replace its frame with a 1 GB one
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))  # content size 1 MiB, recorded size 0
    data[s["offset"] : s["offset"] + s["stored_length"]] = bomb
    s.update(stored_length=len(bomb), sha256=hashlib.sha256(bomb).hexdigest())
    with open_snapshot(_forge(tmp_path / "bomb", header, bytes(data))) as snap:
        with pytest.raises(SnapshotError, match="recorded size"):
            snap.read(s["name"])


def test_token_ids_that_do_not_match_the_chain_are_refused(snap_path, tmp_path):
    raw = snap_path.read_bytes()
    n_header, header = _layout(raw)
    tokens = header["sections"][0]
    assert tokens["name"] == "tokens" and tokens["offset"] == 0
    rest = raw[46 + n_header + tokens["stored_length"] :]
    other = zstandard.ZstdCompressor().compress((IDS + 1).numpy().astype("<i8").tobytes())
    shift = len(other) - tokens["stored_length"]
    tokens.update(stored_length=len(other), sha256=hashlib.sha256(other).hexdigest())
    for later in header["sections"][1:]:
        later["offset"] += shift
    forged = _forge(tmp_path / "ids", header, other + rest)
    with open_snapshot(forged) as snap:
        assert torch.equal(snap.read("tokens"), IDS + 1)  # the section itself is intact
        with pytest.raises(SnapshotError, match="token ids do not match its token chain"):
            snap.tokens()


# -- fuzz ---------------------------------------------------------------------------------------------

_BASE: dict = {}


def _base() -> tuple[bytes, dict]:
    """A small valid snapshot and what it holds (built once: hypothesis reruns the test many times)."""
    if not _BASE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = _write(Path(d) / "base", ids=IDS[:300])
            _BASE["raw"], _BASE["values"] = path.read_bytes(), _read_all(path)
    return _BASE["raw"], _BASE["values"]


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def _mutate(raw: bytes, mutations) -> bytes:
    data = bytearray(raw)
    for op, pos, arg in mutations:
        pos = pos % (len(data) + 1)
        if op == "flip" and pos < len(data):
            data[pos] ^= arg
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([arg])
        elif op == "delete":
            del data[pos : pos + arg]
    return bytes(data)


def _reads_only_snapshot_errors(path: Path, data: bytes, original: dict, renamed: tuple[str, str] | None = None) -> None:
    path.write_bytes(data)
    try:
        got = _read_all(path)
    except SnapshotError as e:
        assert str(e) and "\n" not in str(e)
        return
    if renamed is not None:
        # A section's name forged past the checksum reads as that section under the forged name (the sections'
        # checksums cover their bytes, the header their names): the file layer cannot tell; the memory's loader then
        # refuses the snapshot, which lacks a section it reads (`Snapshot.read`). The bytes are the same.
        old, new = renamed
        original = {(new if k == old else k): v for k, v in original.items()}
    # An empty tensor has no bytes for a checksum to cover: a forged shape reads as another empty tensor (the
    # memory's loader then rejects it by the shape it expects); every tensor with data must read back unchanged.
    assert got.keys() == original.keys() and all(_same(got[k], original[k]) or _both_empty(got[k], original[k]) for k in got)


def _both_empty(a, b) -> bool:
    return not isinstance(a, bytes) and not isinstance(b, bytes) and a.numel() == b.numel() == 0 and a.dtype == b.dtype


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_fuzz_mutated_snapshots(tmp_path, mutations):
    raw, original = _base()
    _reads_only_snapshot_errors(tmp_path / "fuzz", _mutate(raw, mutations), original)


_json = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(0, 1 << 16), field=st.integers(0, 1 << 16), value=_json)
def test_fuzz_forged_headers(tmp_path, where, field, value):
    """Past the checksum, a hostile header (any JSON value in any field) still ends in SnapshotError."""
    raw, original = _base()
    n_header, header = _layout(raw)
    targets = [header, header["chain"], *header["sections"], *[s["codec"] for s in header["sections"] if s["codec"]]]
    target = targets[where % len(targets)]
    keys = sorted(target)
    name = keys[field % len(keys)]
    renamed = (target["name"], value) if target in header["sections"] and name == "name" else None
    target[name] = value
    _forge(tmp_path / "forged", header, raw[46 + n_header :])
    _reads_only_snapshot_errors(tmp_path / "forged2", (tmp_path / "forged").read_bytes(), original, renamed)


# -- atomic writes ------------------------------------------------------------------------------------


def _failing_sections(exc: BaseException):
    yield from _sections()[:3]
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_no_file_or_the_previous_one(tmp_path, exc):
    path = tmp_path / "doc.edgectxs"
    with pytest.raises(type(exc)):
        _write(path, sections=_failing_sections(exc))
    assert list(tmp_path.iterdir()) == []
    _write(path)
    before = path.read_bytes()
    with pytest.raises(type(exc)):
        _write(path, ids=IDS[:10], sections=_failing_sections(exc))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_duplicate_or_reserved_section_names_are_refused_before_anything_is_written(tmp_path):
    for sections in ([bytes_section("a", b"1"), bytes_section("a", b"2")], [bytes_section("tokens", b"")]):
        with pytest.raises(ValueError, match="used twice"):
            _write(tmp_path / "s", sections=sections)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    path = _write(tmp_path / "doc.edgectxs")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("edgectx.snapshot.file.os.fsync", full)
    with pytest.raises(SnapshotError, match="disk is full") as info:
        _write(path, ids=IDS[:10])
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    import edgectx.snapshot.file as sf
    from edgectx.snapshot.sections import tensor_section
    path, stage = Path(sys.argv[1]), sys.argv[2]
    def hang(*a):
        Path(str(path) + ".marker").touch()
        time.sleep(60)
    def sections():
        for i in range(8):
            if stage == "sections" and i == 4:
                hang()
            yield tensor_section(f"layer.{i}.k", torch.randn(3, 4096, 64).half(), "int4", "key")
    if stage == "fsync":
        sf.os.fsync = hang  # the whole temp file is written; the kill comes before the rename
    sf.write_snapshot(path, sections(), token_ids=list(range(4096)), model_fingerprint="new")
""")


@pytest.mark.parametrize("stage", ["sections", "fsync"])
def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path, stage):
    path = _write(tmp_path / "doc.edgectxs")
    before = path.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), stage], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    marker = Path(str(path) + ".marker")
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert path.read_bytes() == before
    assert _read_all(path)["tokens"].tolist() == IDS.tolist()
    leftovers = {p.name for p in tmp_path.iterdir()} - {path.name, marker.name}
    if stage == "sections":  # compressed sections spool to an anonymous file: nothing is left
        assert leftovers == set()
    else:  # a kill cannot clean up: at most one hidden temp file, never at the snapshot's path
        assert len(leftovers) == 1 and next(iter(leftovers)).startswith(".doc.edgectxs.")
