"""`edgectx ingest`, `chat --doc`, `chat --resume` and `cache`, run as a user runs them, on a tiny model: documents
are read once and restored after, damaged snapshots are reported once and read again, killed processes leave
nothing that loads wrongly and lose no committed message, and two processes can share one data dir."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_sentence, run_cli
from tiny_gguf import write_tiny_gguf

from edgectx.chat.opening import build_opening
from edgectx.chat.documents import read_document
from edgectx.engine import Engine
from edgectx.cli.ingest import byte_count
from edgectx.memory.config import MemoryConfig
from edgectx.snapshot.file import open_snapshot
from edgectx.store.conversations import ConversationStore

MEMORY = ("--budget", "512", "--chunk", "128")  # evicts after a few hundred tokens: snapshots hold every tier
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxes".split()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", context_length=4096)


def _text(n_words: int, seed: int = 0) -> str:
    lines = []
    for i in range(0, n_words, 12):
        lines.append(" ".join(WORDS[(seed + i * 7 + j * 3) % len(WORDS)] for j in range(12)) + f" ({i}).")
    return "\n".join(lines) + "\n"


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + _text(400))
    return path


def _ingest(model: Path, *files: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    result = run_cli("ingest", "--model", str(model), *MEMORY, "--json", *extra, *map(str, files))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _chat(model: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("chat", "--model", str(model), *MEMORY, "--temperature", "0", "--max-tokens", "8", *args)


def _snapshot_files() -> list[Path]:
    root = Path(os.environ["EDGECTX_HOME"]) / "snapshots"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def test_ingest_once_then_chat_restores_and_resume_continues(model, doc):
    first = _ingest(model, doc)[0]
    assert not first["already_ingested"] and first["n_tokens"] > 400
    assert Path(first["snapshot"]).is_file() and first["snapshot_bytes"] == Path(first["snapshot"]).stat().st_size
    again = _ingest(model, doc)[0]
    assert again["already_ingested"] and again["snapshot"] == first["snapshot"]

    chat = _chat(model, "--doc", str(doc), "-p", "What are the notes about?")
    assert chat.returncode == 0, chat.stderr
    assert f"restored {first['n_tokens']:,} tokens" in chat.stderr
    with ConversationStore() as store:
        (conversation,) = store.list_conversations()
        assert [m.role for m in store.messages(conversation.id)] == ["user", "assistant"]
        assert [d.sha256 for d in store.documents.attached(conversation.id)] == [read_document(doc).sha256]

    resumed = _chat(model, "--resume", str(conversation.id), "-p", "And then?")
    assert resumed.returncode == 0, resumed.stderr
    assert "restored" in resumed.stderr and "What are the notes about?" in resumed.stderr
    with ConversationStore() as store:
        assert [m.content for m in store.messages(conversation.id) if m.role == "user"] == ["What are the notes about?", "And then?"]
        assert len(store.list_conversations()) == 1


def test_a_restored_document_gives_the_logits_of_reading_it(model, doc):
    """The opening `chat --doc` rebuilds is token for token what ingest snapshotted (fp16: exactly the same memory)."""
    (entry,) = _ingest(model, doc, extra=("--codec", "fp16"))
    config = MemoryConfig.for_budget(512, chunk_tokens=128)
    live = Engine.load(model, device="cpu", memory_config=config)
    opening = build_opening(live, [read_document(doc)])
    live.prefill(opening.ids)
    restored = Engine.load(model, device="cpu", memory_config=config)
    assert restored.restore(entry["snapshot"]).n_tokens == len(opening.ids)
    assert restored.tokens == opening.ids
    assert restored.next_logits.tolist() == live.next_logits.tolist()


def test_a_damaged_snapshot_is_reported_once_and_the_document_read_again(model, doc):
    (entry,) = _ingest(model, doc)
    path = Path(entry["snapshot"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    chat = _chat(model, "--doc", str(doc), "-p", "Summarize.")
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr
    assert chat.stderr.count(str(path)) == 1  # one sentence naming the file
    assert "read" in chat.stderr and "restored" not in chat.stderr
    with open_snapshot(path) as snap:  # replaced by a sound one
        assert snap.header.n_tokens == entry["n_tokens"]
    assert "restored" in _chat(model, "--doc", str(doc), "-p", "Again.").stderr


def test_ingest_refuses_binary_files_before_loading_a_model(tmp_path):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    result = run_cli("ingest", "--model", str(tmp_path / "missing.gguf"), str(binary))
    assert_one_sentence(result, "image.png")
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * 300_000)
    assert_one_sentence(run_cli("ingest", str(huge), "--max-file-mib", "0.1"), "huge.txt", "--max-file-mib")


def test_cache_ls_rm_and_gc(model, doc, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(_text(300, seed=5))
    a, b = _ingest(model, doc, other)
    listed = json.loads(run_cli("cache", "ls", "--json").stdout)
    assert {e["file"] for e in listed} == {a["snapshot"], b["snapshot"]} and all(e["present"] for e in listed)
    assert {e["document"] for e in listed} == {str(doc), str(other)}

    leftover = Path(a["snapshot"]).parent / ".killed.ectx.1234.tmp"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    keep = max(a["snapshot_bytes"], b["snapshot_bytes"])
    gc = json.loads(run_cli("cache", "gc", "--max-bytes", str(keep), "--json").stdout)
    assert len(gc["removed"]) == 1 and gc["swept_files"] == [str(leftover)] and gc["remaining_bytes"] <= keep
    (remaining,) = json.loads(run_cli("cache", "ls", "--json").stdout)
    assert run_cli("cache", "rm", str(remaining["id"])).returncode == 0
    assert json.loads(run_cli("cache", "ls", "--json").stdout) == [] and _snapshot_files() == []
    assert_one_sentence(run_cli("cache", "rm", "99"), "99", "cache ls")


def test_sizes_parse():
    assert byte_count("4096") == 4096 and byte_count("2G") == 2 * 2**30 and byte_count("1.5MiB") == 3 * 2**19
    with pytest.raises(Exception):
        byte_count("lots")


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _rows(sql: str) -> list:
    db = Path(os.environ["EDGECTX_HOME"]) / "edgectx.db"
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0])
def test_sigkill_during_ingest_leaves_no_snapshot_that_loads_wrongly(model, tmp_path, delay):
    with ConversationStore() as store:  # something committed before, which must survive
        kept = store.create_conversation("kept")
        store.add_message(kept.id, "user", "still here")
    big = tmp_path / "big.txt"
    big.write_text(_text(6000, seed=3))
    proc = subprocess.Popen([sys.executable, "-m", "edgectx", "ingest", "--model", str(model), *MEMORY, str(big)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    _wait_for(lambda: _rows("SELECT id FROM documents") or proc.poll() is not None)
    time.sleep(delay)
    assert proc.poll() is None, proc.stderr.read().decode()  # killed mid-ingest, not after it failed or ended
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in _snapshot_files():  # whatever a killed writer left: complete and sound, or an unlisted temp file
        if path.name.endswith(".tmp"):
            continue
        with open_snapshot(path) as snap:
            assert snap.tokens().numel() == snap.header.n_tokens
    with ConversationStore() as store:
        assert [m.content for m in store.messages(kept.id)] == ["still here"]
        for snapshot in store.snapshots.list():
            assert store.snapshots.path_of(snapshot).is_file()
    (entry,) = _ingest(model, big)  # and ingest works again afterwards
    with open_snapshot(entry["snapshot"]) as snap:
        assert snap.header.n_tokens == entry["n_tokens"]


def test_sigkill_during_an_answer_keeps_every_committed_message(model, tmp_path):
    err = tmp_path / "stderr.txt"
    with err.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "edgectx", "chat", "--model", str(model), *MEMORY, "--temperature", "0",
                                 "--max-tokens", "3000", "--stop", "never-printed"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file, text=True, cwd="/")
    proc.stdin.write("first question\n")
    proc.stdin.flush()
    _wait_for(lambda: len(_rows("SELECT id FROM messages WHERE role = 'assistant'")) == 1 or proc.poll() is not None, 300)
    assert proc.poll() is None, err.read_text()
    proc.stdin.write("second question\n")
    proc.stdin.flush()
    _wait_for(lambda: len(_rows("SELECT id FROM messages")) == 3 or proc.poll() is not None)
    assert proc.poll() is None, err.read_text()
    proc.send_signal(signal.SIGKILL)  # during the second answer
    proc.wait()
    with ConversationStore() as store:
        (conversation,) = store.list_conversations()
        messages = store.messages(conversation.id)
        assert [(m.role, m.content) for m in messages[:3] if m.role == "user"] == [("user", "first question"), ("user", "second question")]
        assert messages[1].role == "assistant" and messages[1].n_tokens > 0
    assert _rows("PRAGMA integrity_check") == [("ok",)]


def test_two_processes_ingesting_the_same_file_share_one_snapshot(model, doc):
    command = [sys.executable, "-m", "edgectx", "ingest", "--model", str(model), *MEMORY, "--json", str(doc)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    (snapshot,) = json.loads(run_cli("cache", "ls", "--json").stdout)
    assert snapshot["present"] and {json.loads(out)[0]["snapshot"] for out, _ in outputs} == {snapshot["file"]}
    assert "restored" in _chat(model, "--doc", str(doc), "-p", "Hi.").stderr


_SNAPSHOT_WRITER = """
import sys
from edgectx.engine import Engine
from edgectx.memory.config import MemoryConfig
engine = Engine.load(sys.argv[1], device="cpu", memory_config=MemoryConfig.for_budget(512, chunk_tokens=128))
engine.prefill([(i * 7) % 200 + 3 for i in range(3000)])
while True:
    engine.snapshot(sys.argv[2], codec="int4")
    print("wrote", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_sigkill_while_a_snapshot_is_written_leaves_the_last_complete_one(model, tmp_path, delay):
    path = tmp_path / "snap.ectx"
    proc = subprocess.Popen([sys.executable, "-c", _SNAPSHOT_WRITER, str(model), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline() == "wrote\n", proc.stderr.read()
    time.sleep(delay)  # into the next write
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == [path]
    engine = Engine.load(model, device="cpu")
    assert engine.restore(path).n_tokens == 3000
    assert engine.tokens == [(i * 7) % 200 + 3 for i in range(3000)]
