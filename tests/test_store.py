"""ConversationStore: round trips, ordering, cascades, full-text search, documents, snapshots, export, migrations."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading

import pytest

import edgectx.store.db as store_db
from edgectx.config import data_dir
from edgectx.errors import StoreError
from edgectx.store.conversations import ConversationStore, fts_query
from edgectx.store.export import conversation_dict, export_json, export_markdown


@pytest.fixture
def store(tmp_path):
    with ConversationStore(tmp_path / "edgectx.db") as s:
        yield s


def _integrity(path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for fts in ("messages_fts", "conversations_fts"):  # the search index agrees with its table
            conn.execute(f"INSERT INTO {fts} ({fts}) VALUES ('integrity-check')")
    finally:
        conn.close()


# Conversations and messages


def test_default_path_is_the_data_dir_in_wal_mode():
    with ConversationStore() as store:
        assert store.path == data_dir() / "edgectx.db"
        assert store.path.exists()
    conn = sqlite3.connect(data_dir() / "edgectx.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store_db.MIGRATIONS)
    conn.close()


def test_conversation_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "edgectx.db"
    with ConversationStore(path) as store:
        made = store.create_conversation("Report", model_name="qwen", model_fingerprint="ab" * 32,
                                         system_prompt="Be brief.", settings={"temperature": 0.2, "budget": 2048})
    with ConversationStore(path) as store:
        got = store.get_conversation(made.id)
    assert got == made
    assert (got.title, got.model_name, got.system_prompt, got.settings) == ("Report", "qwen", "Be brief.", {"temperature": 0.2, "budget": 2048})
    assert got.n_messages == 0 and got.created_at == got.updated_at


def test_messages_round_trip_in_order(store):
    chat = store.create_conversation("c")
    store.add_message(chat.id, "system", "You help.")
    store.add_message(chat.id, "user", "Hi é ✓", n_tokens=5)
    added = store.add_message(chat.id, "assistant", "Hello.", n_tokens=3, timings={"prefill_s": 0.5, "decode_s": 1.5, "tokens_per_s": 2.0})
    messages = store.messages(chat.id)
    assert [(m.position, m.role, m.content) for m in messages] == [(0, "system", "You help."), (1, "user", "Hi é ✓"), (2, "assistant", "Hello.")]
    assert messages[2] == added
    assert messages[2].timings == {"prefill_s": 0.5, "decode_s": 1.5, "tokens_per_s": 2.0} and messages[1].n_tokens == 5
    assert store.get_conversation(chat.id).n_messages == 3
    with pytest.raises(ValueError):
        store.add_message(chat.id, "robot", "no")


def test_list_is_most_recently_updated_first(store):
    first = store.create_conversation("first")
    second = store.create_conversation("second")
    third = store.create_conversation("third")
    assert [c.title for c in store.list_conversations()] == ["third", "second", "first"]
    store.add_message(first.id, "user", "bump")
    store.rename_conversation(second.id, "second, renamed")
    assert [c.id for c in store.list_conversations()] == [second.id, first.id, third.id]
    assert [c.title for c in store.list_conversations(limit=1)] == ["second, renamed"]


def test_update_and_delete_last_messages(store):
    chat = store.create_conversation("c")
    ids = [store.add_message(chat.id, role, text).id for role, text in [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]]
    edited = store.update_message(ids[2], "q2, edited", n_tokens=4)
    assert (edited.content, edited.position, edited.n_tokens) == ("q2, edited", 2, 4)
    assert store.delete_last(chat.id) == 1  # resend after the edit: drop the old answer
    store.add_message(chat.id, "assistant", "a2, new")
    assert [m.content for m in store.messages(chat.id)] == ["q1", "a1", "q2, edited", "a2, new"]
    assert store.delete_last(chat.id, 3) == 3
    assert [m.content for m in store.messages(chat.id)] == ["q1"]
    assert store.add_message(chat.id, "assistant", "again").position == 1  # positions stay dense after deletes
    assert store.delete_last(chat.id, 10) == 2 and store.messages(chat.id) == []


def test_unknown_ids_are_store_errors_with_a_sentence(store):
    for call in (lambda: store.get_conversation(42), lambda: store.add_message(42, "user", "x"),
                 lambda: store.rename_conversation(42, "t"), lambda: store.delete_conversation(42),
                 lambda: store.update_message(42, "x"), lambda: store.documents.get(42), lambda: store.snapshots.remove(42)):
        with pytest.raises(StoreError, match="42"):
            call()


def test_delete_cascades_to_messages_and_links_but_keeps_shared_documents(store):
    doomed, kept = store.create_conversation("doomed"), store.create_conversation("kept")
    store.add_message(doomed.id, "user", "platypus questions")
    store.add_message(kept.id, "user", "other words")
    doc = store.documents.add("book.txt", b"shared text", "shared text")
    store.documents.attach(doomed.id, doc.id)
    store.documents.attach(kept.id, doc.id)
    snap = store.snapshots.add("snapshots/a.ectx", model_fingerprint="f", codec="int8", n_tokens=10, chain_hash="aa",
                               size_bytes=5, conversation_id=doomed.id)
    store.delete_conversation(doomed.id)
    with pytest.raises(StoreError):
        store.get_conversation(doomed.id)
    assert store.messages(doomed.id) == [] and store.documents.attached(doomed.id) == []
    assert store.documents.get(doc.id) == doc and store.documents.attached(kept.id) == [doc]
    assert store.snapshots.get(snap.id).conversation_id is None  # unlinked, left for the LRU to reclaim
    assert store.search("platypus") == []
    _integrity(store.path)


def test_threads_share_one_store(store):
    """The TUI's worker threads write through one store; the lock keeps each transaction whole."""
    chat = store.create_conversation("threads")

    def append(name):
        for i in range(25):
            store.add_message(chat.id, "user", f"{name} {i}")

    threads = [threading.Thread(target=append, args=(name,)) for name in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = store.messages(chat.id)
    assert [m.position for m in messages] == list(range(75))
    assert sorted(m.content for m in messages) == sorted(f"{n} {i}" for n in "xyz" for i in range(25))


# Search


def test_search_finds_words_in_messages_and_titles(store):
    a = store.create_conversation("Platypus anatomy")
    b = store.create_conversation("Tax forms")
    store.add_message(a.id, "user", "Tell me about monotremes.")
    store.add_message(b.id, "user", "Which deductions apply to home offices?")
    store.add_message(b.id, "assistant", "Deductions for a home office require exclusive use.")
    hits = store.search("deduction office")  # stemmed, every word required
    assert [h.conversation.id for h in hits] == [b.id]
    assert "**" in hits[0].snippet and hits[0].message_id is not None
    title_hit = store.search("platypus")
    assert [h.conversation.id for h in title_hit] == [a.id] and title_hit[0].message_id is None
    assert title_hit[0].snippet == "**Platypus** anatomy"
    assert [h.conversation.id for h in store.search("monotr*")] == [a.id]
    assert store.search("echidna") == [] and store.search("deduction echidna") == []


def test_search_follows_edits_and_renames(store):
    chat = store.create_conversation("old title")
    message = store.add_message(chat.id, "user", "alpha")
    store.update_message(message.id, "beta")
    store.rename_conversation(chat.id, "new heading")
    assert store.search("alpha") == [] and store.search("old") == []
    assert [h.conversation.id for h in store.search("beta")] == [chat.id]
    assert [h.conversation.id for h in store.search("heading")] == [chat.id]
    _integrity(store.path)


@pytest.mark.parametrize("query", ['"', 'AND OR', '*', 'NEAR(', 'a"b', '(', 'NOT x', 'col:x', '^', '-', '""', '   ', "x OR"])
def test_hostile_queries_never_crash(store, query):
    chat = store.create_conversation("c")
    store.add_message(chat.id, "user", "plain words here")
    assert store.search(query) == []


def test_operator_words_are_searched_as_plain_words(store):
    chat = store.create_conversation("c")
    store.add_message(chat.id, "user", "rock AND roll, near the sea")
    assert [h.conversation.id for h in store.search("and near")] == [chat.id]
    assert fts_query('say "hi" NEAR(') == '"say" """hi""" "NEAR("'
    assert fts_query("* ( ^") is None


# Documents


def test_documents_dedupe_by_content_and_tokenizer(store):
    text = "Hello wide world"
    data = text.encode()
    doc = store.documents.add("/a/notes.txt", data, text, tokenizer="model-1", token_offsets=[0, 5, 10])
    again = store.documents.add("/b/copy.txt", data, text, tokenizer="model-1", token_offsets=[0, 5, 10])
    other = store.documents.add("/a/notes.txt", data, text, tokenizer="model-2", token_offsets=[0, 6])
    assert again == doc and other.id != doc.id
    assert (doc.size_bytes, doc.n_chars, doc.n_tokens, doc.path) == (len(data), len(text), 3, "/a/notes.txt")
    assert store.documents.find(doc.sha256, "model-1") == doc
    assert store.documents.for_path("/a/notes.txt") == other  # newest first
    assert store.documents.for_path("/a/notes.txt", tokenizer="model-1") == doc
    assert store.documents.for_path("/nowhere") is None


def test_token_offsets_map_token_ranges_to_character_spans(store):
    text = "café au lait"
    starts = [0, 4, 7, 10]  # "café", " au", " la", "it"
    doc = store.documents.add("menu.txt", text.encode(), text, tokenizer="t", token_offsets=starts)
    offsets = store.documents.token_offsets(doc.id)
    assert offsets.starts.tolist() == starts
    start, end = offsets.char_span(1, 3)
    assert text[start:end] == " au la"
    assert text[slice(*offsets.char_span(3, 4))] == "it" and offsets.char_span(0, 4) == (0, len(text))
    with pytest.raises(IndexError):
        offsets.char_span(2, 5)
    raw = sqlite3.connect(store.path).execute("SELECT token_char_offsets FROM documents WHERE id = ?", (doc.id,)).fetchone()[0]
    assert raw == b"".join(s.to_bytes(4, "little") for s in starts)  # the documented compact form
    with pytest.raises(ValueError):
        store.documents.add("bad.txt", b"xy", "xy", tokenizer="t", token_offsets=[1, 0])


def test_offsets_arrive_later_for_an_untokenized_document(store):
    doc = store.documents.add("a.txt", b"abc", "abc", tokenizer="t")
    assert doc.n_tokens is None and store.documents.token_offsets(doc.id) is None
    filled = store.documents.add("a.txt", b"abc", "abc", tokenizer="t", token_offsets=[0, 2])
    assert filled.id == doc.id and filled.n_tokens == 2
    assert store.documents.token_offsets(doc.id).char_span(1, 2) == (2, 3)


def test_attach_keeps_order_and_is_idempotent(store):
    chat = store.create_conversation("c")
    docs = [store.documents.add(f"{name}.txt", name.encode(), name) for name in ("b", "a", "c")]
    assert [store.documents.attach(chat.id, d.id) for d in docs] == [0, 1, 2]
    assert store.documents.attach(chat.id, docs[0].id) == 0
    assert [d.path for d in store.documents.attached(chat.id)] == ["b.txt", "a.txt", "c.txt"]
    assert store.documents.detach(chat.id, docs[1].id) and not store.documents.detach(chat.id, docs[1].id)
    assert [d.path for d in store.documents.attached(chat.id)] == ["b.txt", "c.txt"]
    with pytest.raises(StoreError):
        store.documents.attach(999, docs[0].id)


# Snapshots


def _snapshot(store, name, chain_hash="ab", n_tokens=100, size_bytes=1000, **kw):
    return store.snapshots.add(f"snapshots/{name}.ectx", model_fingerprint=kw.pop("fp", "fp1"), codec=kw.pop("codec", "int8"),
                               n_tokens=n_tokens, chain_hash=chain_hash, size_bytes=size_bytes, **kw)


def test_snapshot_manifest_round_trip_and_lookup(store):
    chat = store.create_conversation("c")
    doc = store.documents.add("d.txt", b"d", "d")
    snap = _snapshot(store, "one", chain_hash="DEADbeef", document_id=doc.id, conversation_id=chat.id)
    assert store.snapshots.get(snap.id) == snap and snap.chain_hash == "deadbeef"
    assert (snap.file, snap.document_id, snap.conversation_id, snap.codec) == ("snapshots/one.ectx", doc.id, chat.id, "int8")
    assert store.snapshots.find("fp1", "deadbeef") == snap
    assert store.snapshots.find("fp1", "deadbeef", codec="int4") is None
    assert store.snapshots.find("fp2", "deadbeef") is None and store.snapshots.find("fp1", "beef") is None
    assert store.snapshots.path_of(snap) == store.path.parent / "snapshots" / "one.ectx"
    with pytest.raises(ValueError):
        _snapshot(store, "../../etc/passwd")
    with pytest.raises(ValueError):
        _snapshot(store, "x", chain_hash="not hex")


def test_find_longest_prefers_the_longest_stored_prefix(store):
    chain = [f"{i:04x}" for i in range(1200)]  # more links than one SQL statement takes
    _snapshot(store, "short", chain_hash=chain[10], n_tokens=11 * 128)
    long = _snapshot(store, "long", chain_hash=chain[1100], n_tokens=1101 * 128)
    _snapshot(store, "other-model", chain_hash=chain[1150], n_tokens=1151 * 128, fp="fp2")
    assert store.snapshots.find_longest("fp1", chain) == long
    assert store.snapshots.find_longest("fp1", chain[:1000]).file == "snapshots/short.ectx"
    assert store.snapshots.find_longest("fp1", ["ffff"]) is None


def test_rewriting_a_snapshot_file_replaces_its_entry(store):
    first = _snapshot(store, "same", n_tokens=10)
    second = _snapshot(store, "same", n_tokens=20, size_bytes=2000)
    assert second.id == first.id and [s.n_tokens for s in store.snapshots.list()] == [20]
    assert store.snapshots.total_bytes() == 2000


def test_lru_gc_removes_least_recently_used_entries_and_files(store):
    root = store.path.parent
    snaps = []
    for i, name in enumerate("abcd"):
        (root / "snapshots").mkdir(exist_ok=True)
        (root / "snapshots" / f"{name}.ectx").write_bytes(b"x" * 100)
        snaps.append(_snapshot(store, name, chain_hash=f"{i:02x}", size_bytes=100))
        store.snapshots.touch(snaps[-1].id, when=1000.0 + i)
    store.snapshots.touch(snaps[0].id, when=2000.0)  # 'a' used last: now b is the oldest
    assert [s.file for s in store.snapshots.list()] == [f"snapshots/{n}.ectx" for n in "adcb"]
    assert store.snapshots.total_bytes() == 400
    plan = store.snapshots.plan_gc(250)
    assert [s.file for s in plan] == ["snapshots/b.ectx", "snapshots/c.ectx"]
    assert store.snapshots.total_bytes() == 400 and (root / "snapshots" / "b.ectx").exists()  # a plan changes nothing
    removed = store.snapshots.gc(250)
    assert removed == plan and store.snapshots.total_bytes() == 200
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == ["a.ectx", "d.ectx"]
    assert store.snapshots.gc(1000) == []
    assert store.snapshots.remove(snaps[3].id).file == "snapshots/d.ectx" and not (root / "snapshots" / "d.ectx").exists()
    with pytest.raises(StoreError):
        store.snapshots.touch(snaps[3].id)


# Export


def _sample(store):
    chat = store.create_conversation("Reading *the* report", model_name="qwen2.5", model_fingerprint="c0ffee" * 10 + "abcd",
                                     system_prompt="Answer briefly.", settings={"temperature": 0.0})
    doc = store.documents.add("/docs/report.txt", b"report body", "report body", tokenizer="tok", token_offsets=[0, 6])
    store.documents.attach(chat.id, doc.id)
    store.add_message(chat.id, "user", "What does it say?", n_tokens=6)
    store.add_message(chat.id, "assistant", "It says:\n\n- one\n- two", n_tokens=9, timings={"tokens_per_s": 21.5, "prefill_s": 0.4})
    return chat, doc


def test_export_json_is_the_documented_format(store):
    chat, doc = _sample(store)
    data = json.loads(export_json(store, chat.id))
    assert data == conversation_dict(store, chat.id)
    assert (data["format"], data["version"], data["id"], data["title"]) == ("edgectx-conversation", 1, chat.id, "Reading *the* report")
    assert data["model"] == {"name": "qwen2.5", "fingerprint": chat.model_fingerprint}
    assert data["system_prompt"] == "Answer briefly." and data["settings"] == {"temperature": 0.0}
    assert data["documents"] == [{"path": "/docs/report.txt", "sha256": doc.sha256, "size_bytes": 11, "n_chars": 11,
                                  "n_tokens": 2, "tokenizer": "tok"}]
    assert [(m["position"], m["role"], m["content"], m["n_tokens"]) for m in data["messages"]] == [
        (0, "user", "What does it say?", 6), (1, "assistant", "It says:\n\n- one\n- two", 9)]
    assert data["messages"][1]["timings"] == {"tokens_per_s": 21.5, "prefill_s": 0.4}
    assert data["created"].endswith("Z") and len(data["created"]) == len("2025-01-31T14:05:09Z")


def test_export_markdown_has_title_metadata_documents_and_role_headings(store):
    chat, _ = _sample(store)
    text = export_markdown(store, chat.id)
    lines = text.splitlines()
    assert lines[0] == "# Reading *the* report"
    assert f"- Conversation: {chat.id}" in lines and "- Model: qwen2.5 (fingerprint c0ffeec0ffeec0ff)" in lines
    assert "## Documents" in lines and "1. `/docs/report.txt` (11 bytes, 2 tokens, sha256 " + _sample_sha() + ")" in lines
    assert lines.index("## System prompt") < lines.index("## User") < lines.index("## Assistant")
    assert "It says:\n\n- one\n- two" in text and "*9 tokens · 21.5 tokens/s*" in lines
    with pytest.raises(StoreError, match="No conversation with id 999"):
        export_markdown(store, 999)


def _sample_sha() -> str:
    return hashlib.sha256(b"report body").hexdigest()[:12]


# Opening, versions, migrations


def test_a_version_0_file_is_migrated(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")  # an empty file is a SQLite database at user_version 0
    with ConversationStore(path) as store:
        chat = store.create_conversation("works")
        store.add_message(chat.id, "user", "searchable")
        assert [h.conversation.id for h in store.search("searchable")] == [chat.id]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store_db.MIGRATIONS)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store_db.APPLICATION_ID
    conn.close()


def test_connections_racing_to_create_a_new_database_all_succeed(tmp_path):
    path = tmp_path / "new" / "edgectx.db"
    barrier, errors = threading.Barrier(4), []

    def open_and_write(i):
        barrier.wait()
        try:
            with ConversationStore(path) as store:  # each its own connection, as separate processes would have
                store.create_conversation(f"racer {i}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with ConversationStore(path) as store:
        assert sorted(c.title for c in store.list_conversations()) == [f"racer {i}" for i in range(4)]
    _integrity(path)


def test_an_older_schema_is_upgraded_in_place(tmp_path, monkeypatch):
    path = tmp_path / "edgectx.db"
    with ConversationStore(path) as store:
        chat = store.create_conversation("kept")
        store.add_message(chat.id, "user", "remember the walrus")
    current = len(store_db.MIGRATIONS)

    def add_pinned(conn):
        conn.execute("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE conversations SET pinned = 1 WHERE title = 'kept'")

    monkeypatch.setattr(store_db, "MIGRATIONS", store_db.MIGRATIONS + (add_pinned,))
    with ConversationStore(path) as store:
        assert [m.content for m in store.messages(chat.id)] == ["remember the walrus"]
        assert [h.conversation.id for h in store.search("walrus")] == [chat.id]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert conn.execute("SELECT pinned FROM conversations").fetchall() == [(1,)]
    conn.close()


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "edgectx.db"
    ConversationStore(path).close()
    current = len(store_db.MIGRATIONS)

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(store_db, "MIGRATIONS", store_db.MIGRATIONS + (broken,))
    with pytest.raises(StoreError):
        ConversationStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.close()


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "edgectx.db"
    ConversationStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer edgectx.*schema version 99"):
        ConversationStore(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [os.urandom(8192), b"just some notes, not a database\n" * 10])
def test_a_file_that_is_not_sqlite_is_refused(tmp_path, content):
    path = tmp_path / "edgectx.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not an edgectx database"):
        ConversationStore(path)
    assert path.read_bytes() == content  # left untouched


@pytest.mark.parametrize("setup", [
    ["CREATE TABLE accounts (id INTEGER)"],  # someone's data
    ["CREATE TABLE conversations (id INTEGER)", "PRAGMA user_version = 1"],  # looks like ours, never marked as ours
    ["PRAGMA application_id = 1234"],  # marked as another program's, even while empty
])
def test_another_programs_database_is_refused(tmp_path, setup):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    for statement in setup:
        conn.execute(statement)
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another program"):
        ConversationStore(path)
    assert path.read_bytes() == before


def test_a_folder_in_place_of_the_file_is_refused(tmp_path):
    (tmp_path / "edgectx.db").mkdir()
    with pytest.raises(StoreError, match="is a folder"):
        ConversationStore(tmp_path / "edgectx.db")
