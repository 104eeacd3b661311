"""The status bar and memory gauge: the model, tokens in context, device and host KV bytes against the budget,
the documents' snapshot state, what the next message would cost, and the last answer's speed.

The gauge fills with the tokens resident on the device against the budget (the long-context memory) or
against the context window (full attention). The line is one row: parts that do not fit the width are left
out, least important first, so it never wraps.

    bar = StatusBar()
    bar.show("smollm2.gguf", engine.stats(), snapshot="snapshot restored")
    bar.plan = (5000, 12)
    # "smollm2.gguf · 5,000 tok in context · [█████░░░░░] 1,024/2,048 on device · KV 2.0 MiB dev, 8.0 MiB host
    #  · snapshot restored · 5,000 cached / 12 to prefill"
"""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

GAUGE_CELLS = 10
MODEL_CHARS = 28


def gauge(used: int, total: int, cells: int = GAUGE_CELLS) -> str:
    filled = min(cells, round(cells * used / total)) if total > 0 else 0
    return "█" * filled + "░" * (cells - filled)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def short(name: str, chars: int = MODEL_CHARS) -> str:
    return name if len(name) <= chars else name[: chars - 1] + "…"


def status_parts(model: str, stats: dict, answer=None, plan: tuple[int, int] | None = None,
                 snapshot: str | None = None) -> list[tuple[int, str]]:
    """(priority, text) in display order; priority 0 is kept first. `answer`: the last turn's GenerationStats."""
    if not stats:
        return [(0, model)]
    if "remote" in stats:  # the memory is the server's: nothing to gauge here
        parts = [(5, short(model)), (0, "remote engine: memory gauge unavailable")]
        if answer is not None:
            parts.append((4, f"last answer {answer.generated_tokens:,} tok, {answer.decode_tok_s:.1f} tok/s"))
        return parts
    tokens = stats.get("tokens", 0)
    if "budget_tokens" in stats:
        budget = stats["budget_tokens"]
        # Right after a chunk, or while decoding, the resident tiers hold a few tokens past the budget until the
        # next eviction; the gauge shows the budget's use, so it stops at full.
        resident = min(tokens - stats.get("evicted_tokens", 0), budget)
        meter = f"[{gauge(resident, budget)}] {resident:,}/{budget:,} on device"
    else:
        budget = stats.get("context_tokens", 0)
        meter = f"[{gauge(tokens, budget)}] {tokens:,}/{budget:,} context"
    parts = [(5, short(model)), (1, f"{tokens:,} tok in context"), (0, meter),
             (2, f"KV {mib(stats.get('device_kv_bytes', 0))} dev, {mib(stats.get('host_kv_bytes', 0))} host")]
    if snapshot:
        parts.append((3, snapshot))
    if plan is not None:
        parts.append((0, f"{plan[0]:,} cached / {plan[1]:,} to prefill"))
    elif answer is not None:
        parts.append((4, f"last answer {answer.generated_tokens:,} tok, {answer.decode_tok_s:.1f} tok/s"))
    return parts


def fit(parts: list[tuple[int, str]], width: int, sep: str = " · ") -> str:
    """The parts joined, dropping the least important ones until the line fits `width` cells."""
    kept = list(parts)
    while len(kept) > 1 and len(sep.join(t for _, t in kept)) > width:
        worst = max(range(len(kept)), key=lambda i: (kept[i][0], i))
        kept.pop(worst)
    return sep.join(t for _, t in kept)


def status_line(model: str, stats: dict, answer=None, plan=None, snapshot=None, width: int = 10_000) -> str:
    return fit(status_parts(model, stats, answer, plan, snapshot), width)


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    """

    plan: reactive[tuple[int, int] | None] = reactive(None)

    def __init__(self, **kwargs):
        super().__init__(markup=False, **kwargs)
        self._model, self._stats, self._answer, self._snapshot = "", {}, None, None

    def show(self, model: str, stats: dict, answer=None, snapshot: str | None = None) -> None:
        if answer is None and stats:
            answer = self._answer  # keep the last answer's figures until the next one
        self._model, self._stats, self._answer, self._snapshot = model, stats, answer, snapshot
        self._render_line()

    def watch_plan(self) -> None:
        self._render_line()

    def on_resize(self) -> None:
        self._render_line()

    def _render_line(self) -> None:
        width = self.content_region.width or 10_000
        self.update(status_line(self._model, self._stats, self._answer, self.plan, self._snapshot, width))

    @property
    def text(self) -> str:
        return str(self.render())

    @property
    def full_text(self) -> str:
        """The whole line, whatever the width."""
        return status_line(self._model, self._stats, self._answer, self.plan, self._snapshot)
