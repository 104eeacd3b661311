"""`edgectx bench recall`: does the memory bring back the passage a question needs, at every depth?

Needle tasks (edgectx.bench.needles, RULER-style; SCBench-style for several questions in one conversation)
are asked through the path a user takes with `chat --doc`: the document opens the conversation
(edgectx.chat.opening), a ChatSession sends each question, the answer is greedy. Two figures per needle:

- **retrieval recall**, read from the memory's own state when the answer's first token was decided, i.e. the
  attention context that the prompt's last chunk attended to (each layer's `Assembly`: resident sinks,
  retained tokens and window, plus the blocks retrieved for that chunk, per KV head). `visible`: the share
  of (layer, KV head) pairs that held every token of the needle's sentence; `resident`: the share that held
  it in the resident tiers alone; `coverage`: the mean share of its tokens held. The needle is *recalled*
  when `visible` > 0.5. The decode steps that follow reuse that chunk's retrieved blocks for
  `retrieve_every` steps (their resident tiers may lose tokens when the chunk commits and evicts).
  `rank`: the needle's place among the passages the answer cites (edgectx.chat.citations over
  `engine.last_stats.retrieved`, what `chat` shows), or None when it is not among them.
- **answer accuracy**: the share of wanted values (or the line, for `where`) in the answer as whole numbers.
  Full attention answers the same questions where the conversation fits the trained context (`full_accuracy`).

Documents of one length share one stretch of the haystack (needles, keys and values change with the trial),
so the memory reads the text before the first needle once: a lossless (fp16) snapshot of the memory at the
last chunk boundary before each sample's first needle is restored, and only the rest is read. Chunks fall
where a plain read puts them, so the figures are those of reading each document from the start.

    result = run_recall(engine, RecallGrid([4096], [0.25, 0.75], trials=2, tasks=["single"]), MemoryConfig())
    result["cells"][0]["recall"], result["cells"][0]["accuracy"]
"""

from __future__ import annotations

import bisect
import hashlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgectx.bench.corpus import docs_text, stdlib_text
from edgectx.bench.needles import Haystack, Placed, Task, grade, make_task
from edgectx.bench.recall_log import SampleLog, sample_key
from edgectx.chat.citations import cite
from edgectx.chat.documents import Document
from edgectx.chat.opening import Opening, build_opening, system_content
from edgectx.chat.session import ChatSession
from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig
from edgectx.memory.context import ContextMemory
from edgectx.model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, top_k=0, top_p=1.0, repeat_penalty=1.0)


@dataclass(frozen=True)
class RecallGrid:
    contexts: list[int]  # prompt tokens at the first question (document, template and question)
    depths: list[float]  # where the (first) asked needle goes: a fraction of the document's tokens
    trials: int = 1
    tasks: list[str] = field(default_factory=lambda: ["single"])
    seed: int = 0
    answer_tokens: int = 24  # greedy tokens per answer
    questions: int = 3  # multiquestion's questions in one conversation
    full: bool = True  # also full attention where the conversation fits the trained context


@dataclass
class Sample:
    task: Task
    context: int
    depth: float
    trial: int
    placed: Placed
    opening: Opening
    prompt_tokens: int
    spans: list[tuple[int, int]]  # per needle: its sentence's tokens [start, end) in opening.ids
    doc_tokens: tuple[int, int]  # the document text's tokens [start, end) in opening.ids
    shared: int = 0  # tokens read before it that other samples share (a chunk boundary)
    results: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sample_key(self.task.name, self.context, self.depth, self.trial, self.task.needles)


def visibility(memory, start: int, end: int) -> dict | None:
    """How much of tokens [start, end) the last forward's attention context held, over layers and KV heads;
    None for plain full attention (which holds everything)."""
    if not isinstance(memory, ContextMemory):
        return None
    n_span = end - start
    visible = resident = coverage = pairs = 0
    for layer in memory.layers:
        asm = layer.asm
        n = asm.length
        hit = (asm.idx[:, :n] >= start) & (asm.idx[:, :n] < end)  # (n_kv, n) columns holding the span's tokens
        if asm.valid is not None:
            hit &= asm.valid[:, :n]  # a resident copy of a retrieved token is masked; the retrieved copy counts
        from_resident = torch.zeros(n, dtype=torch.bool)
        from_resident[: asm.n_resident] = True  # columns [n_resident, n_built) are retrieved blocks
        from_resident[asm.n_built :] = True
        count = hit.sum(dim=1)
        visible += int((count == n_span).sum())
        resident += int(((hit & from_resident.to(hit.device)).sum(dim=1) == n_span).sum())
        coverage += float(count.sum()) / n_span
        pairs += hit.shape[0]
    return {"visible": visible / pairs, "resident": resident / pairs, "coverage": coverage / pairs,
            "recalled": visible / pairs > 0.5}


