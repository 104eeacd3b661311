"""The text of each page of a PDF (pypdf), or a DocumentError saying why there is none.

Encrypted PDFs open when the user password is empty (common for "no copying" PDFs) and are refused otherwise.
pypdf's own log lines and warnings are silenced: a user sees either the text or one sentence.

pypdf (strict=False) logs what it cannot parse and goes on, so broken structure often shows up only as pages
without text. A PDF without any text is called scanned (and OCR suggested) only when pypdf read it without
a problem; with problems logged it is one that cannot be read as a PDF: damaged, or not a PDF at all.

    pages = read_pdf_pages(Path("paper.pdf"), Path("paper.pdf").read_bytes())  # ["Abstract ...", "1 Introduction ...", ...]
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from edgectx.errors import DocumentError


def read_pdf_pages(path: Path, raw: bytes) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    encrypted = (f"{path} is encrypted with a password: pass a copy saved without one "
                 f"(for example `qpdf --decrypt --password=... in.pdf out.pdf`).")
    if b"%PDF-" not in raw[:1024]:  # the header may follow a little junk
        raise DocumentError(f"{path} is not a PDF (it has no %PDF header): check that the file is what its name says.")
    if b"%%EOF" not in raw:
        raise DocumentError(f"{path} is a truncated PDF (it has no end-of-file marker): copy or download it again.")
    with _quiet_pypdf() as problems:
        try:
            reader = PdfReader(io.BytesIO(raw), strict=False)
            if reader.is_encrypted and not reader.decrypt(""):
                raise DocumentError(encrypted)
            pages = []
            for number, page in enumerate(reader.pages, 1):
                try:
                    pages.append(page.extract_text() or "")
                except MemoryError:
                    raise
                except Exception as e:
                    raise _unreadable(path, f"page {number}: {_reason(e)}") from None
        except (DocumentError, MemoryError):
            raise
        except FileNotDecryptedError:
            raise DocumentError(encrypted) from None
        except DependencyError:
            raise DocumentError(f"{path} is AES-encrypted, and reading it needs the cryptography package: "
                                f"run `pip install cryptography` or pass a copy saved without encryption.") from None
        except Exception as e:  # pypdf raises many kinds of errors on bad bytes; every one means a damaged file
            raise _unreadable(path, _reason(e)) from None
    if not pages:
        raise DocumentError(f"{path} has no pages: it is damaged or not really a PDF.")
    if not any(page.strip() for page in pages):
        if problems:  # broken structure, not images: pypdf found no text because it could not parse the pages
            raise _unreadable(path, problems[0])
        pages_are = "its page is" if len(pages) == 1 else f"its {len(pages)} pages are"
        raise DocumentError(f"{path} has no extractable text ({pages_are} probably scanned images): "
                            f"run OCR on it first, for example `ocrmypdf in.pdf out.pdf`, and pass the result.")
    # Fonts with broken ToUnicode maps can yield lone surrogates; they would break UTF-8 encoding later.
    return [page.encode("utf-8", errors="replace").decode("utf-8").replace("\0", "") for page in pages]


def _unreadable(path: Path, reason: str) -> DocumentError:
    return DocumentError(f"{path} cannot be read as a PDF: it is damaged or not a PDF ({reason}); "
                         f"if it opens in a viewer, print it to a new PDF and pass that.")


def _reason(error: Exception | str) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 100 else text[:97] + "..."


class _Problems(logging.Handler):
    """Collects what pypdf logs (it logs, rather than raises, what it cannot parse under strict=False)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(_reason(record.getMessage()))


@contextlib.contextmanager
def _quiet_pypdf():
    """pypdf's problems as a list of messages, kept off stderr."""
    logger = logging.getLogger("pypdf")
    saved = logger.level, logger.propagate
    problems = _Problems()
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(problems)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield problems.messages
    finally:
        logger.removeHandler(problems)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
