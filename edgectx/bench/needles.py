"""Needle tasks for `edgectx bench recall` (RULER-style), generated from a seed over any long text.

A needle is one natural sentence holding a key and a value ("The special magic number for shiny-walrus is
4829113."), written on its own line at a line boundary of a real text (the haystack), at a requested depth:
a fraction of the document's tokens. Tasks say which needles go in and what is asked:

- `single`: one needle; the question asks for its value.
- `multikey`: four needles with different keys (three distractors at random depths); one key is asked.
- `multivalue`: one key with four values (the first at the depth, the others at random depths); all asked.
- `multiquestion`: 3-5 needles asked in a row in one conversation (SCBench's lesson: does question 3 do as
  well as question 1?); question i asks the needle at the i-th next depth of the grid, so over a grid
  every question index meets every depth once.
- `where`: one needle; the question asks on which line of the document it is (the text carries no line
  numbers: the answer is right if it names the needle's line).

    hay = Haystack(text, tokenizer)
    task = make_task("single", random.Random(1), depths=[0.5])
    doc = hay.document(n_tokens=4000, needles=task.needles, start_token=0)  # doc.text, doc.char_starts
    grade(task.questions[0], "It is 4829113.", doc)  # 1.0
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass

from edgectx.chat.token_spans import token_char_offsets
from edgectx.errors import UsageError

TASKS = ("single", "multikey", "multivalue", "multiquestion", "where")
N_MULTI = 4  # needles of multikey and multivalue: RULER's default of four
_ADJECTIVES = ("amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crimson", "curious",
               "dusty", "eager", "faint", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lazy",
               "little", "lonely", "loud", "lucky", "misty", "narrow", "noble", "olive", "pale", "proud", "quiet",
               "rapid", "rusty", "silent", "silver", "sleepy", "smooth", "sour", "steep", "stormy", "sunny", "swift",
               "tame", "tiny", "violet", "wandering", "wild", "windy", "wooden")
_NOUNS = ("anchor", "badger", "beacon", "bison", "canyon", "castle", "comet", "coral", "falcon", "feather", "ferret",
          "garden", "glacier", "harbor", "hedgehog", "heron", "island", "jackal", "kettle", "lantern", "lemur",
          "lichen", "marble", "meadow", "mirror", "orchid", "otter", "parrot", "pebble", "pigeon", "prairie",
          "quarry", "raven", "ribbon", "saddle", "salmon", "spider", "squirrel", "teapot", "thistle", "tiger",
          "trumpet", "tulip", "violin", "walrus", "willow", "wizard", "yak", "zebra", "zeppelin")


@dataclass(frozen=True)
class Needle:
    key: str
    value: str  # seven digits
    sentence: str  # what goes into the text, as one line
    depth: float  # requested fraction of the document's tokens before it


@dataclass(frozen=True)
class Question:
    text: str
    needles: tuple[int, ...]  # the needles it asks about (indices into Task.needles)
    wants: str  # "value": each asked needle's value must be in the answer; "line": the needle's line number


@dataclass(frozen=True)
class Task:
    name: str
    needles: tuple[Needle, ...]
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Placed:
    """A document built from the haystack with the needles in it."""

    text: str
    char_starts: tuple[int, ...]  # per needle: where its sentence starts in `text`
    lines: tuple[int, ...]  # per needle: its line in `text`, from 1

    def span(self, i: int, needle: Needle) -> tuple[int, int]:
        """Characters [start, end) of needle i's sentence."""
        return self.char_starts[i], self.char_starts[i] + len(needle.sentence)


def _keys(rng: random.Random, n: int) -> list[str]:
    return [f"{a}-{b}" for a, b in rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)]


def _values(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]


def _other_depth(rng: random.Random) -> float:
    return round(rng.uniform(0.05, 0.95), 4)


def make_task(name: str, rng: random.Random, depths: list[float], n_questions: int = 3) -> Task:
    """A task whose (first) asked needle sits at depths[0]; multiquestion asks needles at depths[0], depths[1], ...
    (the grid's depths from the cell's own, wrapped around)."""
    if name not in TASKS:
        raise UsageError(f"Unknown recall task {name!r}: the tasks are {', '.join(TASKS)}.")
    magic = "The special magic number for {} is {}."
    if name == "multivalue":
        key, values = _keys(rng, 1)[0], _values(rng, N_MULTI)
        needles = [Needle(key, v, f"One of the special magic numbers for {key} is {v}.",
                          depths[0] if i == 0 else _other_depth(rng)) for i, v in enumerate(values)]
        question = Question(f"What are all the special magic numbers for {key} mentioned in the document?",
                            tuple(range(N_MULTI)), "value")
        return Task(name, tuple(needles), (question,))
    n = {"single": 1, "where": 1, "multikey": N_MULTI, "multiquestion": n_questions}[name]
    keys, values = _keys(rng, n), _values(rng, n)
    if name == "multiquestion":
        at = [depths[i % len(depths)] for i in range(n)]
    else:
        at = [depths[0]] + [_other_depth(rng) for _ in range(n - 1)]
    needles = tuple(Needle(k, v, magic.format(k, v), d) for k, v, d in zip(keys, values, at))
    ask = "What is the special magic number for {} mentioned in the document?"
    if name == "where":
        return Task(name, needles, (Question(f"On which line of the document is the special magic number for {keys[0]}? "
                                             "Answer with the line number.", (0,), "line"),))
    asked = range(n) if name == "multiquestion" else [0]  # multikey asks the needle at the cell's depth
    return Task(name, needles, tuple(Question(ask.format(keys[i]), (i,), "value") for i in asked))


