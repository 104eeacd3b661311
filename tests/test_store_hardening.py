"""The store under hostile or failing conditions: nothing outside the data dir is ever deleted or written, damaged
values read as absent, a full disk is named as such, a snapshot that cannot be saved is only a warning, and a
read-only data dir still lists, exports and chats (`--no-history`).

The tests run as root, which ignores file permissions, so a read-only data dir is simulated: SQLite is made to
refuse the read-write open the way it does in a folder it cannot write (SQLITE_READONLY_DIRECTORY), and the
real `chmod 555` test runs only as another user. A full disk is simulated the same way (the error SQLite gives),
and made for real on a small tmpfs where mounting one is allowed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from cli_helpers import assert_one_sentence, run_cli
from tiny_gguf import write_tiny_gguf

from edgectx.cli.main import main
from edgectx.engine import Engine
from edgectx.errors import StoreError
from edgectx.store.conversations import ConversationStore, Message, StoredConversation
from edgectx.store.documents import StoredDocument
from edgectx.store.snapshots import SnapshotEntry, SnapshotManifest

MEMORY = ("--budget", "512", "--chunk", "128")  # as tests/test_ingest.py: snapshots hold every tier
PRECIOUS = b"not edgectx's to delete"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxes".split()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _home() -> Path:
    return Path(os.environ["EDGECTX_HOME"])


def _sql(statement: str, params: tuple = ()) -> int:
    """Write with sqlite3 directly, as another program or a hand edit could; returns the last row id."""
    with ConversationStore():  # the schema exists
        pass
    conn = sqlite3.connect(_home() / "edgectx.db")
    try:
        with conn:
            return conn.execute(statement, params).lastrowid
    finally:
        conn.close()


def _plant(file: str, size_bytes: int = 100) -> int:
    return _sql("INSERT INTO snapshots (file, model_fingerprint, codec, n_tokens, chain_hash, size_bytes, created_at, "
                "last_used_at) VALUES (?, 'fp', 'int4', 10, 'ab', ?, 0, 0)", (file, size_bytes))


def _ends_in_one_sentence(result: subprocess.CompletedProcess, *words: str) -> None:
    """A failure after the model loaded: its status lines, then one `edgectx: ...` sentence."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("edgectx: ")] == lines[-1:], result.stderr
    assert all(word in lines[-1] for word in words), lines[-1]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", context_length=4096)


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + "\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(30)))
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the data dir holding a file edgectx must never touch (old enough for `cache gc` to sweep)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    precious = folder / "precious.ectx"
    precious.write_bytes(PRECIOUS)
    os.utime(precious, (time.time() - 7200, time.time() - 7200))
    return folder


def _chat_argv(model: Path, *args: str) -> list[str]:
    return ["chat", "--model", str(model), *MEMORY, "--temperature", "0", "--max-tokens", "4", *args]


def _ingest(model: Path, doc: Path) -> subprocess.CompletedProcess:
    return run_cli("ingest", "--model", str(model), *MEMORY, "--json", str(doc))


# -- 1. nothing outside the data dir is deleted or written ------------------------------------------------


def _hostile_file(kind: str, outside: Path) -> str:
    if kind == "..":
        return "../outside/precious.ectx"
    if kind == "absolute":
        return str(outside / "precious.ectx")
    link = _home() / "snapshots" / "link"  # a folder inside the data dir that leads out of it
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    return "snapshots/link/precious.ectx"


COMMANDS = [("cache", "rm", "{id}"), ("cache", "gc"), ("cache", "gc", "--max-bytes", "0")]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("kind", ["..", "absolute", "symlinked folder"])
def test_a_row_leading_out_of_the_data_dir_is_forgotten_and_its_file_left_alone(capsys, outside, kind, command):
    snapshot_id = _plant(_hostile_file(kind, outside))
    code, _, err = _run(capsys, *(arg.format(id=snapshot_id) for arg in command))
    assert code == 0
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS
    assert "left alone" in _one_line(err) and f"Snapshot {snapshot_id}" in err
    with ConversationStore() as store:
        assert store.snapshots.list() == []


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_symlinked_snapshot_file_is_unlinked_never_its_target(capsys, outside, command):
    link = _home() / "snapshots" / "fp" / "ab.int4.ectx"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "precious.ectx")
    snapshot_id = _plant("snapshots/fp/ab.int4.ectx")
    code, _, err = _run(capsys, *(arg.format(id=snapshot_id) for arg in command))
    assert code == 0 and "Traceback" not in err
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS
    removed = command != ("cache", "gc")  # a plain gc keeps a listed file that is there
    assert link.is_symlink() is not removed


