"""Human-readable tables for `edgectx bench ...` without `--json`.

    print_report("speed", result)
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_report(kind: str, result: dict) -> None:
    console = Console()
    if kind == "speed":
        table = Table("context", "edgectx prefill tok/s", "llama.cpp prefill tok/s", "ratio",
                      "edgectx decode tok/s", "llama.cpp decode tok/s", "ratio",
                      title=f"{result['model']}, {result['threads']} threads")
        for r in result["runs"]:
            e, l = r["edgectx"], r["llama_cpp"]
            table.add_row(str(r["context"]), f"{e['prefill_tok_s']:.1f}", f"{l['prefill_tok_s']:.1f}", f"{r['prefill_ratio']:.2f}",
                          f"{e['decode_tok_s']:.1f}", f"{l['decode_tok_s']:.1f}", f"{r['decode_ratio']:.2f}")
    else:
        table = Table("metric", "value", title=f"{result.get('model', '')} on {result.get('text', '')}")
        for key, value in result.items():
            if key not in ("model", "text"):
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