def _haystack_text(texts: list[str] | None, corpus: str, n_tokens: int) -> tuple[str, str, str]:
    """The text, its name in the results, and the file name the document opens with."""
    if texts:
        parts = []
        for name in texts:
            try:
                parts.append(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"Cannot read {name} as UTF-8 text ({e}).") from None
        names = [Path(t).name for t in texts]
        label = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} files)"
        return "\n\n".join(parts), label, names[0]
    if corpus == "stdlib":
        return stdlib_text(min_chars=n_tokens * 6), "python-stdlib", "python-stdlib.py"
    return docs_text(min_chars=n_tokens * 5), "python-docs", "python-docs.txt"


def _prompt_tokens(engine: Engine, opening: Opening, question: str) -> int:
    """Tokens the first question's prompt takes, as ChatSession builds it after the opening."""
    messages = [{"role": "system", "content": system_content(opening.blocks, None)}, {"role": "user", "content": question}]
    text = engine.template.render(messages, add_generation_prompt=True)
    return len(opening.ids) + len(engine.tokenizer.encode(text[len(opening.text) :]))


def build_sample(engine: Engine, hay: Haystack, task: Task, context: int, depth: float, trial: int, start: int,
                 name: str) -> Sample:
    """The document of `task`'s needles whose first prompt takes at most `context` tokens (a few fewer where
    tokens merge differently at the cut), with each needle's token span."""
    probe = build_opening(engine, [Document(Path(name), "text", "x", "0" * 64, 1)])
    n_doc = context - (_prompt_tokens(engine, probe, task.questions[0].text) - 1)  # less the template and question
    if n_doc <= sum(len(n.sentence) + 1 for n in task.needles):  # at least a token of haystack per character of needle
        raise UsageError(f"--context {context:,} leaves too few tokens for the {task.name} task's document once the "
                         "template and the question are in: raise --context.")
    for _ in range(4):  # tokens may merge differently where the text is cut and the needles go in
        placed = hay.document(n_doc, task.needles, start)
        opening = build_opening(engine, [Document(Path(name), "text", placed.text, "0" * 64, len(placed.text.encode()))])
        n_prompt = _prompt_tokens(engine, opening, task.questions[0].text)
        if n_prompt <= context:
            break
        n_doc -= n_prompt - context
    else:
        raise UsageError(f"No document fits a {context:,}-token prompt with this text: raise --context.")
    offsets = opening.offsets[0]
    spans = []
    for i, needle in enumerate(task.needles):
        a, b = placed.span(i, needle)
        spans.append((bisect.bisect_right(offsets, a) - 1, bisect.bisect_left(offsets, b)))
    doc_tokens = (bisect.bisect_right(offsets, 0) - 1, bisect.bisect_left(offsets, len(placed.text)))
    return Sample(task, context, depth, trial, placed, opening, n_prompt, spans, doc_tokens)


def _ask(engine: Engine, sample: Sample, answer_tokens: int) -> list[dict]:
    """Send the sample's questions in one conversation over what the engine holds (the opening)."""
    chat = ChatSession(engine, opening=sample.opening)
    out = []
    for q_index, question in enumerate(sample.task.questions):
        seen: list[dict | None] = []

        def capture(done: int, total: int) -> None:
            if done == total:  # the prompt's last chunk: what the answer's first token is decided from
                seen[:] = [visibility(engine.memory, *sample.spans[i]) for i in question.needles]

        answer = "".join(chat.send(question.text, GREEDY, max_tokens=answer_tokens, progress=capture))
        citations = cite(sample.opening, engine.last_stats.retrieved, limit=len(engine.last_stats.retrieved))
        needles = []
        for i, vis in zip(question.needles, seen):
            a, b = sample.placed.span(i, sample.task.needles[i])
            rank = next((r for r, c in enumerate(citations, 1) if c.start_char < b and a < c.end_char), None)
            needles.append({"needle": i, **vis, "rank": rank} if vis is not None else {"needle": i})  # None: full attention
        out.append({"question": q_index, "answer": answer, "score": grade(question, answer, sample.placed, sample.task),
                    "needles": needles})
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _read_shared(engine: Engine, samples: list[Sample], chunk: int):
    """Yield each sample with the engine's memory holding exactly its opening, reading shared text once: a
    lossless snapshot at the last chunk boundary before the sample's first needle is restored for the next."""
    if not samples:
        return
    ref = max(samples, key=lambda s: min(a for a, _ in s.spans))
    for s in samples:
        first_needle = min(a for a, _ in s.spans)
        s.shared = min(first_needle, _common_prefix(s.opening.ids, ref.opening.ids)) // chunk * chunk
    order = sorted(samples, key=lambda s: s.shared)
    with tempfile.TemporaryDirectory(prefix="edgectx-recall-") as tmp:
        path = Path(tmp) / "shared.ectx"
        engine.reset()
        done = saved = 0
        for i, s in enumerate(order):
            if i:  # back to the shared text alone
                engine.restore(path) if saved else engine.reset()
            if s.shared > done:
                engine.prefill(ref.opening.ids[done : s.shared])
                done = s.shared
            if i + 1 < len(order) and done and saved != done:
                engine.snapshot(path, codec="fp16")
                saved = done
            engine.prefill(s.opening.ids[done:])
            yield s