def test_the_api_never_deletes_outside_the_data_dir(store, outside):
    for file in ("../outside/precious.ectx", str(outside / "precious.ectx"), "edgectx.db"):
        snapshot_id = _plant(file)
        with pytest.warns(RuntimeWarning, match="left alone"):
            assert store.snapshots.remove(snapshot_id).id == snapshot_id
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS
    assert (_home() / "edgectx.db").is_file() and store.snapshots.list() == []


def test_gc_sweeps_only_regular_files_of_the_data_dir(capsys, outside):
    folder = _home() / "snapshots" / "fp"
    folder.mkdir(parents=True)
    leftover = folder / ".killed.ectx.1234.tmp"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    (_home() / "snapshots" / "evil").symlink_to(outside, target_is_directory=True)
    (folder / "link.ectx").symlink_to(outside / "precious.ectx")
    with ConversationStore():
        pass
    code, out, _ = _run(capsys, "cache", "gc", "--json")
    assert code == 0 and json.loads(out)["swept_files"] == [str(leftover)]
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS
    assert (folder / "link.ectx").is_symlink() and not leftover.exists()


def test_gc_does_not_sweep_a_symlinked_snapshot_folder(capsys, outside):
    with ConversationStore():
        pass
    (_home() / "snapshots").symlink_to(outside, target_is_directory=True)
    code, out, err = _run(capsys, "cache", "gc")
    assert code == 0 and "symlink" in _one_line(err) and "0 leftover files" in out
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS


def test_ingest_and_chat_never_write_through_a_symlinked_folder(model, doc, outside):
    first = _ingest(model, doc)
    assert first.returncode == 0, first.stderr
    snapshot = Path(json.loads(first.stdout)[0]["snapshot"])
    with ConversationStore() as store:
        (entry,) = store.snapshots.list()
        store.snapshots.remove(entry.id)
    shutil.rmtree(snapshot.parent)
    snapshot.parent.symlink_to(outside, target_is_directory=True)
    target = outside / snapshot.name  # where a write through the link would land
    target.write_bytes(PRECIOUS)

    _ends_in_one_sentence(_ingest(model, doc), "outside the data dir")
    chat = run_cli(*_chat_argv(model, "--doc", str(doc), "-p", "Hi."))
    assert chat.returncode == 0, chat.stderr
    assert "the snapshot was not saved" in chat.stderr and "Traceback" not in chat.stderr
    assert target.read_bytes() == PRECIOUS and (outside / "precious.ectx").read_bytes() == PRECIOUS
    assert sorted(p.name for p in outside.iterdir()) == sorted(["precious.ectx", snapshot.name])  # no temp file either
    with ConversationStore() as store:
        (conversation,) = store.list_conversations()
        assert [m.role for m in store.messages(conversation.id)] == ["user", "assistant"]


def test_ingest_replaces_a_symlinked_snapshot_file_not_its_target(model, doc, outside):
    first = _ingest(model, doc)
    snapshot = Path(json.loads(first.stdout)[0]["snapshot"])
    with ConversationStore() as store:
        store.snapshots.remove(store.snapshots.list()[0].id)
    snapshot.symlink_to(outside / "precious.ectx")
    again = _ingest(model, doc)
    assert again.returncode == 0, again.stderr
    assert (outside / "precious.ectx").read_bytes() == PRECIOUS
    assert snapshot.is_file() and not snapshot.is_symlink()


# -- 2. damaged values read as absent -----------------------------------------------------------------------


