"""`bench recall --resume FILE`: each finished sample kept as one JSON line, so a long grid runs in pieces.

A 128K-token grid reads hours of text on a CPU. With a log, every sample's answers are appended (and synced)
the moment they are known; a later run with the same file and settings takes them from the log and reads
only what is missing. The first line names the run (model, text, seed, memory settings): a log from other
settings is refused, since its samples would not be the ones asked. A last line cut short by an interrupted
write is dropped and its sample read again.

    log = SampleLog.open(path, header)       # UsageError if the file belongs to another run
    log.get("memory", key)                   # {"results": [...], "s": 12.3} or None
    log.add("memory", key, results, seconds)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgectx.errors import UsageError


def sample_key(task: str, context: int, depth: float, trial: int, needles: list) -> str:
    """The cell and trial, and the needles themselves: a multiquestion sample's depths come from the whole grid,
    so the same cell in a grid of other depths is another sample."""
    return f"{task}:{context}:{depth}:{trial}:" + ",".join(f"{n.key}={n.value}@{n.depth}" for n in needles)


class SampleLog:
    def __init__(self, path: Path, done: dict[tuple[str, str], dict]):
        self.path, self.done = path, done

    @classmethod
    def open(cls, path: Path, header: dict) -> "SampleLog":
        header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
        try:
            lines = path.read_bytes().split(b"\n") if path.exists() else []
        except OSError as e:
            raise UsageError(f"Cannot read the resume file {path} ({e.strerror or e}).") from None
        if not any(lines):
            cls._write(path, json.dumps({"recall_log": 1, **header}) + "\n", mode="w")
            return cls(path, {})
        done: dict[tuple[str, str], dict] = {}
        records = [cls._parse(path, n, line, last=n == len(lines)) for n, line in enumerate(lines, 1)]
        first = records[0]
        if first is None or first.get("recall_log") != 1:
            raise UsageError(f"{path} is not a recall log (its first line names no run): pass a new --resume file.")
        differs = sorted(k for k in set(first) | set(header) if k != "recall_log" and first.get(k) != header.get(k))
        if differs:
            raise UsageError(f"{path} was written by a run with other settings ({', '.join(differs)} differ): "
                             "pass a new --resume file, or the settings it was written with.")
        for record in records[1:]:
            if record is not None:
                done[(record["engine"], record["key"])] = record
        if lines[-1]:  # an interrupted write: drop its partial line before appending
            try:
                os.truncate(path, len(b"\n".join(lines[:-1])) + 1)
            except OSError as e:
                raise UsageError(f"Cannot write the resume file {path} ({e.strerror or e}).") from None
        return cls(path, done)

    @staticmethod
    def _parse(path: Path, n: int, line: bytes, last: bool) -> dict | None:
        if not line:
            return None
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if n == 1:
            return record if isinstance(record, dict) else None  # the header: the caller says what is wrong
        if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                          and record.get("engine") in ("memory", "full") and isinstance(record.get("results"), list)):
            record = None
        if record is None and not last:
            raise UsageError(f"Line {n} of {path} is not a sample record: the file is damaged, so pass a new --resume file.")
        return record

    @staticmethod
    def _write(path: Path, text: str, mode: str = "a") -> None:
        try:
            with open(path, mode, encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UsageError(f"Cannot write the resume file {path} ({e.strerror or e}).") from None

    def get(self, engine: str, key: str) -> dict | None:
        return self.done.get((engine, key))

    def add(self, engine: str, key: str, results: list[dict], seconds: float) -> None:
        record = {"engine": engine, "key": key, "results": results, "s": seconds}
        self._write(self.path, json.dumps(record) + "\n")
        self.done[(engine, key)] = record
