"""Citations: which passages of the attached documents the model attended to most while answering.

The long-context memory records, at each retrieval of an answer, the attention mass its queries put on every
block of the context, whether the block was retrieved from the host store or stayed resident (retained tokens,
the window; not the sinks) (`GenerationStats.retrieved`: token ranges with a relevance score, best first,
edgectx.memory.retrieval.RetrievalRecord).
A block that falls inside a document's `<document>` block of the conversation's opening becomes a
citation: the document, the passage's character span in its text, its first line, and its page for a PDF.
Blocks over the conversation's turns, or an answer that retrieved nothing (a context that never evicted),
give no citation: nothing is invented.

    for c in cite(opening, engine.last_stats.retrieved):
        print(c.where, f"{c.score:.2f}", c.text[:60])   # "report.pdf:p12 (line 480)  0.41  The results ..."
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from edgectx.chat.opening import Opening


@dataclass(frozen=True)
class Citation:
    file: str  # the document's file name
    path: str
    start_char: int  # the passage, as a span of the document's text
    end_char: int
    line: int  # the passage's first line, from 1
    end_line: int
    page: int | None  # PDFs: the page the passage starts on, from 1
    score: float  # mean attention mass per retrieval (edgectx.memory.retrieval.RetrievalRecord)
    text: str

    @property
    def where(self) -> str:
        if self.page is not None:
            return f"{self.file}:p{self.page} (line {self.line})"
        return f"{self.file}:{self.line}" if self.line == self.end_line else f"{self.file}:{self.line}-{self.end_line}"


def _doc_span(opening: Opening, doc_index: int, first: int, end: int) -> tuple[int, int]:
    """Character span in document `doc_index`'s text of the opening's tokens [first, end)."""
    base = opening.ends[doc_index - 1] if doc_index else 0
    offsets = opening.offsets[doc_index]
    text_len = len(opening.documents[doc_index].text)
    start = offsets[first - base]
    stop = offsets[end - base] if end - base < len(offsets) else text_len
    return start, stop


def cite(opening: Opening | None, retrieved: list[dict], limit: int = 5) -> list[Citation]:
    """The recorded blocks that lie in the documents, best first, adjacent blocks of one document merged."""
    if opening is None or not retrieved:
        return []
    spans: dict[int, list[tuple[int, int, float]]] = {}
    for block in retrieved:
        base = 0
        for i, end in enumerate(opening.ends):
            first, stop = max(block["start_token"], base), min(block["end_token"], end)
            if first < stop:
                start_char, end_char = _doc_span(opening, i, first, stop)
                if end_char > start_char:  # not just the block's header or closing tag
                    spans.setdefault(i, []).append((start_char, end_char, block["score"]))
            base = end
    merged: list[tuple[int, int, int, float]] = []
    for i, parts in spans.items():
        parts.sort()
        run = list(parts[0])
        for start, stop, score in parts[1:]:
            if start <= run[1]:
                run[1], run[2] = max(run[1], stop), max(run[2], score)
            else:
                merged.append((i, *run))
                run = [start, stop, score]
        merged.append((i, *run))
    merged.sort(key=lambda m: -m[3])
    citations = []
    for i, start, stop, score in merged[:limit]:
        doc = opening.documents[i]
        line = doc.text.count("\n", 0, start) + 1
        end_line = line + doc.text.count("\n", start, max(start, stop - 1))
        page = bisect_right(doc.page_starts, start) if doc.page_starts else None
        citations.append(Citation(doc.path.name, str(doc.path), start, stop, line, end_line, page or None, score,
                                  doc.text[start:stop]))
    return citations