@pytest.fixture
def damaged() -> int:
    """A conversation with a document and a snapshot whose every field was then damaged with sqlite3 directly."""
    with ConversationStore() as store:
        chat = store.create_conversation("Birds", model_name="smollm2", settings={"temperature": 0.2})
        store.add_message(chat.id, "user", "Why do penguins not fly?", n_tokens=7, timings={"prefill_s": 0.1})
        store.add_message(chat.id, "assistant", "Flippers.", n_tokens=2, timings={"tokens_per_s": 9.5})
        store.add_message(chat.id, "assistant", "And weight.", n_tokens=2)
        doc = store.documents.add("birds.md", b"penguins", "penguins", tokenizer="tk", token_offsets=[0, 4])
        store.documents.attach(chat.id, doc.id)
    for statement, params in [
        ("UPDATE conversations SET settings_json = 'garbage', model_name = ?, created_at = 'yesterday', "
         "updated_at = 1e300, system_prompt = ?", (b"\x00\xff", b"\xffbe brief")),
        ("UPDATE messages SET timings_json = '{not json', n_tokens = 'many', created_at = 'now' WHERE position = 0", ()),
        ("UPDATE messages SET timings_json = '[1, 2]', content = ? WHERE position = 1", (b"Flip\xffpers.",)),
        ("UPDATE messages SET timings_json = ? WHERE position = 2", ("[" * 100_000,)),  # nested too deep to parse
        ("UPDATE documents SET size_bytes = 'big', n_tokens = 'x', sha256 = ?, path = ?, token_char_offsets = 'text'",
         (b"\x01\x02", b"birds\xff.md")),
        ("INSERT INTO snapshots (file, model_fingerprint, codec, n_tokens, chain_hash, size_bytes, document_id, "
         "created_at, last_used_at) VALUES (?, 'fp', 'int4', 'lots', 'ab', 'huge', 999, 'then', 'never')", (b"snap\x00",)),
    ]:
        _sql(statement, params)
    return chat.id


@pytest.mark.parametrize("argv", [("history",), ("history", "--json"), ("history", "--search", "penguins", "--json"),
                                  ("export", "{id}"), ("export", "{id}", "--format", "json"), ("cache", "ls"),
                                  ("cache", "ls", "--json"), ("cache", "gc")], ids=" ".join)
def test_commands_read_damaged_rows_without_a_traceback(capsys, damaged, argv):
    code, out, err = _run(capsys, *(arg.format(id=damaged) for arg in argv))
    assert code == 0 and "Traceback" not in err
    if argv == ("export", "{id}", "--format", "json"):
        data = json.loads(out)
        assert data["settings"] == {} and [m["timings"] for m in data["messages"]] == [{}, {}, {}]
        assert data["created"] == "1970-01-01T00:00:00Z" and data["messages"][0]["n_tokens"] is None
        assert data["documents"][0]["size_bytes"] == 0 and data["documents"][0]["n_tokens"] is None
    if argv == ("history", "--search", "penguins", "--json"):
        assert [e["id"] for e in json.loads(out)] == [damaged]


def test_the_api_reads_damaged_rows_as_absent(store, damaged):
    conversation = store.get_conversation(damaged)
    assert conversation.settings == {} and conversation.model_name == "\x00\ufffd" and conversation.created_at == 0.0
    assert [m.timings for m in store.messages(damaged)] == [{}, {}, {}]
    assert store.messages(damaged)[1].content == "Flip\ufffdpers."
    (document,) = store.documents.attached(damaged)
    assert (document.size_bytes, document.n_tokens, document.path) == (0, None, "birds\ufffd.md")
    assert store.documents.token_offsets(document.id) is None
    (snapshot,) = store.snapshots.list()
    assert (snapshot.n_tokens, snapshot.size_bytes, snapshot.last_used_at) == (0, 0, 0.0)
    assert not store.snapshots.present(snapshot) and store.snapshots.total_bytes() == 0


TYPES = {"int": (int,), "str": (str,), "float": (float,), "dict": (dict,), "int | None": (int, type(None)),
         "str | None": (str, type(None))}


@pytest.mark.parametrize("kind", [StoredConversation, Message, StoredDocument, SnapshotEntry])
@pytest.mark.parametrize("value", [None, "garbage", b"\xff", 1e300, -5, float("nan")])
def test_every_field_has_its_type_whatever_the_column_holds(kind, value):
    """Columns a hand edit (or another schema) left NULL, or holding what no edgectx writes."""
    fields = kind.__dataclass_fields__
    row = {name: value for name in [*fields, "settings_json", "timings_json"]}
    read = kind.from_row(row)
    for name, field in fields.items():
        assert isinstance(getattr(read, name), TYPES[field.type]), (name, getattr(read, name))


# -- 3. a full disk is named as such -------------------------------------------------------------------------


def _sqlite_error(message: str, name: str) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name
    return error


class _FullDisk(sqlite3.Connection):
    """SQLite on a full disk: a read that must grow the -shm file fails, and SQLite ends the transaction it had begun."""

    error = ("database or disk is full", "SQLITE_FULL")

    def execute(self, sql, *args):
        if self.in_transaction and not sql.startswith(("COMMIT", "ROLLBACK")):
            super().execute("ROLLBACK")
            raise _sqlite_error(*self.error)
        return super().execute(sql, *args)


