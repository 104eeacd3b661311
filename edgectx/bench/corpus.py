"""Real text every machine has: the Python standard library's sources, read in a fixed order.

    text = stdlib_text(min_chars=200_000)  # the same text on every machine with the same Python
    ids = corpus_tokens(tokenizer, n_tokens=4097, text_file=None)
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from edgectx.errors import UsageError

# Large, stable, prose-heavy modules first, so the text is the same across Python patch releases.
PREFERRED = ("argparse.py", "typing.py", "dataclasses.py", "inspect.py", "pathlib.py", "subprocess.py", "functools.py")


def stdlib_text(min_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in PREFERRED] + sorted(p for p in root.glob("*.py") if p.name not in PREFERRED)
    parts, total = [], 0
    for path in files:
        if total >= min_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
    return "\n".join(parts)


def corpus_tokens(tokenizer, n_tokens: int, text_file: str | None = None) -> list[int]:
    """`n_tokens` ids of real text: `text_file` if given, else the standard library's sources."""
    if text_file:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"Cannot read {text_file} as UTF-8 text ({e}).") from None
    else:
        text = stdlib_text(min_chars=n_tokens * 6)
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos, special=False)
    if len(ids) < n_tokens:
        raise UsageError(f"The text has {len(ids)} tokens; the benchmark needs {n_tokens}: pass a longer --text file.")
    return ids[:n_tokens]
