"""The server's conversations: which memory a request continues, and where the others wait.

An OpenAI client sends the whole conversation with every request, so a request continues the memory whose
tokens it starts with. The pool keeps one memory per conversation (keyed by its tokens, not by any id):
the engine holds one; the last `max_in_ram` wait in RAM within `ram_bytes`; older ones are snapshotted to disk
(losslessly, fp16) and restored when a request continues them; past `max_on_disk` the oldest are deleted.
A request whose prompt starts with a document that `edgectx ingest` snapshotted restores that snapshot when it
covers more than any memory held. The text of each memory is kept beside its tokens: a prompt that extends that
text is tokenized only past it, so the tokens in memory (the answer as generated) are reused as they are.

    pool = MemoryPool(engine, spill_dir)
    plan = pool.choose(prompt_text)   # the tokens to run and where they continue from
    pool.apply(plan, progress, cancel) # the engine now holds plan.ids (prefilling only what is new)
    ... engine.generate(...) ...
    pool.finished(text_of_prompt_and_answer)
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgectx.engine import Cancel, Engine, HeldMemory, Progress
from edgectx.errors import SnapshotError
from edgectx.memory.context import ContextMemory
from edgectx.snapshot.file import read_header
from edgectx.snapshot.token_chain import token_chain
from edgectx.store.conversations import ConversationStore

DOC_END = "\n</document>\n\n"  # where edgectx.chat.opening's document blocks end
SPILL_CODEC = "fp16"  # lossless: a conversation restored from disk continues exactly as it was
SAME_CONVERSATION = 0.5  # a request sharing at least this share of a memory's tokens continues it (cut back);
# less (a shared system prompt, say) starts a conversation of its own and leaves that one be


@dataclass
class Entry:
    """One conversation's memory: held by the engine (`held` None, `path` None), in RAM or in a snapshot file."""

    key: int
    tokens: list[int]
    text: str | None  # the exact text whose tokens `tokens` are; None when unknown (a stopped read)
    used_at: float
    held: HeldMemory | None = None
    path: Path | None = None


