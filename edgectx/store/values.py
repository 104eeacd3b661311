"""Values read back from the database, checked: what a row holds is whatever was written to the file.

SQLite keeps any value in any column (a column's type is only a preference), and another program, an old
edgectx or a hand edit can leave text where a number belongs, a blob where text belongs, NULL, or JSON that
does not parse. Every row the store hands out passes through these, so a damaged value reads as absent
(an empty dict, None, 0, '') instead of ending `history` or `export` in a traceback.

    settings = json_object(row["settings_json"])  # {} for NULL, 'garbage', '[1, 2]' or a blob
    n_tokens = optional_int(row["n_tokens"])      # None for 'many'
"""

from __future__ import annotations

import json
import math

LATEST_SECONDS = 253402300799.0  # 9999-12-31T23:59:59Z: the last time `datetime` can show


def text(value: object) -> str:
    """Text as stored; a number becomes its digits, a blob is decoded (bad bytes replaced), NULL is ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def optional_text(value: object) -> str | None:
    return None if value is None else text(value)


def optional_int(value: object) -> int | None:
    """An integer, or None for NULL, text that is no number, or a real that is not finite."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def integer(value: object) -> int:
    number = optional_int(value)
    return 0 if number is None else number


def seconds(value: object) -> float:
    """Unix seconds that `datetime` can show; anything else reads as 0 (1970), which no real row holds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= LATEST_SECONDS:
        return float(value)
    return 0.0


def json_object(value: object) -> dict:
    """A JSON object as stored; NULL, a blob, text that does not parse, or JSON that is no object reads as {}."""
    if not isinstance(value, str):
        return {}
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # ValueError: not JSON (or a number too long); RecursionError: nested too deep
        return {}
    return parsed if isinstance(parsed, dict) else {}
