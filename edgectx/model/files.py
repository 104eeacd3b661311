"""Look at a model path before trusting it: what it is, and its first bytes, as one sentence when it is wrong.

A FIFO blocks `open()` until some writer appears and a device may never end, so a model path must be a
regular file (or a directory: a Hugging Face checkpoint). Nothing here opens a path for reading without
O_NONBLOCK, and the opened descriptor is fstat-ed before a byte is read, so a path swapped for a FIFO after
the check cannot block either. A path that cannot be reached (a folder on the way that cannot be entered)
raises PermissionError from a mere stat: every OSError here becomes a `ModelFileError`.

    kind = path_kind(Path("model.gguf"))     # "file", "dir", or None when missing
    head = read_head(Path("model.gguf"), 8)  # the first 8 bytes of a regular file
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgectx.errors import ModelFileError

_ACCEPTED = "pass a .gguf file or a Hugging Face model directory"


def path_kind(path: Path) -> str | None:
    """'file', 'dir' or None (missing); ModelFileError for anything else or a path that cannot be reached."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _cannot_open(path, e) from None
    if stat.S_ISDIR(mode):
        return "dir"
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    return "file"


def read_head(path: Path, n_bytes: int) -> bytes:
    """The first `n_bytes` of a regular file (fewer when it is shorter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelFileError(f"Model file not found: {path}: {_ACCEPTED} (`edgectx models` lists those found).") from None
    except OSError as e:
        raise _cannot_open(path, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ModelFileError(f"{path} is a directory, not a model file: pass the path of a .gguf file inside it.")
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return os.read(fd, n_bytes)  # a regular file ignores O_NONBLOCK
    except OSError as e:
        raise _cannot_open(path, e) from None
    finally:
        os.close(fd)


def _not_regular(path: Path, mode: int) -> ModelFileError:
    what = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return ModelFileError(f"{path} is {what}, not a model file: {_ACCEPTED}.")


def _cannot_open(path: Path, error: OSError) -> ModelFileError:
    if isinstance(error, PermissionError):
        return ModelFileError(f"Permission denied opening the model {path}: make it (and every folder above it) readable, "
                              "or copy the model somewhere readable.")
    return ModelFileError(f"Cannot open the model {path} ({error.strerror or error}): {_ACCEPTED}.")
