"""Stop strings over streamed text: emit everything that cannot be the start of a stop string.

    matcher = StopMatcher(("\\nUser:",))
    text, hit = matcher.feed("Hello\\nUs")   # -> ("Hello", False): "\\nUs" is held back
    text, hit = matcher.feed("er: more")    # -> ("", True)
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        if final or not self.stops:
            self._held = ""
            return buffer, False
        keep = 0  # the longest buffer suffix that is a proper prefix of some stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False
