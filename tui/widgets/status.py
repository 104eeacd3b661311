"""The status bar: the model, tokens in context and the memory gauge, from `Engine.stats()`.

The gauge fills with the tokens resident on the device against the budget (the long-context memory) or
against the context window (full attention); beside it, device and host KV bytes.

    bar = StatusBar()
    bar.show("smollm2.gguf", engine.stats())
    # "smollm2.gguf · 5,000 tokens in context · [██████░░░░░░] 1,024/2,048 budget on device · KV 2.0 MiB device, 8.0 MiB host"
"""

from __future__ import annotations

from textual.widgets import Static

GAUGE_CELLS = 12


def gauge(used: int, total: int, cells: int = GAUGE_CELLS) -> str:
    filled = min(cells, round(cells * used / total)) if total > 0 else 0
    return "█" * filled + "░" * (cells - filled)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def status_line(model: str, stats: dict, answer=None) -> str:
    """`answer`: the last turn's GenerationStats, shown as its length and speed."""
    if not stats:
        return model
    tokens = stats.get("tokens", 0)
    if "budget_tokens" in stats:
        budget = stats["budget_tokens"]
        resident = tokens - stats.get("evicted_tokens", 0)
        meter = f"[{gauge(resident, budget)}] {resident:,}/{budget:,} budget on device"
    else:
        budget = stats.get("context_tokens", 0)
        meter = f"[{gauge(tokens, budget)}] {tokens:,}/{budget:,} context"
    return (f"{model} · {tokens:,} tokens in context · {meter} · KV {mib(stats.get('device_kv_bytes', 0))} device, "
            f"{mib(stats.get('host_kv_bytes', 0))} host"
            + (f" · last answer {answer.generated_tokens:,} tokens, {answer.decode_tok_s:.1f} tok/s" if answer else ""))


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: auto; max-height: 2; padding: 0 1; background: $panel; color: $text-muted; }
    """

    def show(self, model: str, stats: dict, answer=None) -> None:
        if answer is None and stats:
            answer = self._answer  # keep the last answer's figures until the next one
        self._answer = answer
        self.update(status_line(model, stats, answer))

    _answer = None

    @property
    def text(self) -> str:
        return str(self.render())
