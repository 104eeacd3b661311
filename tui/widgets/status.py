"""The status bar: the model, tokens in context and the memory gauge, from `Engine.stats()`.

The gauge fills with the tokens resident on the device against the budget (the long-context memory) or
against the context window (full attention); beside it, device and host KV bytes.

    bar = StatusBar()
    bar.show("smollm2.gguf", engine.stats())  # "smollm2.gguf · 1,234 tokens · [████░░] device 1,234/2,048 ..."
"""

from __future__ import annotations

from textual.widgets import Static

GAUGE_CELLS = 12


def gauge(used: int, total: int, cells: int = GAUGE_CELLS) -> str:
    filled = min(cells, round(cells * used / total)) if total > 0 else 0
    return "█" * filled + "░" * (cells - filled)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def status_line(model: str, stats: dict) -> str:
    if not stats:
        return model
    tokens = stats.get("tokens", 0)
    if "budget_tokens" in stats:
        budget = stats["budget_tokens"]
        resident = tokens - stats.get("evicted_tokens", 0)
        meter = f"[{gauge(resident, budget)}] device {resident:,}/{budget:,} budget"
    else:
        budget = stats.get("context_tokens", 0)
        meter = f"[{gauge(tokens, budget)}] {tokens:,}/{budget:,} context"
    return (f"{model} · {tokens:,} tokens in context · {meter} · device KV {mib(stats.get('device_kv_bytes', 0))}"
            f" · host KV {mib(stats.get('host_kv_bytes', 0))}")


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    """

    def show(self, model: str, stats: dict) -> None:
        self.update(status_line(model, stats))

    @property
    def text(self) -> str:
        return str(self.render())
