"""Mutated snapshot files for the fuzz tests (tests/test_fuzz_snapshots.py), and the long run as a script.

A snapshot is a file users hand to each other, so every byte of it is untrusted. Two kinds of mutation:
- blind: bytes flipped, cut off or appended; the checksums should catch every one;
- consistent: a field of the header JSON, of the section table or of the memory state changed to a hostile
  value (huge, negative, NaN, the wrong type, ...), or a section's payload replaced (zeros, random bytes,
  a compressible "bomb" declared at a larger shape), with every length, offset and SHA-256 recomputed, so
  only the reader's own checks stand between the file and the engine.

Each mutated file goes through the path `chat --doc` takes, `Engine.prefill_with_snapshot`: the outcome must
be a restore or a fallback that reads the tokens again, never an exception, and every rejection must come from
an explicit check (not the restore's catch-all, whose sentence holds edgectx.engine.UNEXPECTED).

    python tests/fuzz_snapshots.py --runs 10000 --seed 1     # the long run (batches of 500 in fresh processes): JSON
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from edgectx.engine import UNEXPECTED, Engine
from edgectx.memory.config import MemoryConfig
from edgectx.model.sampling import SamplingParams
from edgectx.snapshot.format import HASH_BYTES, PREFIX

HOSTILE = [0, -1, 1, 2**31, 2**32 + 1, 2**48, 10**12, 0.5, -0.0, float("nan"), float("inf"), "x", "", None, True,
           [], {}, [1, 2], {"a": 1}]


def split(data: bytes) -> tuple[dict, bytes, int]:
    """(header JSON, data area, format version) of a well-formed snapshot file."""
    _, version, n_header = PREFIX.unpack(data[: PREFIX.size])
    body = data[PREFIX.size : PREFIX.size + n_header]
    return json.loads(body), data[PREFIX.size + n_header + HASH_BYTES :], version


def join(header: dict, sections: list[bytes], version: int) -> bytes:
    """A file with `sections` (stored bytes, in table order) and every offset, length and checksum recomputed."""
    offset = 0
    for entry, stored in zip(header["sections"], sections):
        if isinstance(entry, dict):
            entry["offset"], entry["stored_length"] = offset, len(stored)
            entry["sha256"] = hashlib.sha256(stored).hexdigest()
        offset += len(stored)
    body = json.dumps(header, separators=(",", ":")).encode()  # NaN and inf allowed: a hostile writer may emit them
    prefix = PREFIX.pack(b"EDGECTXS", version, len(body)) + body
    return prefix + hashlib.sha256(prefix).digest() + b"".join(sections)


def _stored_sections(header: dict, area: bytes) -> list[bytes]:
    return [area[e["offset"] : e["offset"] + e["stored_length"]] for e in header["sections"]]


def _paths(value, prefix=()) -> list[tuple]:
    """Every leaf position in a JSON value, as a tuple of keys and indices."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, prefix + (k,))] or [prefix]
    if isinstance(value, list) and value and len(value) <= 64:
        return [p for i, v in enumerate(value) for p in _paths(v, prefix + (i,))]
    return [prefix]


def _set(value, path: tuple, new) -> None:
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def _get(value, path: tuple):
    for key in path:
        value = value[key]
    return value


