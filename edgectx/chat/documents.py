"""Read a file a user ingests (plain text, Markdown, source code, PDF) into one text to tokenize and cite.

Text files are UTF-8 (with or without a BOM), or UTF-16/UTF-32 with a BOM. The BOM is dropped and line
endings are normalized to "\\n", so every char offset edgectx reports (citations, `page_of`) refers to
`Document.text`, not to the bytes on disk. A PDF becomes the text of each page under a "--- page N of M ---"
header; `Document.page_starts` maps a char offset back to its page. Anything that cannot be read as text
(missing, a directory, unreadable, empty, binary, too large, an encrypted or damaged or scanned PDF) raises
`DocumentError` with one sentence naming the file and what to do.

A file is opened with O_NONBLOCK and fstat-ed before a byte is read, so nothing here blocks on opening. A pipe
is read (`--text <(zcat a.gz)`) when a program writes to it; a named pipe that nothing opens for writing
within PIPE_WRITER_WAIT_S is refused instead of waited on forever.

    doc = read_document("report.pdf")
    page_of(doc, doc.text.index("revenue"))  # -> 3
"""

from __future__ import annotations

import bisect
import codecs
import errno
import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgectx.errors import DocumentError
from edgectx.chat.token_spans import char_span, token_char_offsets

__all__ = ["DEFAULT_MAX_BYTES", "Document", "char_span", "page_of", "read_document", "token_char_offsets"]

DEFAULT_MAX_BYTES = 64 * 2**20
MAX_BYTES_FLAG = "--max-file-mib"  # the command-line flag that raises the limit, named in the refusal

Kind = Literal["text", "markdown", "code", "pdf"]

_MARKDOWN = {".md", ".markdown", ".mdown", ".mkd", ".rst"}
_CODE = {
    ".py", ".pyi", ".pyx", ".ipynb", ".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".hxx", ".cu", ".cuh",
    ".m", ".mm", ".rs", ".go", ".java", ".kt", ".kts", ".scala", ".groovy", ".gradle", ".swift", ".cs", ".fs",
    ".vb", ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".vue", ".svelte", ".rb", ".php", ".pl", ".pm", ".lua",
    ".r", ".jl", ".dart", ".ex", ".exs", ".erl", ".hrl", ".hs", ".ml", ".mli", ".clj", ".cljs", ".lisp", ".el",
    ".scm", ".zig", ".nim", ".v", ".sv", ".vhd", ".vhdl", ".asm", ".s", ".f90", ".f", ".sh", ".bash", ".zsh",
    ".fish", ".ps1", ".bat", ".cmd", ".sql", ".proto", ".graphql", ".glsl", ".hlsl", ".wgsl", ".metal",
    ".html", ".htm", ".css", ".scss", ".sass", ".less", ".xml", ".json", ".jsonc", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".conf", ".cmake", ".mk", ".tf", ".nix", ".tex",
}
_CODE_NAMES = {"makefile", "gnumakefile", "dockerfile", "containerfile", "cmakelists.txt", "justfile",
               "rakefile", "gemfile", "jenkinsfile", "vagrantfile", "build", "workspace"}

