"""`edgectx chat`: one-shot (`--prompt`) or an interactive chat in the terminal.

Answers stream to stdout; status lines (loading, speed, cache reuse) go to stderr, so
`edgectx chat --prompt "..." > answer.txt` captures only the answer. In the interactive chat, Ctrl-C
stops the current answer and Ctrl-D (or /exit) leaves.

    edgectx chat --prompt "Name three primes." --temperature 0
    edgectx chat --doc report.pdf          # restores the snapshot `edgectx ingest report.pdf` made, or reads it
    edgectx chat --resume 7                # conversation 7 of `edgectx history`, with its documents

Every message is saved in the conversation store as it is sent (`--no-history` keeps this chat out of it).
"""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.text import Text

from edgectx.chat import ChatSession
from edgectx.cli import memory_config_from
from edgectx.config import Config
from edgectx.engine import Engine, Progress
from edgectx.models import resolve_model
from edgectx.sampling import SamplingParams

HELP = "Commands: /reset (new conversation over the same documents), /stats (memory tiers), /exit (or Ctrl-D). Ctrl-C stops an answer."


def warn(status: Console, sentence: str) -> None:
    """A problem the chat gets past, in one unbroken line (paths stay whole for copying)."""
    status.print(Text(sentence, style="yellow"), soft_wrap=True)


def load_engine(args: Namespace, config: Config, status: Console) -> Engine:
    path = resolve_model(args.model, config)
    with status.status(f"Loading {path.name} ..."):
        engine = Engine.load(path, device=args.device or config.device, n_ctx=args.ctx, n_threads=args.threads or config.threads,
                             memory_config=memory_config_from(args, config), weights=args.weights or config.weights or "auto")
    status.print(f"[dim]{engine.spec.describe()} on {engine.device.type}[/dim]", highlight=False)
    return engine


def sampling_from(args: Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed,
    )


def memory_line(stats: dict) -> str:
    mib = 2**20
    line = f"context {stats['tokens']:,} tokens; device KV {stats['device_kv_bytes'] / mib:,.1f} MiB"
    if "host_tokens" in stats:
        line += (f" ({stats['sink_tokens']} sinks, {stats['retained_tokens']:,} retained, {stats['window_tokens']} window, "
                 f"{stats['cached_blocks']} cached blocks); host {stats['host_kv_bytes'] / mib:,.1f} MiB, "
                 f"{stats['evicted_tokens']:,} tokens evicted from the device and retrievable")
    return line


@contextmanager
def reading_progress(status: Console, description: str, total_tokens: int) -> Iterator[Progress]:
    """A transient bar for tokens being read (count, tok/s, ETA); yields the engine's progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Bar(*columns, console=status, transient=True) as bar:
        task = bar.add_task(description, total=total_tokens, rate="")
        t0 = time.perf_counter()

        def update(n_done: int, _total: int) -> None:
            bar.update(task, completed=n_done, rate=f"{n_done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        yield update


def _open_documents(engine: Engine, store, docs: list, codec: str, status: Console):
    """Restore or read the documents into memory with a progress bar; returns the Opening and the document ids."""
    from edgectx.doc_context import build_opening, open_documents

    opening = build_opening(engine, docs)
    names = ", ".join(d.path.name for d in docs)
    with reading_progress(status, f"Reading {names}", len(opening.ids)) as update:
        opened = open_documents(engine, store, opening, codec=codec, progress=update,
                                on_problem=lambda sentence: warn(status, sentence))
    if opened.restored_tokens:
        line = f"restored {opened.restored_tokens:,} tokens in {opened.elapsed_s:.1f} s"
        line += f", read {opened.prefilled_tokens:,} more" if opened.prefilled_tokens else ""
    else:
        line = f"read {opened.n_tokens:,} tokens in {opened.elapsed_s:.1f} s (saved for next time)"
    status.print(Text(f"{names}: {line}", style="dim"), soft_wrap=True)
    return opening, opened.document_ids


def run_chat(args: Namespace, config: Config) -> int:
    from edgectx.chat_history import ChatRecorder, load_resumed
    from edgectx.documents import read_document
    from edgectx.store import ConversationStore

    status = Console(stderr=True)
    max_bytes = int(args.max_file_mib * 2**20)
    docs = [read_document(f, max_bytes=max_bytes) for f in args.doc]  # refuse bad files before loading the model
    with ConversationStore() as store:
        resumed = load_resumed(store, args.resume, max_bytes) if args.resume is not None else None
        if resumed is not None:
            for warning in resumed.warnings:
                warn(status, warning)
            docs = resumed.documents + [d for d in docs if d.sha256 not in {r.sha256 for r in resumed.documents}]
        system = (resumed.conversation.system_prompt if resumed else None) or args.system or config.system
        engine = load_engine(args, config, status)
        opening, doc_ids = (_open_documents(engine, store, docs, args.codec or config.snapshot_codec or "int4", status)
                            if docs else (None, []))
        chat = ChatSession(engine, system=system, opening=opening)
        recorder = ChatRecorder(None if args.no_history else store, engine, system, docs, doc_ids,
                                resumed.conversation if resumed else None)
        if resumed is not None:
            chat.messages += resumed.messages
            for doc_id in doc_ids:
                store.documents.attach(resumed.conversation.id, doc_id)
            _print_transcript(resumed, status)
        if args.prompt is not None:
            _turn(chat, recorder, args.prompt, args)
            return 0
        return _loop(chat, recorder, engine, args, status)


def _print_transcript(resumed, status: Console) -> None:
    c = resumed.conversation
    status.print(f"[dim]Resumed conversation {c.id}: {c.title or 'untitled'} ({len(resumed.messages)} messages)[/dim]",
                 highlight=False)
    for m in resumed.messages:
        status.print(("you> " if m["role"] == "user" else "") + m["content"], highlight=False, markup=False)


def _turn(chat: ChatSession, recorder, text: str, args: Namespace) -> None:
    """One exchange: the user's message is stored before the answer starts, the answer (even a stopped one) after."""
    recorder.user(text)
    pieces = []
    try:
        for piece in chat.send(text, sampling_from(args), max_tokens=args.max_tokens, stop=tuple(args.stop)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        if pieces or chat.engine.last_stats.generated_tokens:
            recorder.assistant("".join(pieces), chat.engine.last_stats)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _loop(chat: ChatSession, recorder, engine: Engine, args: Namespace, status: Console) -> int:
    status.print(f"[dim]{HELP}[/dim]", highlight=False)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            status.print()
            return 0
        except KeyboardInterrupt:
            status.print()
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            recorder.new_conversation()
            status.print("[dim]New conversation.[/dim]")
            continue
        if command == "/stats":
            status.print(memory_line(engine.stats()), highlight=False)
            continue
        if command == "/help":
            status.print(HELP, highlight=False)
            continue
        try:
            _turn(chat, recorder, text, args)
        except KeyboardInterrupt:
            # Interrupts land between tokens; the partial answer is kept in the conversation.
            status.print("[dim](stopped)[/dim]")
            continue
        s = engine.last_stats
        status.print(
            f"[dim]{s.generated_tokens} tokens, {s.decode_tok_s:.1f} tok/s; prompt {s.prompt_tokens} tokens "
            f"({s.reused_tokens} cached, {s.prompt_tokens - s.reused_tokens} prefilled in {s.prefill_s:.2f} s)[/dim]",
            highlight=False,
        )
