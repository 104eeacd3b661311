"""The fuzz suite over snapshot files (tests/fuzz_snapshots.py makes the mutations): a mutated file, blind or
with its checksums recomputed, is restored or refused through the path `chat --doc` takes, never a traceback,
never a hang, in bounded memory, and the refusal comes from an explicit check. CI runs a few hundred; the long
run is `pytest -m long tests/test_fuzz_snapshots.py` (10,000 by default, EDGECTX_FUZZ_RUNS to change)."""

from __future__ import annotations

import os
import random

import pytest

from fuzz_snapshots import long_run, make_case, mutate, restore_once
from tiny_gguf import write_tiny_gguf

SHORT_RUNS = 240


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    model = write_tiny_gguf(workdir / "tiny.gguf", context_length=4096)
    return workdir, [make_case(model, workdir, codec) for codec in ("int4", "fp16")]


def test_the_intact_snapshots_restore(cases):
    workdir, pairs = cases
    for engine, ids, data in pairs:
        (workdir / "case.ectx").write_bytes(data)
        assert restore_once(engine, ids, workdir / "case.ectx") is None


def test_mutated_snapshots_are_restored_or_refused_by_a_check(cases):
    workdir, pairs = cases
    outside = workdir / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "keep.txt").write_text("untouched")
    rng, kinds, refused = random.Random(20261203), set(), 0
    for run in range(SHORT_RUNS):
        engine, ids, data = pairs[run % len(pairs)]
        what, mutated = mutate(data, rng)
        kinds.add(what.split()[0])
        (workdir / "case.ectx").write_bytes(mutated)
        try:
            refused += restore_once(engine, ids, workdir / "case.ectx") is not None
        except BaseException as e:
            raise AssertionError(f"run {run}, mutation {what}: {type(e).__name__}: {e}") from e
    assert kinds == {"flip", "cut", "append", "field", "table", "payload", "bomb"}  # every kind was tried
    assert refused > SHORT_RUNS // 2  # most mutations are caught; harmless ones (a counter, a date) restore
    assert [p.name for p in outside.iterdir()] == ["keep.txt"] and (outside / "keep.txt").read_text() == "untouched"


def test_a_section_declared_huge_is_refused_before_it_is_decompressed(cases, monkeypatch):
    """A few KiB that would decompress into 256 MiB: refused from the table's shape, never read."""
    import json

    from fuzz_snapshots import _zeros_frame, join, split
    from edgectx.snapshot.file import Snapshot, open_snapshot

    read, real_read = [], Snapshot.read
    monkeypatch.setattr(Snapshot, "read", lambda self, name: read.append(name) or real_read(self, name))

    workdir, pairs = cases
    engine, ids, data = pairs[0]
    header, area, version = split(data)
    sections = [area[e["offset"] : e["offset"] + e["stored_length"]] for e in header["sections"]]
    i = next(i for i, e in enumerate(header["sections"]) if e["name"] == "layer.0.resident.score")
    entry = header["sections"][i]
    scale = (256 << 20) // entry["raw_length"]
    entry["shape"][1] *= scale
    entry["raw_length"] *= scale
    sections[i] = _zeros_frame(entry["raw_length"])
    (workdir / "bomb.ectx").write_bytes(join(json.loads(json.dumps(header)), sections, version))
    with open_snapshot(workdir / "bomb.ectx") as snap:  # the file itself is consistent
        assert snap.info("layer.0.resident.score").shape[1] == entry["shape"][1]
    problem = restore_once(engine, ids, workdir / "bomb.ectx")
    assert "has shape" in problem and "this memory needs" in problem
    assert "layer.0.resident.idx" in read and "layer.0.resident.score" not in read


@pytest.mark.long
def test_the_long_run():
    result = long_run(int(os.environ.get("EDGECTX_FUZZ_RUNS", "10000")), seed=1)
    print(result)
    assert result["runs"] >= 10000 or "EDGECTX_FUZZ_RUNS" in os.environ
    assert result["peak_rss_ratio"] < 1.5, result


def _crafted(data: bytes, edit) -> bytes:
    """`data` with `edit(header, sections)` applied and every length, offset and checksum recomputed."""
    from fuzz_snapshots import join, split

    header, area, version = split(data)
    sections = [area[e["offset"] : e["offset"] + e["stored_length"]] for e in header["sections"]]
    edit(header, sections)
    return join(header, sections, version)


def _section(header, sections, name: str, raw: bytes) -> None:
    import zstandard

    i = next(i for i, e in enumerate(header["sections"]) if e["name"] == name)
    sections[i] = zstandard.ZstdCompressor().compress(raw)


def _nan_scores(header, sections):
    import struct

    entry = next(e for e in header["sections"] if e["name"] == "layer.0.resident.score")
    _section(header, sections, "layer.0.resident.score", struct.pack("<f", float("nan")) * (entry["raw_length"] // 4))


def _empty_resident(header, sections):
    entry = next(e for e in header["sections"] if e["name"] == "layer.0.resident.idx")
    entry["shape"][1], entry["raw_length"] = 0, 0
    _section(header, sections, "layer.0.resident.idx", b"")


CRAFTED = {  # the cases: self-consistent files (checksums recomputed) with wrong values
    "host_dtype 2": (lambda h, s: h["memory_config"].update(host_dtype=2), "memory config"),
    "evict_every 2**32+1": (lambda h, s: h["memory_config"].update(evict_every=2**32 + 1), "memory config"),
    "float chunk_tokens": (lambda h, s: h["memory_config"].update(chunk_tokens=512.5), "memory config"),
    "NaN scores": (_nan_scores, "not finite"),
    "huge relevance": (lambda h, s: h["meta"]["record"]["relevance"].__setitem__(0, float("inf"))
                       if h["meta"]["record"]["relevance"] else h["meta"].update(n_tokens="x"), "memory state"),
    "empty resident index": (_empty_resident, "fewer tokens"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_values_are_refused_and_the_document_read_again(cases, case):
    workdir, pairs = cases
    engine, ids, data = pairs[0]
    edit, words = CRAFTED[case]
    (workdir / "crafted.ectx").write_bytes(_crafted(data, edit))
    problem = restore_once(engine, ids, workdir / "crafted.ectx")  # falls back: the memory holds `ids` again
    assert problem is not None and words in problem, problem


def test_a_fifo_at_the_snapshot_path_is_refused_not_waited_on(cases):
    workdir, pairs = cases
    engine, ids, _ = pairs[0]
    fifo = workdir / "pipe.ectx"
    os.mkfifo(fifo)
    problem = restore_once(engine, ids, fifo)  # returns: nothing writes to the pipe, and nothing waits for it
    assert "not a regular file" in problem
