"""Citations from the memory's retrieval record: token ranges back to a document, its lines and pages."""

from __future__ import annotations

from pathlib import Path

from tui_fakes import FakeEngine

from edgectx.chat.citations import cite
from edgectx.chat.opening import build_opening
from edgectx.chat.documents import Document

TEXT = "".join(f"line {i} of the notes\n" for i in range(1, 41))


def _doc(name="notes.md", text=TEXT, pages=()) -> Document:
    return Document(Path("/docs") / name, "markdown", text, "0" * 64, len(text), page_starts=pages)


def _block(opening, doc_index, first_char, last_char, score=0.5):
    """A retrieval record entry over the tokens of document `doc_index` that cover [first_char, last_char)."""
    base = opening.ends[doc_index - 1] if doc_index else 0
    offsets = opening.offsets[doc_index]
    start = base + offsets.index(first_char)
    end = base + offsets.index(last_char)
    return {"block": 0, "start_token": start, "end_token": end, "score": score}


def test_a_block_becomes_the_file_and_lines_it_covers():
    opening = build_opening(FakeEngine(), [_doc()])
    start = TEXT.index("line 3 ")
    end = TEXT.index("line 5 ")
    (citation,) = cite(opening, [_block(opening, 0, start, end)])
    assert (citation.file, citation.line, citation.end_line, citation.page) == ("notes.md", 3, 4, None)
    assert citation.where == "notes.md:3-4"
    assert citation.text == "line 3 of the notes\nline 4 of the notes\n"


def test_blocks_outside_the_documents_or_none_give_no_citation():
    opening = build_opening(FakeEngine(), [_doc()])
    past = len(opening.ids)
    assert cite(opening, [{"block": 9, "start_token": past, "end_token": past + 128, "score": 0.9}]) == []
    assert cite(opening, []) == [] and cite(None, [{"block": 0, "start_token": 0, "end_token": 10, "score": 1}]) == []
    # The template's system start and the <document> header alone are no passage either.
    header = opening.offsets[0].count(0)  # tokens before the text's first character (and the first one itself)
    assert cite(opening, [{"block": 0, "start_token": 0, "end_token": header - 1, "score": 1}]) == []


def test_two_documents_adjacent_blocks_merge_best_first_and_pdf_pages():
    other = "page one text\n" * 5 + "page two text\n" * 5
    pdf = _doc("report.pdf", other, pages=(0, other.index("page two")))
    opening = build_opening(FakeEngine(), [_doc(), pdf])
    a = _block(opening, 0, TEXT.index("line 10 "), TEXT.index("line 12 "), score=0.2)
    b = _block(opening, 0, TEXT.index("line 12 "), TEXT.index("line 13 "), score=0.3)
    c = _block(opening, 1, other.index("page two"), other.index("page two") + 14, score=0.6)
    first, second = cite(opening, [a, c, b])
    assert (first.file, first.page, first.where) == ("report.pdf", 2, "report.pdf:p2 (line 6)")
    assert (second.line, second.end_line, second.score) == (10, 12, 0.3)  # a and b merged, the better score kept