def _read_full(engine: Engine, samples: list[Sample]):
    """Full attention: documents with their first needle latest first, each reusing the text it shares with the
    one before (`Engine.sync`, as a chat turn does; full attention forgets exactly)."""
    for s in sorted(samples, key=lambda s: -min(a for a, _ in s.spans)):
        engine.sync(s.opening.ids)
        yield s


def _read_each(engine: Engine, samples: list[Sample]):
    for s in samples:
        engine.reset()
        engine.prefill(s.opening.ids)
        yield s


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _figures(questions: list[dict], full: list[dict] | None) -> dict:
    """Recall and accuracy over a list of answered questions (each over its needles)."""
    needles = [n for q in questions for n in q["needles"] if "visible" in n]
    ranks = [n["rank"] for n in needles if n["rank"] is not None]
    return {
        "recall": _mean([float(n["recalled"]) for n in needles]),
        "visible": _mean([n["visible"] for n in needles]),
        "resident": _mean([n["resident"] for n in needles]),
        "coverage": _mean([n["coverage"] for n in needles]),
        "cited": _mean([float(n["rank"] is not None) for n in needles]),
        "mean_rank": _mean(ranks),
        "accuracy": _mean([q["score"] for q in questions]),
        "full_accuracy": _mean([q["score"] for q in full]) if full else None,
    }


def _sample_record(s: Sample) -> dict:
    first, end = s.doc_tokens
    needles = [{"key": n.key, "value": n.value, "depth": n.depth, "line": s.placed.lines[i], "tokens": list(s.spans[i]),
                "token_depth": round((s.spans[i][0] - first) / (end - first), 4)}
               for i, n in enumerate(s.task.needles)]
    return {"task": s.task.name, "context": s.context, "depth": s.depth, "trial": s.trial, "prompt_tokens": s.prompt_tokens,
            "document_tokens": end - first, "needles": needles, **s.results}


def _log(s: Sample, engine_name: str) -> None:
    f = _figures(s.results[engine_name], None)
    where = f"recall {s.task.name} {s.context:,} tokens, depth {s.depth}, trial {s.trial + 1}"
    if engine_name == "full":
        line = f"{where}, full attention: answer {f['accuracy']:.2f} ({s.results['full_s']:.0f} s)"
    else:
        rank = "-" if f["mean_rank"] is None else f"{f['mean_rank']:.1f}"
        line = (f"{where}: recalled {f['recall']:.2f} (visible {f['visible']:.2f}), cited rank {rank}, "
                f"answer {f['accuracy']:.2f} ({s.results['memory_s']:.0f} s)")
    print(line, file=sys.stderr, flush=True)


def _from_log(sample_log: SampleLog | None, samples: list[Sample], engine_name: str) -> list[Sample]:
    """The samples still to read: those without a record in the log (whose results are filled in from it)."""
    todo = []
    for s in samples:
        record = sample_log.get(engine_name, s.key) if sample_log else None
        if record is None:
            todo.append(s)
        else:
            s.results[engine_name], s.results[f"{engine_name}_s"] = record["results"], record["s"]
    return todo


def _finished(s: Sample, engine_name: str, sample_log: SampleLog | None, log: bool) -> None:
    if sample_log:
        sample_log.add(engine_name, s.key, s.results[engine_name], s.results[f"{engine_name}_s"])
    if log:
        _log(s, engine_name)


def _fits_full(s: Sample, grid: RecallGrid, trained: int) -> bool:
    """Whether the whole conversation (each question, then its answer) stays inside the trained context."""
    return s.prompt_tokens + len(s.task.questions) * (grid.answer_tokens + 64) <= trained


