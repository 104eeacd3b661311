"""`edgectx chat`: one-shot (`--prompt`) or an interactive chat in the terminal.

Answers stream to stdout; status lines (loading, speed, cache reuse) go to stderr, so
`edgectx chat --prompt "..." > answer.txt` captures only the answer. In the interactive chat, Ctrl-C
stops the current answer and Ctrl-D (or /exit) leaves. The conversation itself is
edgectx.chat.conversation's `Conversation`, the same object the terminal UI drives.

    edgectx chat --prompt "Name three primes." --temperature 0
    edgectx chat --doc report.pdf          # restores the snapshot `edgectx ingest report.pdf` made, or reads it
    edgectx chat --resume 7                # conversation 7 of `edgectx history`, with its documents
    edgectx chat --engine http://127.0.0.1:8000/v1 --prompt "Hi"   # a remote engine (edgectx.chat.remote)

Every message is saved in the conversation store as it is sent (`--no-history` keeps this chat out of it).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from edgectx.cli.console import note, reading_progress, warn
from edgectx.cli.options import (MAX_ID, add_decode_args, add_engine_args, add_memory_args, add_model_args, add_sampling_args,
                                 connect_remote, engine_url_from, file_mib, int_range, load_engine, max_tokens_from,
                                 sampling_from)
from edgectx.config import Config
from edgectx.errors import StoreError
from edgectx.quant.formats import SNAPSHOT_CODECS

HELP = "Commands: /reset (new conversation over the same documents), /stats (memory tiers), /exit (or Ctrl-D). Ctrl-C stops an answer."


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal, or answer one --prompt and exit")
    add_model_args(chat)
    add_engine_args(chat)
    add_decode_args(chat)
    add_memory_args(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--prompt", "-p", help="answer this one message on stdout and exit")
    add_sampling_args(chat)
    chat.add_argument("--stop", action="append", default=[], help="stop when the answer contains this text (repeatable)")
    chat.add_argument("--doc", action="append", default=[], metavar="FILE",
                      help="chat about this file: restores its snapshot, or reads it and saves one (repeatable)")
    chat.add_argument("--resume", type=int_range(1, MAX_ID), metavar="ID", help="continue conversation ID (`edgectx history` lists them)")
    chat.add_argument("--codec", choices=SNAPSHOT_CODECS, help="how new document snapshots are stored (default int4)")
    chat.add_argument("--max-file-mib", type=file_mib, default=64.0, help="largest document to read, in MiB (default 64)")
    chat.add_argument("--no-history", action="store_true", help="do not save this chat's messages")


def memory_line(stats: dict) -> str:
    mib = 2**20
    line = f"context {stats['tokens']:,} tokens; device KV {stats['device_kv_bytes'] / mib:,.1f} MiB"
    if "host_tokens" in stats:
        cached = f", {stats['cached_blocks']} cached blocks" if stats["cache_capacity_blocks"] else ""  # none on a CPU
        line += (f" ({stats['sink_tokens']} sinks, {stats['retained_tokens']:,} retained, {stats['window_tokens']} window"
                 f"{cached}); host {stats['host_kv_bytes'] / mib:,.1f} MiB, "
                 f"{stats['evicted_tokens']:,} tokens evicted from the device and retrievable")
    return line


def run(args: argparse.Namespace, config: Config) -> int:
    from edgectx.chat.conversation import Conversation, Settings
    from edgectx.chat.documents import read_document
    from edgectx.store.conversations import ConversationStore

    status = Console(stderr=True)
    max_bytes = int(args.max_file_mib * 2**20)
    docs = [read_document(f, max_bytes=max_bytes) for f in args.doc]  # refuse bad files before loading the model
    settings = Settings(system=args.system or config.system, codec=args.codec or config.snapshot_codec or "int4",
                        sampling=sampling_from(args, config), max_tokens=max_tokens_from(args, config),
                        stop=tuple(args.stop), max_file_bytes=max_bytes,
                        thinking=False if args.no_thinking else config.thinking)
    with ConversationStore() as store:
        if args.resume is not None:
            store.get_conversation(args.resume)  # an unknown id is refused before the model loads
        if store.read_only and not args.no_history:  # before the model too: its first message could not be saved
            raise StoreError(f"The conversation database {store.path} is read-only: make it and its folder writable, "
                             "or pass --no-history.")
        url = engine_url_from(args, config)
        if url:
            from edgectx.chat.remote import RemoteConversation

            conversation = RemoteConversation(connect_remote(url, args, status), store, settings, record=not args.no_history)
        else:
            engine = load_engine(args, config, status, compile_step=args.prompt is None and sys.stdin.isatty())
            conversation = Conversation(engine, store, settings, record=not args.no_history)
        if args.resume is not None:
            _resume(conversation, args.resume, docs, status)
        elif docs:
            with reading_progress(status, f"Reading {', '.join(d.path.name for d in docs)}") as update:
                line = conversation.attach(docs, progress=update, on_problem=lambda sentence: warn(status, sentence))
            note(status, line)
        if args.prompt is not None:
            _turn(conversation, args.prompt)
            return 0
        return _loop(conversation, status)


def _resume(conversation, conversation_id: int, docs: list, status: Console) -> None:
    with reading_progress(status, "Reading the conversation's documents") as update:
        resumed = conversation.resume(conversation_id, docs, progress=update, on_problem=lambda s: warn(status, s))
    for warning in resumed.warnings:
        warn(status, warning)
    if resumed.documents_line:
        note(status, resumed.documents_line)
    c = resumed.conversation
    note(status, f"Resumed conversation {c.id}: {c.title or 'untitled'} ({len(resumed.messages)} messages)")
    for m in resumed.messages:
        status.print(("you> " if m["role"] == "user" else "") + m["content"], highlight=False, markup=False)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


class _Thinking:
    """A reasoning model's thinking, streamed to stderr (dimmed on a terminal), so that stdout carries the answer
    alone; a line break on stderr once the answer begins."""

    def __init__(self):
        self.open = False

    def write(self, piece: str) -> None:
        dim = sys.stderr.isatty()
        sys.stderr.write(("\x1b[2m" + piece + "\x1b[0m") if dim else piece)
        sys.stderr.flush()
        self.open = True

    def end(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


def _turn(conversation, text: str) -> None:
    """One exchange, streamed to stdout; the conversation stores the message and the answer (a stopped one too)."""
    thinking = _Thinking()

    def answer(piece: str) -> None:
        thinking.end()
        _write(piece)

    try:
        conversation.send(text, on_piece=answer, on_reasoning=thinking.write)
    finally:
        thinking.end()
        _write("\n")


def _loop(conversation, status: Console) -> int:
    engine = conversation.engine
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
            conversation.reset()
            status.print("[dim]New conversation.[/dim]")
            continue
        if command == "/stats":
            stats = engine.stats()
            status.print("The memory's tiers are unavailable with a remote engine." if "remote" in stats
                         else memory_line(stats), highlight=False)
            continue
        if command == "/help":
            status.print(HELP, highlight=False)
            continue
        try:
            _turn(conversation, text)
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