_BOMS = (  # UTF-32 LE first: its BOM begins with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters text does not contain; tab, newlines, form feed and ESC (ANSI colour in logs) are allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")
_CONTROL_SAMPLE_CHARS = 65536
_MAX_CONTROL_SHARE = 0.05
_SIGNATURES = (
    (b"\x7fELF", "an ELF executable"), (b"MZ", "a Windows executable"), (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a ZIP archive, as .docx, .odt and .epub files are"),
    (b"GGUF", "a GGUF model"),
)
_ACCEPTED = "pass a text, Markdown, source code or PDF file"
PIPE_WRITER_WAIT_S = 2.0  # a writer started with the command (`<(zcat a.gz)`) holds its end long before this
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    """One ingested file as text; `kind` says how it was read ("pdf") or what it holds (text, markdown, code)."""

    path: Path
    kind: Kind
    text: str  # BOM dropped, line endings "\n": all char offsets refer to this text
    sha256: str  # hex digest of the file's bytes as read, before any normalization
    size_bytes: int
    page_starts: tuple[int, ...] = ()  # PDFs: char offset where each page (its header) starts; () otherwise

    @property
    def num_pages(self) -> int:
        return len(self.page_starts)


def read_document(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Document:
    """Read one file into a Document, or raise DocumentError with one sentence saying why not and what to do."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    path = Path(path).expanduser()
    raw = _read_bytes(path, max_bytes)
    if not raw:
        raise DocumentError(f"{path} is empty: {_ACCEPTED} with text in it.")
    common = dict(path=path, sha256=hashlib.sha256(raw).hexdigest(), size_bytes=len(raw))
    if path.suffix.lower() == ".pdf" or raw.startswith(b"%PDF-"):
        from edgectx.chat.pdf import read_pdf_pages

        text, page_starts = _join_pages(read_pdf_pages(path, raw))
        return Document(kind="pdf", text=text, page_starts=page_starts, **common)
    text = _normalize_newlines(_decode_text(path, raw))
    if not text.strip():
        raise DocumentError(f"{path} holds only whitespace: {_ACCEPTED} with text in it.")
    return Document(kind=_text_kind(path, text), text=text, **common)


def page_of(doc: Document, char_offset: int) -> int | None:
    """The 1-based page holding `char_offset` of `doc.text`, or None for a document without pages."""
    if not 0 <= char_offset <= len(doc.text):
        raise ValueError(f"char offset {char_offset} is outside the text (0..{len(doc.text)})")
    if not doc.page_starts:
        return None
    return bisect.bisect_right(doc.page_starts, char_offset)


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < 2**20:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def _too_large(path: Path, n_bytes: int | None, max_bytes: int) -> DocumentError:
    """`n_bytes` None: a pipe, read only up to the limit, so its full size is unknown."""
    limit = f"the {_size(max_bytes)} limit for one document"
    if n_bytes is None:
        return DocumentError(f"{path} is over {limit}: raise the limit with {MAX_BYTES_FLAG} or split the file.")
    need_mib = -(-n_bytes // 2**20)  # rounded up
    return DocumentError(f"{path} is {_size(n_bytes)}, over {limit}: raise the limit with {MAX_BYTES_FLAG} {need_mib} or split the file.")


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    not_regular = DocumentError(f"{path} is not a regular file (a device or socket): {_ACCEPTED}.")
    try:
        # O_NONBLOCK: a plain open of a named pipe blocks until a writer appears, perhaps never
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DocumentError(f"{path} not found: check the path.") from None
    except PermissionError:
        raise DocumentError(f"Permission denied reading {path}: make it readable (chmod u+r) or copy it somewhere readable.") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket cannot be opened
            raise not_regular from None
        raise DocumentError(f"Cannot read {path} ({e.strerror or e}): check that it is a readable file.") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DocumentError(f"{path} is a directory: pass the files inside it.")
        if stat.S_ISFIFO(st.st_mode):
            first = _first_from_pipe(path, fd, max_bytes + 1)
            raw = first + _read_up_to(fd, max_bytes + 1 - len(first))
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > max_bytes:
                raise _too_large(path, st.st_size, max_bytes)
            raw = _read_up_to(fd, max_bytes + 1)  # the file may have grown since fstat
        else:
            raise not_regular
    except OSError as e:
        raise DocumentError(f"Cannot read {path} ({e.strerror or e}): check that it is a readable file.") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise _too_large(path, None, max_bytes)
    return raw


def _first_from_pipe(path: Path, fd: int, limit: int) -> bytes:
    """What a pipe holds already, once a writer has opened it; then `fd` blocks again, as a pipe read should.
    A non-blocking read tells the cases apart: bytes; EAGAIN (a writer, nothing written yet); or end of file
    (no writer yet, or one that wrote nothing)."""
    deadline = time.monotonic() + PIPE_WRITER_WAIT_S
    while True:
        try:
            first = os.read(fd, min(limit, _READ_BYTES))
        except BlockingIOError:
            first = b""
            break
        if first:
            break
        if time.monotonic() > deadline:
            raise DocumentError(f"{path} is a named pipe that nothing writes to: start the program that writes it first, "
                                f"or {_ACCEPTED}.")
        time.sleep(0.02)
    os.set_blocking(fd, True)
    return first


def _read_up_to(fd: int, limit: int) -> bytes:
    """Bytes from `fd` until end of file or `limit` (no buffer of `limit` bytes up front: the limit may be huge)."""
    parts, n = [], 0
    while n < limit:
        piece = os.read(fd, min(limit - n, _READ_BYTES))
        if not piece:
            break
        parts.append(piece)
        n += len(piece)
    return b"".join(parts)


def _decode_text(path: Path, raw: bytes) -> str:
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise DocumentError(f"{path} starts with a {encoding.upper().removesuffix('-SIG')} byte-order mark but "
                                    f"byte {e.start} is invalid: if it is text, re-save it as UTF-8.") from None
            if _control_share(text[:_CONTROL_SAMPLE_CHARS]) > _MAX_CONTROL_SHARE:
                raise _binary(path, raw)
            return text
    if b"\0" in raw:
        if _looks_utf16_without_bom(raw[:4096]):
            raise DocumentError(f"{path} looks like UTF-16 text without a byte-order mark: save it as UTF-8 and try again.")
        raise _binary(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if _control_share(raw[:_CONTROL_SAMPLE_CHARS].decode("latin-1")) > _MAX_CONTROL_SHARE:
            raise _binary(path, raw) from None
        raise DocumentError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}; perhaps Latin-1 or Windows-1252): "
                            f"convert it to UTF-8, for example with iconv, and try again.") from None
    if _control_share(text[:_CONTROL_SAMPLE_CHARS]) > _MAX_CONTROL_SHARE:
        raise _binary(path, raw)
    return text


def _control_share(sample: str) -> float:
    return len(_CONTROL.findall(sample)) / max(1, len(sample))


def _looks_utf16_without_bom(sample: bytes) -> bool:
    n_pairs = len(sample) // 2
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    return n_pairs >= 8 and min(even, odd) < 0.05 * n_pairs and max(even, odd) > 0.3 * n_pairs


def _binary(path: Path, raw: bytes) -> DocumentError:
    what = next((f" ({name})" for magic, name in _SIGNATURES if raw.startswith(magic)), "")
    advice = "export it as PDF or plain text first" if raw.startswith(b"PK\x03\x04") else _ACCEPTED
    return DocumentError(f"{path} looks binary{what}, not text: {advice}.")


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_kind(path: Path, text: str) -> Kind:
    suffix = path.suffix.lower()
    if suffix in _MARKDOWN:
        return "markdown"
    if suffix in _CODE or path.name.lower() in _CODE_NAMES or (not suffix and text.startswith("#!")):
        return "code"
    return "text"


def _join_pages(pages: list[str]) -> tuple[str, tuple[int, ...]]:
    """Each page's text under a "--- page N of M ---" header, pages apart by a blank line."""
    parts: list[str] = []
    starts: list[int] = []
    length = 0
    for number, page in enumerate(pages, 1):
        if parts:
            parts.append("\n\n")
            length += 2
        starts.append(length)
        block = f"--- page {number} of {len(pages)} ---\n\n{_normalize_newlines(page).strip()}"
        parts.append(block)
        length += len(block)
    return "".join(parts), tuple(starts)