def grade(question: Question, answer: str, placed: Placed, task: Task) -> float:
    """Share of what the question wants that the answer holds, each as a whole number (commas ignored)."""
    numbers = set(re.findall(r"\d+", answer.replace(",", "")))
    if question.wants == "line":
        wanted = [str(placed.lines[i]) for i in question.needles]
    else:
        wanted = [task.needles[i].value for i in question.needles]
    return sum(w in numbers for w in wanted) / len(wanted)


class Haystack:
    """A long text, tokenized once, cut into documents of a given token count with needles at line starts."""

    def __init__(self, text: str, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        # Enough characters for `max_tokens` tokens of any text (code runs about 3 characters a token).
        head = text[: max_tokens * 12]
        ids = tokenizer.encode(head, add_bos=False, special=False)
        self.text = head
        self.offsets = token_char_offsets(tokenizer, head, ids)  # char where each token starts
        self.n_tokens = len(ids)
        # Token index of every line start (the first token starting at or after it).
        starts = [0] + [m.end() for m in re.finditer("\n", head) if m.end() < len(head)]
        self.line_tokens = [bisect.bisect_left(self.offsets, c) for c in starts]
        self.line_chars = starts

    def start_tokens(self, n_tokens: int) -> list[int]:
        """Line starts where a document of `n_tokens` tokens can begin."""
        last = self.n_tokens - n_tokens
        return [t for t in self.line_tokens if t <= last] or ([0] if last >= 0 else [])

    def document(self, n_tokens: int, needles: tuple[Needle, ...], start_token: int = 0) -> Placed:
        """About `n_tokens` tokens: the haystack from `start_token` (a line start), needles inserted at the line
        starts nearest their depths, counted in tokens of the whole document (needles included)."""
        needle_tokens = [len(self.tokenizer.encode(n.sentence + "\n", add_bos=False, special=False)) for n in needles]
        hay_tokens = n_tokens - sum(needle_tokens)
        end_token = start_token + hay_tokens
        if hay_tokens < 1 or end_token > self.n_tokens:
            raise UsageError(f"The text has {self.n_tokens:,} tokens; a {n_tokens:,}-token document with "
                             f"{len(needles)} needle(s) from token {start_token:,} needs more: pass a longer --text file.")
        first_line = bisect.bisect_right(self.line_tokens, start_token)  # lines strictly after the start
        last_line = bisect.bisect_left(self.line_tokens, end_token)
        candidates = list(range(first_line, last_line))
        if not candidates:
            raise UsageError("The text has no line breaks where the needles should go: pass a text with lines.")
        order = sorted(range(len(needles)), key=lambda i: needles[i].depth)
        at: dict[int, int] = {}  # needle -> the line it goes before
        before = 0  # needle tokens placed before the current one
        lowest = 0  # needles go in depth order: none before the line of the one placed last
        for i in order:
            target = needles[i].depth * n_tokens - before + start_token
            pos = bisect.bisect_left([self.line_tokens[c] for c in candidates], target)
            near = [j for j in (pos - 1, pos) if lowest <= j < len(candidates)] or [lowest]
            lowest = min(near, key=lambda j: abs(self.line_tokens[candidates[j]] - target))
            at[i] = candidates[lowest]
            before += needle_tokens[i]
        start_char, end_char = self.offsets[start_token], self.offsets[end_token] if end_token < self.n_tokens else len(self.text)
        pieces, cursor = [], start_char
        char_starts, lines = [0] * len(needles), [0] * len(needles)
        written = 0
        for i in sorted(order, key=lambda i: (at[i], needles[i].depth)):
            c = self.line_chars[at[i]]
            pieces.append(self.text[cursor:c])
            written += c - cursor
            cursor = c
            char_starts[i] = written
            pieces.append(needles[i].sentence + "\n")
            written += len(needles[i].sentence) + 1
        pieces.append(self.text[cursor:end_char])
        text = "".join(pieces)
        for i in range(len(needles)):
            lines[i] = text.count("\n", 0, char_starts[i]) + 1
        return Placed(text, tuple(char_starts), tuple(lines))