def _hostile_like(rng: random.Random, old):
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.5:
        return rng.choice([old * 2, old + 1, old - 1, old * 1000, -old, old // 2 if isinstance(old, int) else old / 2])
    return copy.deepcopy(rng.choice(HOSTILE))


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of a well-formed snapshot: (what was done, the new file)."""
    kind = rng.choice(["flip", "flip", "cut", "append", "field", "field", "field", "table", "payload", "bomb"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "cut":
        return kind, data[: rng.randrange(len(data))]
    if kind == "append":
        return kind, data + rng.randbytes(rng.randint(1, 64))
    header, area, version = split(data)
    sections = _stored_sections(header, area)
    if kind == "field":  # any header leaf: memory config, chain, meta (layer state, record), names
        targets = [p for p in _paths(header) if p and p[0] != "sections"]
        path = rng.choice(targets)
        _set(header, path, _hostile_like(rng, _get(header, path)))
        return f"field {'.'.join(map(str, path))}", join(header, sections, version)
    i = rng.randrange(len(sections))
    entry = header["sections"][i]
    if kind == "table":
        key = rng.choice(["shape", "dtype", "codec", "raw_length", "kind", "name"])
        if key == "shape" and isinstance(entry.get("shape"), list) and entry["shape"] and rng.random() < 0.7:
            dim = rng.randrange(len(entry["shape"]))
            entry["shape"][dim] = _hostile_like(rng, entry["shape"][dim])
        else:
            entry[key] = _hostile_like(rng, entry.get(key))
        return f"table {entry.get('name')}.{key}", join(header, sections, version)
    raw_length = entry["raw_length"]
    if kind == "payload":  # same declared size, other content: zeros, random bytes or the bytes of another section
        raw = rng.choice([bytes(raw_length), rng.randbytes(raw_length),
                          zstandard.ZstdDecompressor().decompress(rng.choice(sections))[:raw_length].ljust(raw_length, b"\0")])
        sections[i] = zstandard.ZstdCompressor(level=1).compress(raw)
        return f"payload {entry['name']}", join(header, sections, version)
    # bomb: a raw tensor section declared far larger (shape and raw length consistent with each other): zeros,
    # up to 256 MiB of them, that compress to a few KiB
    if isinstance(entry.get("shape"), list) and entry["shape"] and entry.get("codec") == {"codec": "raw"} and raw_length:
        scale = min(rng.choice([16, 1024, 65536]), (256 << 20) // raw_length) or 1
        entry["shape"][rng.randrange(len(entry["shape"]))] *= scale
        entry["raw_length"] = raw_length * scale
        sections[i] = _zeros_frame(raw_length * scale)
    return f"bomb {entry['name']}", join(header, sections, version)


def _zeros_frame(n_bytes: int) -> bytes:
    """A zstd frame of `n_bytes` zeros, its content size recorded, made without holding the zeros."""
    import io

    out = io.BytesIO()
    chunk = bytes(1 << 20)
    with zstandard.ZstdCompressor(level=1).stream_writer(out, size=n_bytes, closefd=False) as writer:
        for start in range(0, n_bytes, len(chunk)):
            writer.write(chunk[: min(len(chunk), n_bytes - start)])
    return out.getvalue()


def make_case(model: Path, workdir: Path, codec: str, n_tokens: int = 700) -> tuple[Engine, list[int], bytes]:
    """An engine on `model`, and the snapshot (bytes) of a memory that has evicted, retrieved and decoded."""
    memory = MemoryConfig.for_budget(256, chunk_tokens=64)
    engine = Engine.load(model, device="cpu", memory_config=memory, n_threads=1)
    rng = random.Random(0)
    ids = [rng.randrange(3, engine.spec.vocab_size) for _ in range(n_tokens)]
    engine.prefill(ids)
    list(engine.generate(SamplingParams(temperature=0), max_tokens=12))
    path = workdir / f"intact.{codec}.ectx"
    engine.snapshot(path, codec=codec)
    return engine, list(engine.tokens), path.read_bytes()


def restore_once(engine: Engine, ids: list[int], path: Path) -> str | None:
    """The `chat --doc` path on one file: restore it, or fall back and read `ids`; then one decode step.
    Returns the problem reported (None: restored). Raises AssertionError for an outcome that must not happen."""
    problems: list[str] = []
    info = engine.prefill_with_snapshot(ids, path, on_problem=problems.append)
    assert engine.tokens == ids, "the memory does not hold the document after the restore or the fallback"
    assert len(problems) == (info.problem is not None), "a problem was reported more than once"
    if info.problem is not None:
        assert "\n" not in info.problem and UNEXPECTED not in info.problem, info.problem
    list(engine.generate(SamplingParams(temperature=0), max_tokens=1))  # the restored memory works
    return info.problem


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_batch(runs: int, seed: int) -> dict:
    """In this process: restore the intact files, then `runs` mutations of them. Raises on a forbidden outcome."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_gguf import write_tiny_gguf

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = write_tiny_gguf(workdir / "tiny.gguf", context_length=4096)
        cases = [make_case(model, workdir, codec) for codec in ("int4", "fp16")]
        for engine, ids, data in cases:  # the intact files restore
            (workdir / "case.ectx").write_bytes(data)
            assert restore_once(engine, ids, workdir / "case.ectx") is None
        rng, counts, slowest = random.Random(seed), {"restored": 0, "fell_back": 0}, 0.0
        for run in range(runs):
            engine, ids, data = cases[run % len(cases)]
            what, mutated = mutate(data, rng)
            (workdir / "case.ectx").write_bytes(mutated)
            start = time.perf_counter()
            try:
                problem = restore_once(engine, ids, workdir / "case.ectx")
            except BaseException as e:
                raise AssertionError(f"seed {seed}, run {run}, mutation {what}: {type(e).__name__}: {e}") from e
            slowest = max(slowest, time.perf_counter() - start)
            counts["fell_back" if problem else "restored"] += 1
    return {"runs": runs, **counts, "slowest_case_s": round(slowest, 3), "peak_rss_bytes": peak_rss_bytes()}


def long_run(runs: int, seed: int, batch: int = 500, timeout_s: float = 900) -> dict:
    """`runs` mutations in fresh processes of `batch` each (a process's allocator keeps what thousands of
    different restores freed, which is not what one file costs), against a process that restores the intact
    files only. A batch that outlives `timeout_s` is a hang."""
    import subprocess

    def child(n: int, child_seed: int) -> dict:
        cmd = [sys.executable, str(Path(__file__)), "--child", "--runs", str(n), "--seed", str(child_seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tempfile.gettempdir())
        if done.returncode != 0:
            raise AssertionError(f"fuzz batch (seed {child_seed}) failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    t0 = time.perf_counter()
    intact = child(0, seed)
    batches = [child(min(batch, runs - start), seed * 100003 + start) for start in range(0, runs, batch)]
    peak = max(b["peak_rss_bytes"] for b in batches)
    return {"runs": sum(b["runs"] for b in batches), "seed": seed, "batch": batch,
            "restored": sum(b["restored"] for b in batches), "fell_back": sum(b["fell_back"] for b in batches),
            "tracebacks": 0, "hangs": 0, "slowest_case_s": max(b["slowest_case_s"] for b in batches),
            "peak_rss_bytes": peak, "intact_peak_rss_bytes": intact["peak_rss_bytes"],
            "peak_rss_ratio": round(peak / intact["peak_rss_bytes"], 3), "elapsed_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500, help="mutations per fresh process")
    parser.add_argument("--child", action="store_true", help="run one batch in this process")
    args = parser.parse_args()
    result = run_batch(args.runs, args.seed) if args.child else long_run(args.runs, args.seed, args.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