def run_recall(engine: Engine, grid: RecallGrid, memory: MemoryConfig, texts: list[str] | None = None,
               corpus: str = "docs", log: bool = True, share_prefix: bool = True, resume: Path | None = None) -> dict:
    """Every cell of the grid (task x context x depth, `trials` samples each) through the memory, and through full
    attention where it fits; `share_prefix=False` reads every document from its start (the same figures, slower).
    `resume`: a SampleLog file; samples already in it are taken from it, each new one is appended."""
    t0 = time.perf_counter()
    text, text_name, doc_name = _haystack_text(texts, corpus, max(grid.contexts))
    sample_log = SampleLog.open(resume, {
        "model": engine.path.name, "text": text_name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "seed": grid.seed, "answer_tokens": grid.answer_tokens, "questions": grid.questions,
        "scorer": engine.scorer(memory.scorer).name, "memory_config": memory.to_dict()}) if resume else None
    hay = Haystack(text, engine.tokenizer, max(grid.contexts))
    trained = engine.spec.context_length
    samples: list[Sample] = []
    for context in grid.contexts:
        rng = random.Random(f"{grid.seed}:{context}")
        starts = hay.start_tokens(context)
        if not starts:
            raise UsageError(f"The text has {hay.n_tokens:,} tokens; --context {context:,} needs more: pass a longer "
                             "--text file (or several).")
        start = rng.choice(starts)  # one stretch of text per length (as RULER), so the shared prefix is read once
        group = []
        for name in grid.tasks:
            for trial in range(grid.trials):
                for d_index, depth in enumerate(grid.depths):
                    task_rng = random.Random(f"{grid.seed}:{name}:{context}:{trial}:{depth}")
                    task = make_task(name, task_rng, grid.depths[d_index:] + grid.depths[:d_index], grid.questions)
                    group.append(build_sample(engine, hay, task, context, depth, trial, start, doc_name))
        todo = _from_log(sample_log, group, "memory")
        if todo:
            engine.configure_memory(memory)
        tick = time.perf_counter()
        for s in (_read_shared(engine, todo, memory.chunk_tokens) if share_prefix else _read_each(engine, todo)):
            s.results["memory"] = _ask(engine, s, grid.answer_tokens)
            s.results["memory_s"] = round(time.perf_counter() - tick, 2)  # with the shared text it read first
            _finished(s, "memory", sample_log, log)
            tick = time.perf_counter()
        fitting = _from_log(sample_log, [s for s in group if grid.full and _fits_full(s, grid, trained)], "full")
        if fitting:
            engine.configure_memory(None)
        tick = time.perf_counter()
        for s in _read_full(engine, fitting):
            s.results["full"] = _ask(engine, s, grid.answer_tokens)
            s.results["full_s"] = round(time.perf_counter() - tick, 2)
            _finished(s, "full", sample_log, log)
            tick = time.perf_counter()
        samples += group
    return _result(engine, grid, memory, samples, text_name, time.perf_counter() - t0)


def _result(engine: Engine, grid: RecallGrid, memory: MemoryConfig, samples: list[Sample], text_name: str,
            elapsed: float) -> dict:
    cells, summary = [], []
    for name in grid.tasks:
        for context in grid.contexts:
            row = []
            for depth in grid.depths:
                group = [s for s in samples if (s.task.name, s.context, s.depth) == (name, context, depth)]
                mem = [q for s in group for q in s.results["memory"]]
                full = [q for s in group for q in s.results.get("full", [])]
                cell = {"task": name, "context": context, "depth": depth, "trials": len(group), **_figures(mem, full),
                        "elapsed_s": round(sum(s.results["memory_s"] + s.results.get("full_s", 0) for s in group), 2)}
                if name == "multiquestion":
                    cell["by_question"] = [{"question": i, **_figures([q for q in mem if q["question"] == i],
                                                                     [q for q in full if q["question"] == i])}
                                           for i in range(grid.questions)]
                cells.append(cell)
                row.append(cell)
            summary.append({"task": name, "context": context,
                            **{k: _mean([c[k] for c in row]) for k in ("recall", "cited", "accuracy", "full_accuracy")}})
    by_question = []
    if "multiquestion" in grid.tasks:
        asked = [q for s in samples if s.task.name == "multiquestion" for q in s.results["memory"]]
        by_question = [{"question": i, **_figures([q for q in asked if q["question"] == i], None)} for i in range(grid.questions)]
    return {
        "model": engine.path.name,
        "text": text_name,
        "seed": grid.seed,
        "contexts": grid.contexts,
        "depths": grid.depths,
        "trials": grid.trials,
        "tasks": grid.tasks,
        "answer_tokens": grid.answer_tokens,
        "questions": grid.questions,
        "trained_context": engine.spec.context_length,
        "scorer": engine.scorer(memory.scorer).name,
        "memory_config": memory.to_dict(),
        "cells": cells,
        "summary": summary,
        "multiquestion_by_question": by_question,
        "samples": [_sample_record(s) for s in samples],
        "elapsed_s": round(elapsed, 2),
    }
