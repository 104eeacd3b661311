"""Child-process bodies for the conversation store's concurrency and crash tests (started with `spawn`)."""

from __future__ import annotations

import time

from edgectx.store.conversations import ConversationStore


def payload(writer: str, i: int) -> str:
    """A message big enough to span several database pages, so a kill can land in the middle of writing one."""
    return f"{writer} {i} " + f"{writer}{i:05d} " * 2000


def append_messages(path: str, conversation_id: int, writer: str, count: int, barrier, spans) -> None:
    with ConversationStore(path) as store:
        barrier.wait(timeout=60)  # both writers have the file open: start together
        start = time.monotonic()
        for i in range(count):
            store.add_message(conversation_id, "user", f"{writer} {i}")
        spans.put((writer, start, time.monotonic()))


def append_until_killed(path: str, conversation_id: int, reports) -> None:
    with ConversationStore(path) as store:
        for i in range(100_000):
            message = store.add_message(conversation_id, "assistant", payload("k", i), n_tokens=i)
            reports.send(message.position)  # only after add_message returned: the commit is on disk
