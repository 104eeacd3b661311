"""The conversation store shared by processes: concurrent writers, and a writer killed mid-stream."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3

import store_workers
from edgectx.store.conversations import ConversationStore


def _integrity_ok(path) -> bool:
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")  # raises if out of step
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_two_processes_append_to_one_conversation_at_once(tmp_path):
    path = tmp_path / "edgectx.db"
    with ConversationStore(path) as store:
        chat = store.create_conversation("shared")
    ctx = multiprocessing.get_context("spawn")
    barrier, spans = ctx.Barrier(2), ctx.Queue()
    writers = [ctx.Process(target=store_workers.append_messages, args=(str(path), chat.id, name, 200, barrier, spans))
               for name in "ab"]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
    assert [p.exitcode for p in writers] == [0, 0]
    (_, start_1, end_1), (_, start_2, end_2) = spans.get(timeout=5), spans.get(timeout=5)
    assert start_1 < end_2 and start_2 < end_1  # the writers really overlapped: one had to wait for the other's lock
    with ConversationStore(path) as store:
        messages = store.messages(chat.id)
    assert [m.position for m in messages] == list(range(400))  # no position taken twice, none skipped
    assert sorted(m.content for m in messages) == sorted(f"{w} {i}" for w in "ab" for i in range(200))
    for writer in "ab":  # each writer's own messages stay in the order it wrote them
        assert [m.content for m in messages if m.content.startswith(writer)] == [f"{writer} {i}" for i in range(200)]
    assert _integrity_ok(path)


def test_sigkill_mid_stream_keeps_every_committed_message(tmp_path):
    path = tmp_path / "edgectx.db"
    with ConversationStore(path) as store:
        chat = store.create_conversation("crash")
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=store_workers.append_until_killed, args=(str(path), chat.id, send))
    child.start()
    send.close()
    reported = [receive.recv() for _ in range(40)]
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    while True:  # commits reported before the kill are still in the pipe
        try:
            reported.append(receive.recv())
        except EOFError:
            break
    assert child.exitcode == -signal.SIGKILL
    assert reported == list(range(len(reported)))
    with ConversationStore(path) as store:
        messages = store.messages(chat.id)
        assert store.search(f"k{reported[-1]:05d}")[0].conversation.id == chat.id
    assert len(messages) >= len(reported)  # at most one commit landed that the child had no time to report
    assert len(messages) <= len(reported) + 1
    for i, message in enumerate(messages):  # every row whole: no half-written message
        assert (message.position, message.content, message.n_tokens) == (i, store_workers.payload("k", i), i)
    assert _integrity_ok(path)
