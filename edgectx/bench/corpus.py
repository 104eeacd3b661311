"""Real text every machine has: the Python standard library's sources, or its documentation prose.

`stdlib` is source code (mixed difficulty: code, comments, docstrings). `docs` is English prose of
even difficulty for long-context benchmarks: the language reference topics that ship with pydoc
(about 113K tokens for SmolLM2), then the standard library's module docstrings, in a fixed order.

    text = stdlib_text(min_chars=200_000)  # the same text on every machine with the same Python
    ids = corpus_tokens(tokenizer, n_tokens=4097, text_file=None, corpus="docs")
"""

from __future__ import annotations

import ast
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


def _prose_share(text: str) -> float:
    """Share of letters and spaces: keeps docstrings that read as prose, drops tables and ASCII art."""
    return sum(c.isalpha() or c.isspace() for c in text) / len(text)


def docs_text(min_chars: int) -> str:
    """The pydoc topics (the language reference), then module docstrings until `min_chars`."""
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)]
    total = sum(map(len, parts))
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if total >= min_chars:
            break
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if doc and len(doc) > 400 and _prose_share(doc) > 0.85:
            parts.append(doc)
            total += len(doc)
    return "\n\n".join(parts)


def corpus_tokens(tokenizer, n_tokens: int, text_file: str | None = None, corpus: str = "stdlib") -> list[int]:
    """`n_tokens` ids of real text: `text_file` if given, else the standard library's sources or docs."""
    if text_file:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"Cannot read {text_file} as UTF-8 text ({e}).") from None
    elif corpus == "docs":
        text = docs_text(min_chars=n_tokens * 5)
    else:
        text = stdlib_text(min_chars=n_tokens * 6)
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos, special=False)
    if len(ids) < n_tokens:
        raise UsageError(f"The text has {len(ids)} tokens; the benchmark needs {n_tokens}: pass a longer --text file.")
    return ids[:n_tokens]
