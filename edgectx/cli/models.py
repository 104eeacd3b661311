"""`edgectx models`: the GGUF models (and Hugging Face directories) found on this machine.

    edgectx models --json
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list GGUF models found on this machine")
    models.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from edgectx.config import load_config
    from edgectx.model.discover import discover

    entries = discover(load_config())
    if args.json:
        print(json.dumps([{"name": e.name, "path": str(e.path), "source": e.source, "size_bytes": e.size_bytes} for e in entries], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "source", "size", "path")
    for e in entries:
        table.add_row(e.name, e.source, f"{e.size_bytes / 2**20:,.0f} MiB", str(e.path))
    Console().print(table)
    if not entries:
        print("No models found: pass --model PATH, or add model_paths to the config file.")
    return 0
