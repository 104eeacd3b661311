"""Documents at the start of a conversation: the text they become, and the snapshots that make reopening fast.

A conversation about documents opens with one system turn: each document in a `<document name=...>` block,
then the system prompt. The tokens of that opening (the template's system-turn start plus the blocks) are
what `edgectx ingest` prefills once and snapshots; `chat --doc` and `chat --resume` rebuild the same tokens
(a document's tokens never depend on what follows it), find the snapshot of the longest opening prefix in
the manifest (weights fingerprint + token-chain hash) and prefill only the rest. Every missing document
boundary gets its own snapshot, so `--doc a.pdf --doc b.md` reuses a.pdf's alone next time too.

    opening = build_opening(engine, [read_document("report.pdf")])
    opened = open_documents(engine, store, opening, codec="int4", progress=bar.update)
    chat = ChatSession(engine, system="Be brief.", opening=opening)  # the memory already holds opening.ids
"""

from __future__ import annotations

import contextlib
import errno
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgectx.chat.documents import Document, token_char_offsets
from edgectx.engine import Cancel, Engine, Progress
from edgectx.errors import SnapshotError, StoreError, UsageError
from edgectx.store.conversations import ConversationStore
from edgectx.snapshot.token_chain import token_chain

DOC_SYSTEM = "Answer the user's questions from the documents above, and say where in them the answer is."
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_SUFFIX = ".ectx"
_SENTINEL = "\x00edgectx-system\x00"


def _block_header(doc: Document) -> str:
    return f'<document name="{doc.path.name}">\n'


def document_block(doc: Document) -> str:
    return f"{_block_header(doc)}{doc.text}\n</document>\n\n"


def system_content(blocks: str, system: str | None) -> str:
    """The opening system turn's content: the document blocks, then the user's system prompt (or ours)."""
    return blocks + (system or DOC_SYSTEM) if blocks else system or ""


@dataclass
class Opening:
    """The documents' part of the first system turn, as text and as the tokens the memory holds for it."""

    documents: list[Document]
    text: str  # the template's system-turn start, then every document block
    blocks: str  # the document blocks alone (the start of the system message's content)
    ids: list[int]
    ends: list[int] = field(default_factory=list)  # token count after each document: where snapshots are cut
    offsets: list[list[int]] = field(default_factory=list)  # per document: char in doc.text where each of its tokens starts


def _system_start(engine: Engine) -> str:
    rendered = engine.template.render([{"role": "system", "content": _SENTINEL}], add_generation_prompt=False)
    start, found, _ = rendered.partition(_SENTINEL)
    if not found:
        raise UsageError(f"{engine.path.name}'s chat template changes the system message, so documents cannot be "
                         "attached to its conversations: use another model.")
    return start


def build_opening(engine: Engine, documents: list[Document]) -> Opening:
    """Tokenize the documents' opening; document i adds exactly the tokens of its block after those before it."""
    tokenizer = engine.tokenizer
    start = _system_start(engine)
    opening = Opening(list(documents), start, "", [])
    for i, doc in enumerate(documents):
        block = document_block(doc)
        piece = start + block if i == 0 else block
        ids = tokenizer.encode(piece, add_bos=tokenizer.add_bos and i == 0)
        doc_start = len(piece) - len(block) + len(_block_header(doc))  # where doc.text begins inside `piece`
        opening.offsets.append([min(max(c - doc_start, 0), len(doc.text))
                                for c in token_char_offsets(tokenizer, piece, ids)])
        opening.text += block
        opening.blocks += block
        opening.ids += ids
        opening.ends.append(len(opening.ids))
    return opening


@dataclass(frozen=True)
class Opened:
    """What opening the documents cost: tokens restored from a snapshot, tokens prefilled, snapshots written."""

    n_tokens: int
    restored_tokens: int
    prefilled_tokens: int
    elapsed_s: float
    snapshots: list[tuple[Path, int]]  # (file, bytes) written now
    document_ids: list[int]
    problem: str | None  # a snapshot that could not be used, in one sentence

    @property
    def snapshot_state(self) -> str:
        """What the status bar says: "snapshot restored" when nothing had to be read, else "snapshot saved"
        ("snapshot not saved" when none could be: a full disk, a read-only data dir)."""
        if self.restored_tokens and not self.prefilled_tokens:
            return "snapshot restored"
        return "snapshot saved" if self.snapshots else "snapshot not saved"

    def summary(self, names: str) -> str:
        """What opening cost, as `chat --doc` and the TUI print it: "report.pdf: restored 98,304 tokens in 1.2 s"."""
        if self.restored_tokens:
            line = f"restored {self.restored_tokens:,} tokens in {self.elapsed_s:.1f} s"
            line += f", read {self.prefilled_tokens:,} more" if self.prefilled_tokens else ""
        else:
            line = f"read {self.n_tokens:,} tokens in {self.elapsed_s:.1f} s" + (" (saved for next time)" if self.snapshots else "")
        return f"{names}: {line}"


def snapshot_file(fingerprint: str, ids: list[int], codec: str) -> str:
    """Where the snapshot of exactly `ids` goes, relative to the data dir."""
    return f"{SNAPSHOT_DIR}/{fingerprint[:16]}/{token_chain(ids)[-1][:32]}.{codec}{SNAPSHOT_SUFFIX}"


