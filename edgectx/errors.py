"""Errors a user can cause, each carrying one sentence that says what happened and what to do.

The CLI prints `str(error)` and exits with `error.exit_code`; no traceback reaches the user.

    raise ModelFileError(f"{path} is not a GGUF file: pass a .gguf model file.")
"""

from __future__ import annotations


class EdgectxError(Exception):
    """Base of every error that ends a command with a clear sentence instead of a traceback."""

    exit_code = 1


class ModelFileError(EdgectxError):
    """The model file is missing, unreadable, not GGUF, or truncated."""

    exit_code = 2


class UnsupportedModelError(EdgectxError):
    """The file is a valid GGUF but its architecture or tensor types are not supported."""

    exit_code = 3


class UsageError(EdgectxError):
    """A command-line argument or input file is wrong."""

    exit_code = 2


class StoreError(EdgectxError):
    """The conversation database cannot be used: not SQLite, from a newer edgectx, locked, full or damaged;
    or a conversation, document or snapshot id that it does not hold."""


class DocumentError(EdgectxError):
    """A file given to read is missing, unreadable, empty, binary, too large, or a PDF without readable text."""

    exit_code = 2


class SnapshotError(EdgectxError):
    """A snapshot that cannot be written, or read back: missing, damaged, truncated, for another model,
    or written by a newer edgectx. Callers fall back to reading the document again."""

    exit_code = 4
