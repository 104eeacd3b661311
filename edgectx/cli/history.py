"""`edgectx history` and `edgectx export`: list, search and export the conversations edgectx has saved.

    edgectx history                         # a table, most recently updated first
    edgectx history --search "chapter 3" --json
    edgectx export 7 --format md --out chat.md
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from edgectx.cli.options import MAX_ID, int_range
from edgectx.errors import UsageError
from edgectx.store.conversations import ConversationStore, StoredConversation
from edgectx.store.export import UNTITLED, export_json, export_markdown, iso_utc


def add_parsers(sub) -> None:
    history = sub.add_parser("history", help="list saved conversations, most recently updated first, or search them")
    history.add_argument("--search", "-s", metavar="Q", help="only conversations whose messages or title contain these words")
    history.add_argument("--json", action="store_true", help="print a JSON list")
    export = sub.add_parser("export", help="write a saved conversation as Markdown or JSON")
    export.add_argument("id", type=int_range(1, MAX_ID), help="the conversation's id, as `edgectx history` shows it")
    export.add_argument("--format", choices=("md", "json"), default="md", help="Markdown or JSON (default md)")
    export.add_argument("--out", "-o", metavar="FILE", help="write to FILE instead of standard output")


def _entry(conversation: StoredConversation) -> dict:
    return {"id": conversation.id, "title": conversation.title, "created": iso_utc(conversation.created_at),
            "updated": iso_utc(conversation.updated_at), "messages": conversation.n_messages, "model": conversation.model_name}


def _history(args: argparse.Namespace, store: ConversationStore) -> int:
    if args.search is not None:
        hits = store.search(args.search)
        rows = [(hit.conversation, hit.snippet) for hit in hits]
    else:
        rows = [(c, None) for c in store.list_conversations()]
    if args.json:
        print(json.dumps([_entry(c) | ({"snippet": s} if args.search is not None else {}) for c, s in rows], indent=2,
                         ensure_ascii=False))
        return 0
    if not rows:
        print("No conversation matches." if args.search is not None else "No saved conversations yet.")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("id", "title", "updated", "messages", *(["match"] if args.search is not None else []))
    for conversation, snippet in rows:
        updated = datetime.fromtimestamp(conversation.updated_at).strftime("%Y-%m-%d %H:%M")
        cells = [str(conversation.id), Text(conversation.title or UNTITLED), updated, str(conversation.n_messages)]
        table.add_row(*cells, *([Text(snippet.replace("\n", " "))] if snippet is not None else []))  # Text: no markup
    Console().print(table)
    return 0


def _export(args: argparse.Namespace, store: ConversationStore) -> int:
    text = (export_json if args.format == "json" else export_markdown)(store, args.id)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out).expanduser()
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"Cannot write {out}: {e.strerror}.") from None
    print(f"Wrote conversation {args.id} to {out}.", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    with ConversationStore() as store:
        return _history(args, store) if args.command == "history" else _export(args, store)
