"""Reading ingested files: each kind's text, PDF pages, every refusal as one sentence, token -> char offsets."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cli_helpers import assert_one_sentence, run_cli
from edgectx.chat.documents import char_span, page_of, read_document, token_char_offsets
from edgectx.errors import DocumentError
from tiny_gguf import write_tiny_gguf


def make_pdf(pages: list[list[str] | None]) -> bytes:
    """A minimal valid PDF written by hand: each page shows its lines in Helvetica; None is a page that only
    paints a rectangle (what a scanned page is to a text extractor)."""
    n = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        if lines is None:
            content = b"0.2 0.2 0.2 rg 72 72 400 600 re f"
        else:
            content = b"BT /F1 12 Tf 14 TL 72 720 Td " + b" T* ".join(b"(%s) Tj" % line.encode("latin-1") for line in lines) + b" ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    out = bytearray(b"%PDF-1.4\n")
    starts = []
    for number, body in enumerate(objects, 1):
        starts.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % s for s in starts)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


TWO_PAGES = [["Quarterly report", "Revenue grew by nine percent"], ["Second page words", "Closing remarks"]]


def encrypted_pdf(user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(TWO_PAGES))))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def refusal(path: Path, *words: str, **kwargs) -> str:
    with pytest.raises(DocumentError) as info:
        read_document(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, message
    return message


# --- text-like files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [("notes.txt", "text"), ("README.md", "markdown"), ("guide.rst", "markdown"),
                                        ("main.py", "code"), ("lib.rs", "code"), ("Makefile", "code"),
                                        ("data.weird-ext", "text")])
def test_kind_from_name_and_text_read_exactly(tmp_path, name, kind):
    text = "Première ligne — 世界 🎉\n\tindented line\nlast line without newline"
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    doc = read_document(path)
    assert (doc.kind, doc.text, doc.path, doc.page_starts) == (kind, text, path, ())
    assert doc.size_bytes == len(text.encode("utf-8"))
    assert doc.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert page_of(doc, 5) is None


def test_shebang_script_without_extension_is_code(tmp_path):
    path = tmp_path / "deploy"
    path.write_text("#!/bin/sh\necho hi\n")
    assert read_document(path).kind == "code"


def test_line_endings_normalized_and_hash_of_raw_bytes(tmp_path):
    raw = b"one\r\ntwo\rthree\n\r\nfour"
    path = tmp_path / "crlf.txt"
    path.write_bytes(raw)
    doc = read_document(path)
    assert doc.text == "one\ntwo\nthree\n\nfour"
    assert doc.sha256 == hashlib.sha256(raw).hexdigest() and doc.size_bytes == len(raw)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_byte_order_marks(tmp_path, encoding):
    text = "Ünïcödé 世界 🎉\r\nsecond line"
    raw = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # these codecs write no BOM: add the matching one
        raw = ("\ufeff" + text).encode(encoding)
    path = tmp_path / "bom.txt"
    path.write_bytes(raw)
    doc = read_document(path)
    assert doc.text == "Ünïcödé 世界 🎉\nsecond line"  # BOM dropped, CRLF normalized
    assert doc.size_bytes == len(raw)


def test_utf16_without_bom_gets_its_own_sentence(tmp_path):
    path = tmp_path / "no-bom.txt"
    path.write_bytes("plain words in utf-16 without a mark\n".encode("utf-16-le") * 4)
    refusal(path, "UTF-16", "byte-order mark")


def test_latin1_text_is_asked_to_be_converted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Le café est très bon à Zürich.\n".encode("latin-1") * 20)
    refusal(path, "not UTF-8", "iconv")


# --- PDF ----------------------------------------------------------------------------------------------------

def test_pdf_pages_text_and_page_of(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(TWO_PAGES))
    doc = read_document(path)
    assert doc.kind == "pdf" and doc.num_pages == 2
    assert doc.text.startswith("--- page 1 of 2 ---\n\n")
    for line in TWO_PAGES[0] + TWO_PAGES[1]:
        assert line in doc.text
    assert doc.text.index("Revenue") < doc.page_starts[1] == doc.text.index("--- page 2 of 2 ---") < doc.text.index("Second")
    assert page_of(doc, 0) == 1 and page_of(doc, doc.text.index("Revenue")) == 1
    assert page_of(doc, doc.page_starts[1] - 1) == 1 and page_of(doc, doc.page_starts[1]) == 2
    assert page_of(doc, doc.text.index("Closing")) == 2 and page_of(doc, len(doc.text)) == 2
    with pytest.raises(ValueError):
        page_of(doc, len(doc.text) + 1)


def test_pdf_detected_by_header_without_extension(tmp_path):
    path = tmp_path / "download"
    path.write_bytes(make_pdf(TWO_PAGES))
    assert read_document(path).kind == "pdf"


def test_encrypted_pdf_with_empty_user_password_opens(tmp_path):
    path = tmp_path / "locked-for-edits.pdf"
    path.write_bytes(encrypted_pdf(""))
    assert "Second page words" in read_document(path).text


def test_encrypted_pdf_with_password_refused(tmp_path):
    path = tmp_path / "secret.pdf"
    path.write_bytes(encrypted_pdf("hunter2"))
    refusal(path, "encrypted with a password", "without one")


def test_truncated_renamed_and_garbage_pdfs_refused(tmp_path):
    data = make_pdf(TWO_PAGES)
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(data[: len(data) // 2])
    refusal(truncated, "truncated")
    renamed = tmp_path / "photo.pdf"
    renamed.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    refusal(renamed, "not a PDF")
    garbage = tmp_path / "garbage.pdf"
    garbage.write_bytes(b"%PDF-1.7\n" + random.Random(1).randbytes(3000) + b"\n%%EOF\n")
    refusal(garbage, "damaged")


def test_pdf_without_text_asks_for_ocr(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None, None]))
    refusal(path, "no extractable text", "2 pages are", "OCR")


def test_pdf_with_one_blank_page_keeps_page_numbers(tmp_path):
    path = tmp_path / "mixed.pdf"
    path.write_bytes(make_pdf([None, ["Only the second page has text"]]))
    doc = read_document(path)
    assert doc.num_pages == 2 and page_of(doc, doc.text.index("Only")) == 2


# --- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, data, words", [
    ("random.txt", random.Random(0).randbytes(4096), ("binary",)),
    ("random-no-nul.txt", random.Random(4).randbytes(4096).replace(b"\0", b"\1"), ("binary",)),
    ("a.out", b"\x7fELF\x02\x01\x01\x00" + bytes(56) + random.Random(2).randbytes(512), ("binary", "ELF")),
    ("image.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + random.Random(3).randbytes(200), ("binary", "PNG")),
    ("report.docx", b"PK\x03\x04\x14\x00\x06\x00" + random.Random(5).randbytes(300), ("binary", "ZIP", "export it")),
    ("controls.txt", b"ab\x01\x02\x03\x04cd\x05\x06" * 300, ("binary",)),  # no NUL, valid UTF-8, yet not text
])
def test_binary_refused(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    refusal(path, *words)


def test_text_with_some_ansi_colour_is_still_text(tmp_path):
    path = tmp_path / "build.log"
    path.write_text("\x1b[31mERROR\x1b[0m compile failed in module foo\n" * 50)
    assert read_document(path).text.startswith("\x1b[31mERROR")


def test_too_large_names_size_limit_and_flag(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 101)
    refusal(path, "101 bytes", "100 bytes limit", "--max-file-mib 1", max_bytes=100)
    assert read_document(path, max_bytes=101).text == "x" * 101
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:
        f.truncate(3 * 2**20 + 5)  # sparse: the size check must come before reading
    refusal(huge, "3.0 MiB", "2.0 MiB limit", "--max-file-mib 4", max_bytes=2 * 2**20)


def test_pipe_is_read_and_limited(tmp_path):
    fifo = tmp_path / "pipe"
    for payload, limit in ((b"words through a pipe\n", 1000), (b"y" * 5000, 1000)):
        os.mkfifo(fifo)
        writer = threading.Thread(target=fifo.write_bytes, args=(payload,), daemon=True)  # fits the pipe's buffer
        writer.start()
        if len(payload) <= limit:
            assert read_document(fifo, max_bytes=limit).text == payload.decode()
        else:
            refusal(fifo, "over the 1000 bytes limit", "--max-file-mib", max_bytes=limit)
        writer.join(timeout=10)
        assert not writer.is_alive()
        fifo.unlink()


def test_empty_whitespace_missing_directory_device(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    refusal(empty, "is empty")
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b" \r\n\t\n")
    refusal(blank, "only whitespace")
    refusal(tmp_path / "missing.txt", "not found")
    refusal(tmp_path, "is a directory")
    refusal(Path("/dev/null"), "not a regular file")


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "private.txt"
    path.write_text("secret")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the open fail as it would for a user
        real_open = os.open

        def denied(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(os, "open", denied)
    refusal(path, "Permission denied", "chmod")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=2048),
                      st.binary(max_size=2048).map(lambda b: b"%PDF-1.4\n" + b + b"\n%%EOF\n"),
                      st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)
                      .map(lambda edits: _corrupt(make_pdf(TWO_PAGES), edits))),
       suffix=st.sampled_from([".txt", ".pdf", ".py", ""]))
def test_any_bytes_give_a_document_or_one_sentence(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        doc = read_document(path)
    except DocumentError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert doc.text.strip() and "\r" not in doc.text
        doc.text.encode("utf-8")  # no lone surrogates: the text can be tokenized


def _corrupt(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        out[where % len(out)] = value
    return bytes(out)


# --- token -> char offsets ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from edgectx.model.tokenizer import Tokenizer

    return Tokenizer(embedded_model)


MIXED = "Café naïve déjà vu — 世界你好, 東京! Emoji: 🎉👍🏽 🇫🇷\nZürich  résumé\tend 😀"


def test_token_spans_rebuild_the_text_and_whole_tokens_match(tokenizer):
    ids = [tokenizer.bos_id] + tokenizer.encode(MIXED, special=False)
    pieces = [tokenizer.piece(i) for i in ids]
    offsets = token_char_offsets(tokenizer, MIXED, ids)
    assert len(offsets) == len(ids) and offsets[:2] == [0, 0]  # the BOS takes no text
    assert offsets == sorted(offsets)
    spans = [char_span(offsets, len(MIXED), k, k + 1) for k in range(len(ids))]
    assert "".join(MIXED[s:e] for s, e in spans) == MIXED
    n_whole = n_split = 0
    for piece, (start, end) in zip(pieces, spans):
        try:
            piece_text = piece.decode("utf-8")
        except UnicodeDecodeError:
            n_split += 1
            continue
        n_whole += 1
        assert MIXED[start:end] == piece_text
    assert n_split >= 3 and n_whole >= 10  # the text exercises tokens that split characters
    assert char_span(offsets, len(MIXED), 0, len(ids)) == (0, len(MIXED))


def test_split_character_belongs_to_the_last_token_that_starts_inside_it(tokenizer):
    text = "a世b"
    ids = tokenizer.encode(text, special=False)
    assert [tokenizer.piece(i) for i in ids][1:3] == [b"\xe4\xb8", b"\x96"]  # this vocab splits 世 in two
    offsets = token_char_offsets(tokenizer, text, ids)
    assert offsets == [0, 1, 1, 2]
    assert char_span(offsets, len(text), 1, 3) == (1, 2)


def test_offsets_of_a_prefix_and_mismatched_ids(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, special=False)
    offsets = token_char_offsets(tokenizer, text, ids[:4])
    assert offsets == token_char_offsets(tokenizer, text, ids)[:4]
    with pytest.raises(ValueError, match="not this text's tokens"):
        token_char_offsets(tokenizer, "Something else entirely.", ids)
    with pytest.raises(ValueError):
        char_span(offsets, len(text), 3, 5)


class SentencePieceLike:
    """Pieces as a SentencePiece vocab renders them: a dummy space before the first word; 0 is a control token."""

    PIECES = {0: b"", 1: b" Hello", 2: b" world", 3: b"!"}

    def piece(self, token_id: int) -> bytes:
        return self.PIECES[token_id]

    def token_text(self, token_id: int) -> str:
        return "<s>" if token_id == 0 else self.PIECES[token_id].decode()


def test_sentencepiece_dummy_prefix_and_control_tokens():
    tok = SentencePieceLike()
    assert token_char_offsets(tok, "Hello world!", [0, 1, 2, 3]) == [0, 0, 5, 11]
    assert token_char_offsets(tok, "<s>Hello world!", [0, 1, 2, 3]) == [0, 3, 8, 14]  # control token written out
    with pytest.raises(ValueError):  # the dummy space is only forgiven at the start of a text fragment
        token_char_offsets(tok, "Helloworld!", [1, 2, 3])


# --- command line -------------------------------------------------------------------------------------------

def test_heads_train_refuses_bad_files_with_one_sentence(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=2, context_length=1024)
    elf = tmp_path / "program"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(400))
    result = run_cli("heads", "train", "--model", str(model), "--text", str(elf))
    assert_one_sentence(result, "binary", "ELF", str(elf))
    assert result.returncode == 2
    big = tmp_path / "big.txt"
    big.write_text("word " * 400)
    result = run_cli("heads", "train", "--model", str(model), "--text", str(big), "--max-file-mib", "0.001")
    assert_one_sentence(result, "2.0 KiB", "1.0 KiB limit", "--max-file-mib 1")
    assert result.returncode == 2
