"""The `edgectx` command: argument parsing and dispatch; every user error ends in one sentence.

    edgectx                      # the terminal UI in a terminal; the line chat when piped
    edgectx tui [--model M]      # the terminal UI
    edgectx chat --prompt "hi"   # one-shot answer on stdout
    edgectx models | doctor | --version
    edgectx bench conformance | speed | fidelity | longppl | recall | memory | reopen | tui-latency
    edgectx heads train | import | info
    edgectx history [--search Q] | export ID --format md|json
    edgectx ingest FILE... | chat --doc FILE | chat --resume ID | cache ls|rm|gc
    edgectx plan --model M | --synthetic NAME --context N --gpu-mem-gib G
    edgectx serve [--port 8000]    # the OpenAI chat API; chat --engine URL / tui --engine URL use one

Each command group is a module of this package with `add_parser(sub)` and `run(args)`; the modules are
light to import (torch and textual load inside `run`), so `edgectx --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from edgectx import __version__
from edgectx.cli import bench, chat, doctor, heads, history, ingest, models, plan, serve, tui
from edgectx.errors import EdgectxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgectx", description="Chat with very long local documents on one machine.")
    parser.add_argument("--version", action="version", version=f"edgectx {__version__}")
    sub = parser.add_subparsers(dest="command")
    chat.add_parser(sub)
    tui.add_parser(sub)
    models.add_parser(sub)
    doctor.add_parser(sub)
    heads.add_parser(sub)
    history.add_parsers(sub)
    ingest.add_parsers(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    simple = {"models": models.run, "doctor": doctor.run, "bench": bench.run, "plan": plan.run, "heads": heads.run,
              "history": history.run, "export": history.run, "cache": ingest.run_cache}
    if args.command in simple:
        return simple[args.command](args)
    from edgectx.config import load_config

    if args.command == "ingest":
        return ingest.run_ingest(args, load_config())
    if args.command is None:  # bare `edgectx`: the terminal UI in a terminal, else (a pipe, CI) the line chat
        args = build_parser().parse_args(["tui" if sys.stdin.isatty() and sys.stdout.isatty() else "chat"])
    if args.command == "tui":
        return tui.run(args, load_config())
    if args.command == "serve":
        return serve.run(args, load_config())
    return chat.run(args, load_config())


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except EdgectxError as e:
        print(f"edgectx: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("\nedgectx: interrupted.", file=sys.stderr)
        code = 130
    except MemoryError:
        print("edgectx: out of memory: try a smaller model or a shorter context (--ctx).", file=sys.stderr)
        code = 1
    sys.exit(code)