@pytest.mark.parametrize("error", [("database or disk is full", "SQLITE_FULL"), ("disk I/O error", "SQLITE_IOERR_SHMSIZE")])
def test_opening_an_existing_database_on_a_full_disk_says_the_disk_is_full(capsys, monkeypatch, error):
    with ConversationStore() as store:
        store.create_conversation("Birds")
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real(*a, factory=type("Full", (_FullDisk,), {"error": error}), **k))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: collections.namedtuple("Usage", "total used free")(10**9, 10**9, 0))
    code, out, err = _run(capsys, "history")
    assert code != 0 and out == ""
    assert "is full" in _one_line(err) and "no transaction" not in err


def test_a_write_that_fills_the_database_says_the_disk_is_full(store):
    chat = store.create_conversation("Birds")
    pages = store._db.conn.execute("PRAGMA page_count").fetchone()[0]
    store._db.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL at the next page, as on a full disk
    with pytest.raises(StoreError, match="is full: free some space"):
        store.add_message(chat.id, "user", "word " * 100_000)
    assert store.messages(chat.id) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs as the data dir (root may mount one; elsewhere the test is skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and the right to mount")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_really_full_disk_says_the_disk_is_full(small_disk, monkeypatch):
    monkeypatch.setenv("EDGECTX_HOME", str(small_disk))
    with ConversationStore() as store:
        store.add_message(store.create_conversation("Birds").id, "user", "Why do penguins not fly?")
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb", buffering=0) as filler:
        while True:  # to the disk's last byte
            filler.write(b"\x00" * 4096)
    for argv in (("history",), ("export", "1")):
        assert_one_sentence(run_cli(*argv), "is full")


# -- 4. a snapshot that cannot be saved is only a warning ---------------------------------------------------


def test_chat_answers_when_the_snapshot_cannot_be_written(model, doc):
    _home().mkdir(parents=True, exist_ok=True)
    (_home() / "snapshots").write_bytes(b"a file where the snapshot folder goes")  # every snapshot write fails
    chat = run_cli(*_chat_argv(model, "--doc", str(doc), "-p", "Hi."))
    assert chat.returncode == 0, chat.stderr
    assert "the snapshot was not saved" in chat.stderr and "Traceback" not in chat.stderr
    with ConversationStore() as store:
        (conversation,) = store.list_conversations()
        assert [m.role for m in store.messages(conversation.id)] == ["user", "assistant"]
        assert store.snapshots.list() == []
    _ends_in_one_sentence(_ingest(model, doc), "Cannot write the snapshot")  # for ingest the snapshot is the product


@pytest.mark.parametrize("fails", ["file", "manifest"])
def test_a_full_disk_while_saving_a_snapshot_is_a_warning(capsys, monkeypatch, model, doc, fails):
    if fails == "file":
        def snapshot(self, path, codec="int4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(Engine, "snapshot", snapshot)
    else:
        def add(self, file, **kwargs):
            raise StoreError(f"The disk holding {self.root} is full: free some space and try again.")
        monkeypatch.setattr(SnapshotManifest, "add", add)
    code, _, err = _run(capsys, *_chat_argv(model, "--doc", str(doc), "-p", "Hi."))
    assert code == 0, err
    assert "the snapshot was not saved" in err and "full" in err and "Traceback" not in err
    assert "saved for next time" not in err
    with ConversationStore() as store:
        assert len(store.messages(store.list_conversations()[0].id)) == 2
    snapshots = _home() / "snapshots"
    assert not snapshots.exists() or not [p for p in snapshots.rglob("*") if p.is_file()]  # no unlisted file left


# -- 5. a read-only data dir ----------------------------------------------------------------------------------


class _ReadOnlyFolder(sqlite3.Connection):
    """SQLite in a folder it cannot write, with no -wal or -shm file to open: every statement is refused."""

    def execute(self, *args, **kwargs):
        raise _sqlite_error("attempt to write a readonly database", "SQLITE_READONLY_DIRECTORY")


def _make_read_only(monkeypatch, mode: str) -> None:
    """From now on the database opens only as `mode` would (mode=ro: -wal and -shm exist; immutable=1: they cannot)."""
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        opens = mode in str(database) if kwargs.get("uri") else False
        return real(database, *args, **kwargs) if opens else real(database, *args, factory=_ReadOnlyFolder, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)


def _fail_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture(params=["mode=ro", "immutable=1"])
def read_only(request, monkeypatch) -> tuple[int, int]:
    """(conversation id, snapshot id) in a data dir that has then become read-only."""
    with ConversationStore() as store:
        chat = store.create_conversation("Birds")
        store.add_message(chat.id, "user", "Why do penguins not fly?")
        snap = store.snapshots.add("snapshots/a.ectx", model_fingerprint="fp", codec="int4", n_tokens=10, chain_hash="ab",
                                   size_bytes=100)
    _make_read_only(monkeypatch, request.param)
    return chat.id, snap.id


def test_listing_and_exporting_work_on_a_read_only_database(capsys, read_only):
    chat_id, snapshot_id = read_only
    code, out, err = _run(capsys, "history", "--json")
    assert (code, [e["title"] for e in json.loads(out)]) == (0, ["Birds"]), err
    code, out, _ = _run(capsys, "export", str(chat_id), "--format", "json")
    assert code == 0 and json.loads(out)["messages"][0]["content"] == "Why do penguins not fly?"
    code, out, _ = _run(capsys, "export", str(chat_id))
    assert code == 0 and out.startswith("# Birds")
    code, out, _ = _run(capsys, "cache", "ls", "--json")
    assert code == 0 and [e["id"] for e in json.loads(out)] == [snapshot_id]
    with ConversationStore() as store:
        assert store.read_only


def test_writes_to_a_read_only_database_are_one_sentence(capsys, read_only):
    _, snapshot_id = read_only
    for argv in (("cache", "rm", str(snapshot_id)), ("cache", "gc", "--max-bytes", "0")):
        code, _, err = _run(capsys, *argv)
        assert code != 0 and "read-only" in _one_line(err)


def test_chat_no_history_answers_on_a_read_only_database(capsys, monkeypatch, read_only, model, doc):
    code, out, err = _run(capsys, *_chat_argv(model, "--no-history", "--doc", str(doc), "-p", "Hi."))
    assert code == 0 and "Traceback" not in err and out.endswith("\n")
    assert "read-only" in err and "not saved" in err
    monkeypatch.setattr("edgectx.cli.chat.load_engine", _fail_to_load)
    code, _, err = _run(capsys, *_chat_argv(model, "-p", "Hi."))  # its messages could not be saved: said at once
    assert code != 0 and "read-only" in _one_line(err) and "--no-history" in err


def test_a_read_only_data_dir_still_restores_snapshots(capsys, monkeypatch, model, doc):
    ingested = _ingest(model, doc)
    assert ingested.returncode == 0, ingested.stderr
    _make_read_only(monkeypatch, "mode=ro")
    code, _, err = _run(capsys, *_chat_argv(model, "--no-history", "--doc", str(doc), "-p", "Hi."))
    assert code == 0 and "restored" in err and "Traceback" not in err


def test_ingest_on_a_read_only_database_fails_before_loading_the_model(capsys, monkeypatch, read_only, doc):
    monkeypatch.setattr("edgectx.cli.options.load_engine", _fail_to_load)
    code, _, err = _run(capsys, "ingest", str(doc))
    assert code != 0 and "read-only" in _one_line(err)


def test_ingest_fails_on_a_damaged_database_before_loading_the_model(capsys, monkeypatch, doc):
    _home().mkdir(parents=True)
    (_home() / "edgectx.db").write_bytes(b"\x00garbage" * 1000)
    monkeypatch.setattr("edgectx.cli.options.load_engine", _fail_to_load)
    code, _, err = _run(capsys, "ingest", str(doc))
    assert code != 0 and "not an edgectx database" in _one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a chmod 555 folder anyway; the simulated tests above cover it")
def test_a_chmod_555_data_dir_lists_and_exports():
    with ConversationStore() as store:
        store.add_message(store.create_conversation("Birds").id, "user", "Why do penguins not fly?")
    _home().chmod(0o555)
    try:
        history = run_cli("history", "--json")
        assert history.returncode == 0 and [e["title"] for e in json.loads(history.stdout)] == ["Birds"], history.stderr
        assert run_cli("export", "1").stdout.startswith("# Birds")
        assert_one_sentence(run_cli("chat", "-p", "Hi."), "read-only", "--no-history")
    finally:
        _home().chmod(0o755)
