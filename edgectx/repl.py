"""`edgectx chat`: one-shot (`--prompt`) or an interactive chat in the terminal.

Answers stream to stdout; status lines (loading, speed, cache reuse) go to stderr, so
`edgectx chat --prompt "..." > answer.txt` captures only the answer. In the interactive chat, Ctrl-C
stops the current answer and Ctrl-D (or /exit) leaves.

    edgectx chat --prompt "Name three primes." --temperature 0
"""

from __future__ import annotations

import sys
from argparse import Namespace

from rich.console import Console

from edgectx.chat import ChatSession
from edgectx.cli import memory_config_from
from edgectx.config import Config
from edgectx.engine import Engine
from edgectx.models import resolve_model
from edgectx.sampling import SamplingParams

HELP = "Commands: /reset (new conversation), /stats (memory tiers), /exit (or Ctrl-D). Ctrl-C stops an answer."


def load_engine(args: Namespace, config: Config, status: Console) -> Engine:
    path = resolve_model(args.model, config)
    with status.status(f"Loading {path.name} ..."):
        engine = Engine.load(path, device=args.device or config.device, n_ctx=args.ctx, n_threads=args.threads or config.threads,
                             memory_config=memory_config_from(args, config))
    status.print(f"[dim]{engine.spec.describe()} on {engine.device.type}[/dim]", highlight=False)
    return engine


def sampling_from(args: Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed,
    )


def _stream(chat: ChatSession, text: str, args: Namespace) -> None:
    for piece in chat.send(text, sampling_from(args), max_tokens=args.max_tokens, stop=tuple(args.stop)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def memory_line(stats: dict) -> str:
    mib = 2**20
    line = f"context {stats['tokens']:,} tokens; device KV {stats['device_kv_bytes'] / mib:,.1f} MiB"
    if "host_tokens" in stats:
        line += (f" ({stats['sink_tokens']} sinks, {stats['retained_tokens']:,} retained, {stats['window_tokens']} window, "
                 f"{stats['cached_blocks']} cached blocks); host {stats['host_kv_bytes'] / mib:,.1f} MiB, "
                 f"{stats['evicted_tokens']:,} tokens evicted from the device and retrievable")
    return line


def run_chat(args: Namespace, config: Config) -> int:
    status = Console(stderr=True)
    engine = load_engine(args, config, status)
    chat = ChatSession(engine, system=args.system or config.system)
    if args.prompt is not None:
        _stream(chat, args.prompt, args)
        return 0
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
            status.print("[dim]New conversation.[/dim]")
            continue
        if command == "/stats":
            status.print(memory_line(engine.stats()), highlight=False)
            continue
        if command == "/help":
            status.print(HELP, highlight=False)
            continue
        try:
            _stream(chat, text, args)
        except KeyboardInterrupt:
            # Interrupts land between tokens; the partial answer is kept in the conversation.
            sys.stdout.write("\n")
            status.print("[dim](stopped)[/dim]")
            continue
        s = engine.last_stats
        status.print(
            f"[dim]{s.generated_tokens} tokens, {s.decode_tok_s:.1f} tok/s; prompt {s.prompt_tokens} tokens "
            f"({s.reused_tokens} cached, {s.prompt_tokens - s.reused_tokens} prefilled in {s.prefill_s:.2f} s)[/dim]",
            highlight=False,
        )