@dataclass
class Plan:
    ids: list[int]  # the prompt's tokens
    entry: Entry | None  # the memory it continues; None: a new one
    common: int  # tokens it shares with that memory
    snapshot: Path | None = None  # an ingested document's snapshot to restore first (then entry is None)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class MemoryPool:
    def __init__(self, engine: Engine, spill_dir: Path | None, store: ConversationStore | None = None, max_in_ram: int = 4,
                 ram_bytes: int = 4 * 2**30, max_on_disk: int = 32):
        self.engine, self.spill_dir, self.store = engine, spill_dir, store  # spill_dir None: nothing goes to disk
        self.max_in_ram, self.ram_bytes, self.max_on_disk = max_in_ram, ram_bytes, max_on_disk
        self._keys = itertools.count()
        self.live = Entry(next(self._keys), [], "", time.monotonic())  # what the engine holds
        self.waiting: list[Entry] = []  # oldest first

    # -- deciding ----------------------------------------------------------------------------------

    def _encode(self, text: str, first: bool) -> list[int]:
        """Tokens of `text`, each `<document>` block's end a cut, as edgectx's own opening tokenizes documents
        (edgectx.chat.opening): so a prompt that starts with ingested documents starts with their snapshot's tokens."""
        tokenizer = self.engine.tokenizer
        pieces = text.split(DOC_END)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            piece += DOC_END if i < len(pieces) - 1 else ""
            ids += tokenizer.encode(piece, add_bos=first and i == 0 and tokenizer.add_bos)
        return ids

    def choose(self, text: str) -> Plan:
        """Which memory the prompt `text` continues (the one sharing most tokens), or a snapshot, or none."""
        fresh = self._encode(text, first=True)
        best: Plan | None = None
        for entry in [self.live, *reversed(self.waiting)]:
            extends = entry.text and entry.tokens and text.startswith(entry.text)
            ids = entry.tokens + self._encode(text[len(entry.text):], first=False) if extends else fresh
            common = common_prefix(entry.tokens, ids)
            if entry.tokens and common >= SAME_CONVERSATION * len(entry.tokens) and (best is None or common > best.common):
                best = Plan(ids, entry, common)
        if best is None:
            best = Plan(fresh, None, 0)
        hit = self._document_snapshot(best.ids)
        if hit is not None and hit[1] > best.common:
            best = Plan(best.ids, None, 0, snapshot=hit[0])
        return best

    def _document_snapshot(self, ids: list[int]) -> tuple[Path, int] | None:
        """The longest snapshot `edgectx ingest` (or `chat --doc`) saved of a prefix of `ids`, for this model and
        memory config (one of another config would change the engine's for every later conversation)."""
        if self.store is None or not isinstance(self.engine.memory, ContextMemory):
            return None
        candidates = sorted((e for e in self.store.snapshots.list()
                             if e.model_fingerprint == self.engine.fingerprint and 0 < e.n_tokens < len(ids)),
                            key=lambda e: -e.n_tokens)
        for entry in candidates:
            if token_chain(ids[: entry.n_tokens])[-1] != entry.chain_hash.lower() or not self.store.snapshots.present(entry):
                continue
            path = self.store.snapshots.path_of(entry)
            try:
                if read_header(path).memory_config == self.engine.memory_config.to_dict():
                    return path, entry.n_tokens
            except SnapshotError:
                continue
        return None

    # -- doing -------------------------------------------------------------------------------------

    def apply(self, plan: Plan, progress: Progress | None = None, cancel: Cancel | None = None) -> int:
        """Make the engine hold `plan.ids`, prefilling only what is new; returns the tokens reused."""
        engine = self.engine
        if plan.entry is not self.live:
            self._park_live()
            if plan.entry is not None:
                self.waiting.remove(plan.entry)
                self._bring_back(plan.entry)
            else:
                self.live = Entry(next(self._keys), [], None, time.monotonic())
        self.live.used_at = time.monotonic()
        self.live.text = None  # until `finished`: a read stopped half way holds tokens of no known text
        try:
            if plan.snapshot is not None:
                info = engine.prefill_with_snapshot(plan.ids, plan.snapshot, progress=progress, cancel=cancel,
                                                    on_problem=lambda sentence: None)
                reused = info.reused_tokens
            else:
                reused = engine.sync(plan.ids, progress=progress, cancel=cancel)
        finally:
            self.live.tokens = list(engine.tokens)
        return reused

    def finished(self, text: str) -> None:
        """The answer is done: the memory holds the tokens of `text` (the prompt, then the answer as generated)."""
        self.live.tokens, self.live.text = list(self.engine.tokens), text

    def _park_live(self) -> None:
        if self.live.tokens:
            self.live.held = self.engine.take_memory()
            self.waiting.append(self.live)
            self._fit()
        else:
            self.engine.reset()

    def _bring_back(self, entry: Entry) -> None:
        if entry.held is not None:
            self.engine.put_memory(entry.held)
        else:
            try:
                self.engine.restore(entry.path)
            except SnapshotError:
                self.engine.reset()  # read again below (sync prefills what the memory lacks)
            entry.path.unlink(missing_ok=True)
        entry.held, entry.path = None, None
        self.live = entry
        self.live.tokens = list(self.engine.tokens)

    def _fit(self) -> None:
        """Keep at most `max_in_ram` memories in RAM (the engine's counts) within `ram_bytes`; spill the oldest."""
        in_ram = [e for e in self.waiting if e.held is not None]
        while in_ram and (len(in_ram) + 1 > self.max_in_ram or sum(e.held.ram_bytes for e in in_ram) > self.ram_bytes):
            self._spill(in_ram.pop(0))
        on_disk = [e for e in self.waiting if e.path is not None]
        for entry in on_disk[: max(0, len(on_disk) - self.max_on_disk)]:
            entry.path.unlink(missing_ok=True)
            self.waiting.remove(entry)

    def _spill(self, entry: Entry) -> None:
        """Snapshot a waiting memory to disk (full attention cannot be, nor without a spill folder: it is dropped,
        and read again if its conversation comes back)."""
        held, entry.held = entry.held, None
        if not isinstance(held.memory, ContextMemory) or self.spill_dir is None:
            self.waiting.remove(entry)
            self.engine.discard(held)
            return
        live = self.engine.take_memory()
        self.engine.put_memory(held)
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            entry.path = self.engine.snapshot(self.spill_dir / f"conversation-{entry.key}.{SPILL_CODEC}.ectx",
                                              codec=SPILL_CODEC).path
        except (SnapshotError, OSError):
            self.waiting.remove(entry)  # a full disk: this conversation is read again if it comes back
        finally:
            self.engine.put_memory(live)
            self.engine.discard(held)  # on disk now (or read again if it comes back): its RAM goes back

    def stats(self) -> dict:
        return {"tokens": len(self.engine.tokens),  # what the engine holds now
                "conversations": 1 + len(self.waiting) if self.live.tokens else len(self.waiting),
                "in_ram": sum(1 for e in self.waiting if e.held is not None) + (1 if self.live.tokens else 0),
                "on_disk": sum(1 for e in self.waiting if e.path is not None)}

    def close(self) -> None:
        """Delete the spilled snapshots (they hold this run's conversations only)."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