def find_snapshot(engine: Engine, store: ConversationStore, ids: list[int]):
    """The manifest's snapshot of exactly `ids` for this model, if its file is there (its content is checked on restore)."""
    hit = store.snapshots.find(engine.fingerprint, token_chain(ids)[-1])
    return hit if hit is not None and hit.n_tokens == len(ids) and store.snapshots.present(hit) else None


def _report(on_problem: Callable[[str], None] | None, sentence: str) -> None:
    if on_problem is not None:
        on_problem(sentence)
    else:
        warnings.warn(sentence, RuntimeWarning, stacklevel=3)


def open_documents(engine: Engine, store: ConversationStore, opening: Opening, codec: str = "int4",
                   progress: Progress | None = None, cancel: Cancel | None = None,
                   on_problem: Callable[[str], None] | None = None, must_save: bool = False) -> Opened:
    """Make the engine's memory hold `opening.ids`: restore the longest stored prefix, prefill the rest document
    by document, snapshot each new boundary (atomically; then its manifest row). Records the documents.

    A snapshot is a cache: one that cannot be saved (a full disk, a damaged manifest, a read-only data dir) is
    reported in one sentence (`on_problem`, else a RuntimeWarning) and the documents are open all the same,
    unless `must_save` (`edgectx ingest`, whose product the snapshot is): then the error is raised."""
    if engine.memory_config is None:
        raise UsageError("Documents need the long-context memory: drop --budget full.")
    t0 = time.perf_counter()
    writable = not store.read_only  # a read-only data dir: snapshots are still looked up and restored, never saved
    if not writable and must_save:
        raise StoreError(f"The conversation database {store.path} is read-only: make it and its folder writable.")
    doc_ids = [store.documents.add_read(doc, tokenizer=engine.fingerprint, token_offsets=offsets).id
               for doc, offsets in zip(opening.documents, opening.offsets)] if writable else []
    ends = opening.ends
    best = next(((end, hit) for end in reversed(ends)  # the longest stored prefix; looked up from the end
                 if (hit := find_snapshot(engine, store, opening.ids[:end])) is not None), (0, None))
    problem = None
    written, skipped = [], []
    done = restored = 0
    total = len(opening.ids)

    def report_from(base: int) -> Progress:
        return lambda n_done, _n_total: progress(base + n_done, total) if progress is not None else None

    def save(end: int) -> None:
        if not writable:
            if not skipped:
                _report(on_problem, f"The conversation database {store.path} is read-only: the documents' snapshots "
                                    "are not saved, so they are read again next time.")
            skipped.append(end)
            return
        try:
            written.append(_save(engine, store, opening.ids[:end], codec, _single(doc_ids, ends, end)))
        except (SnapshotError, StoreError) as e:
            if must_save:
                raise
            reason = str(e)
            name = opening.documents[ends.index(end)].path.name
            _report(on_problem, f"{name}: the snapshot was not saved, so it is read again next time: "
                                f"{reason[:1].lower()}{reason[1:]}")

    end, hit = best
    if hit is not None:
        info = engine.prefill_with_snapshot(opening.ids[:end], store.snapshots.path_of(hit), progress=report_from(0),
                                            cancel=cancel, on_problem=on_problem)
        problem, done = info.problem, end
        if info.reused_tokens == end:
            if writable:
                store.snapshots.touch(hit.id)
            restored = end
        else:  # damaged, stale or foreign: reported once, read again just now; replace it
            if writable:
                store.snapshots.remove(hit.id, on_problem)
            save(end)
    else:
        engine.reset()
    for end in ends:
        if end <= done:
            continue
        engine.prefill(opening.ids[done:end], progress=report_from(done), cancel=cancel)
        done = end
        save(end)
    return Opened(total, restored, total - restored, time.perf_counter() - t0, written, doc_ids, problem)


def _single(doc_ids: list[int], ends: list[int], end: int) -> int | None:
    """The document a snapshot of the first `end` tokens holds alone, if it holds just one."""
    return doc_ids[0] if doc_ids and end == ends[0] else None


def _save(engine: Engine, store: ConversationStore, ids: list[int], codec: str, document_id: int | None) -> tuple[Path, int]:
    """Write the snapshot, then its manifest row; raises SnapshotError or StoreError, leaving no unlisted file."""
    file = snapshot_file(engine.fingerprint, ids, codec)
    path = store.snapshots.inside(file)  # checked now: a symlinked folder must not carry the write out of the data dir
    if path is None:
        raise StoreError(f"{store.snapshots.root / file} leads outside the data dir {store.snapshots.root} "
                         "(a symlinked folder): nothing was written there.")
    try:
        info = engine.snapshot(path, codec=codec)
    except OSError as e:  # write_snapshot words its own; this is what is left (the size read after the write)
        reason = "the disk is full; free some space and try again" if e.errno == errno.ENOSPC else e.strerror or e
        raise SnapshotError(f"Cannot write the snapshot {path}: {reason}.") from None
    try:
        store.snapshots.add(file, model_fingerprint=engine.fingerprint, codec=codec, n_tokens=len(ids),
                            chain_hash=token_chain(ids)[-1], size_bytes=info.snapshot_bytes, document_id=document_id)
    except StoreError:
        with contextlib.suppress(OSError):  # unlisted, it would only take space (on a disk that may well be full)
            path.unlink(missing_ok=True)
        raise
    return store.snapshots.root / file, info.snapshot_bytes  # named as the manifest names it (`cache ls`)
