"""`edgectx bench recall` on a tiny random model: needles land where asked, recall is read from what the memory held
when the answer's first token was decided (resident, evicted, retrieved), shared reading changes no figure, the JSON
and the table, and bad arguments end in one sentence."""

from __future__ import annotations

import json
import random

import pytest

from cli_helpers import assert_one_sentence, run_cli
from tiny_gguf import write_tiny_gguf

from edgectx.bench.needles import Haystack, Placed, Question, Task, grade, make_task
import edgectx.bench.recall as recall_module
from edgectx.bench.recall import RecallGrid, build_sample, run_recall, visibility
from edgectx.bench.report import print_report
from edgectx.engine import Engine
from edgectx.errors import UsageError
from edgectx.memory.config import MemoryConfig

WORDS = "the of a river stone over under light green quiet house small garden road evening bridge".split()
SMALL = MemoryConfig.for_budget(256, chunk_tokens=64)  # 128-token blocks, one retrieved per layer and KV head


def _text(n_lines: int = 1200, seed: int = 0) -> str:
    """Short lines of words (at most ~60 byte tokens each), so a needle can go near any depth."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ".\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", context_length=2048)


@pytest.fixture(scope="module")
def engine(model):
    return Engine.load(model, device="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "hay.txt"
    path.write_text(_text())
    return path


def test_needles_go_on_their_own_line_at_the_requested_depth_in_tokens(engine):
    tok = engine.tokenizer
    hay = Haystack(_text(), tok, 3000)
    longest_line = max(len(tok.encode(line + "\n", add_bos=False)) for line in _text().splitlines())
    for name, depth in [("single", d) for d in (0.0, 0.05, 0.3, 0.5, 0.77, 0.95, 1.0)] + [("multikey", 0.5), ("multikey", 0.3)]:
        task = make_task(name, random.Random(depth), [depth])
        placed = hay.document(2000, task.needles, start_token=hay.start_tokens(2000)[7])
        n_doc = len(tok.encode(placed.text, add_bos=False))
        assert abs(n_doc - 2000) <= 4
        lines = placed.text.splitlines()
        # Within half a line of the depth; a needle whose line another took goes on the next one.
        slack = longest_line / 2 + 2 + (60 if name == "multikey" else 0)
        for i, needle in enumerate(task.needles):
            assert lines[placed.lines[i] - 1] == needle.sentence
            assert placed.text[placed.char_starts[i] - 1] == "\n"  # at a line boundary
            tokens_before = len(tok.encode(placed.text[: placed.char_starts[i]], add_bos=False))
            assert abs(tokens_before - needle.depth * n_doc) <= slack + (longest_line if depth in (0.0, 1.0) else 0), (depth, i)
        by_depth = sorted(range(len(task.needles)), key=lambda i: task.needles[i].depth)
        assert [placed.lines[i] for i in by_depth] == sorted(placed.lines)
    assert len({n.key for n in task.needles}) == 4 and len({n.value for n in task.needles}) == 4


def test_a_sample_fits_its_context_and_knows_its_needles_tokens(engine):
    hay = Haystack(_text(), engine.tokenizer, 3000)
    task = make_task("multivalue", random.Random(3), [0.4])
    sample = build_sample(engine, hay, task, 1500, 0.4, 0, 0, "hay.txt")
    assert 1500 - 8 <= sample.prompt_tokens <= 1500
    for (start, end), needle in zip(sample.spans, task.needles):
        assert engine.tokenizer.decode(sample.opening.ids[start:end]).strip() == needle.sentence
    first, end = sample.doc_tokens
    assert abs((sample.spans[0][0] - first) / (end - first) - 0.4) < 0.05


def test_grading_wants_whole_numbers():
    task = make_task("multivalue", random.Random(0), [0.5])
    a, b = task.needles[0].value, task.needles[1].value
    placed = Placed("x", (0,) * 4, (7, 8, 9, 10))
    q = task.questions[0]
    assert grade(q, f"They are {a} and {int(b):,}.", placed, task) == 0.5
    assert grade(q, f"{a}0", placed, task) == 0.0
    where = Task("where", task.needles[:1], (Question("?", (0,), "line"),))
    assert grade(where.questions[0], "Line 7.", placed, where) == 1.0 and grade(where.questions[0], "Line 17.", placed, where) == 0.0


def test_visibility_is_what_the_last_chunk_attended_to(engine):
    """Against the memory's tiers read independently: resident tokens before the chunk, plus the blocks it retrieved."""
    config = MemoryConfig(budget_tokens=256, n_sink=8, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=8,
                          chunk_tokens=64, scorer="attention")
    engine.configure_memory(config)
    ids = engine.tokenizer.encode(_text(), add_bos=False)[:1200]
    engine.prefill(ids[:-40])
    layers = engine.memory.layers
    before = [[set(l.resident.idx[h, : l.resident.n].tolist()) for h in range(l.resident.n_kv)] for l in layers]
    engine.forward(ids[-40:])  # retrieves for this chunk, then evicts when it commits
    held = [[res | {b * 32 + i for b in l.selection[h].tolist() for i in range(32)} for h, res in enumerate(heads)]
            for l, heads in zip(layers, before)]

    def expected(start: int, end: int) -> tuple[float, float]:
        pairs = [h for heads in held for h in heads]
        counts = [len(h & set(range(start, end))) for h in pairs]
        return sum(c == end - start for c in counts) / len(pairs), sum(counts) / (end - start) / len(pairs)

    block = int(layers[0].selection[0, 0])
    evicted = next(s for s in range(8, 1000) if not any(set(range(s, s + 8)) & h for heads in held for h in heads))
    spans = {"retrieved": (block * 32 + 4, block * 32 + 20), "sinks": (0, 8), "window": (1100, 1120),
             "evicted": (evicted, evicted + 8), "straddling": (block * 32 + 24, block * 32 + 40)}
    for name, span in spans.items():
        seen = visibility(engine.memory, *span)
        assert (seen["visible"], seen["coverage"]) == pytest.approx(expected(*span)), name
    assert visibility(engine.memory, *spans["sinks"]) == {"visible": 1.0, "resident": 1.0, "coverage": 1.0, "recalled": True}
    assert visibility(engine.memory, *spans["evicted"])["coverage"] == 0.0
    retrieved = visibility(engine.memory, *spans["retrieved"])
    assert retrieved["visible"] > 0 and retrieved["resident"] < retrieved["visible"]  # layer 0 head 0 holds it by retrieval


def test_a_needle_that_stays_resident_is_recalled(engine, text_file):
    """A budget larger than the context: nothing is evicted, so every needle is held and nothing is retrieved (no
    citation); and the memory answers exactly as full attention does (one document: both read it in the same chunks)."""
    grid = RecallGrid([1000], [0.1, 0.9], trials=1, tasks=["single", "multivalue"], answer_tokens=6, full=False)
    result = run_recall(engine, grid, MemoryConfig.for_budget(2048), texts=[str(text_file)], log=False)
    for cell in result["cells"]:
        assert (cell["recall"], cell["visible"], cell["resident"], cell["coverage"]) == (1.0, 1.0, 1.0, 1.0)
        assert cell["cited"] == 0.0 and cell["mean_rank"] is None
    one = run_recall(engine, RecallGrid([1000], [0.5], answer_tokens=6), MemoryConfig.for_budget(2048),
                     texts=[str(text_file)], log=False)
    (sample,) = one["samples"]
    assert sample["memory"][0]["answer"] == sample["full"][0]["answer"]
    assert one["cells"][0]["full_accuracy"] == one["cells"][0]["accuracy"]


def test_a_needle_evicted_and_not_retrieved_is_not_recalled(engine, text_file):
    """Recency eviction and no retrieval: a needle early in the document has left the device."""
    memory = MemoryConfig(budget_tokens=256, n_sink=8, n_local=64, top_k_blocks=0, chunk_tokens=64, scorer="window")
    grid = RecallGrid([1500], [0.1], trials=2, tasks=["single"], answer_tokens=4, full=False)
    result = run_recall(engine, grid, memory, texts=[str(text_file)], log=False)
    (cell,) = result["cells"]
    assert (cell["recall"], cell["visible"], cell["coverage"], cell["cited"]) == (0.0, 0.0, 0.0, 0.0)
    start, end = result["samples"][-1]["needles"][0]["tokens"]
    for layer in engine.memory.layers:  # the last sample's memory: no tier holds the needle
        assert not ((layer.resident.idx[:, : layer.resident.n] >= start) & (layer.resident.idx[:, : layer.resident.n] < end)).any()
    assert "full" not in result["samples"][0] and cell["full_accuracy"] is None


def test_shared_reading_gives_the_figures_of_reading_each_document(engine, text_file, monkeypatch):
    read = []
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda ids, *a, **k: read.append(len(ids)) or prefill(ids, *a, **k))
    grid = RecallGrid([1000], [0.2, 0.6, 0.9], trials=1, tasks=["single", "multiquestion"], answer_tokens=4, full=False)
    shared = run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False)
    n_shared, read[:] = sum(read), []
    plain = run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False, share_prefix=False)
    assert [s["memory"] for s in shared["samples"]] == [s["memory"] for s in plain["samples"]]
    assert n_shared < sum(read) - 600  # single's needles at 0.6 and 0.9 leave most of their text shared
    questions = [len(s["memory"]) for s in shared["samples"] if s["task"] == "multiquestion"]
    assert questions == [3, 3, 3]


def test_json_and_table_through_the_cli(model, text_file, capsys):
    result = run_cli("bench", "recall", "--model", str(model), "--text", str(text_file), "--context", "700",
                     "--depths", "0.2,0.8", "--trials", "1", "--tasks", "single,multikey,multivalue,multiquestion,where",
                     "--budget", "256", "--chunk", "64", "--answer-tokens", "4", "--seed", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["seed"], out["contexts"], out["depths"], out["trials"], out["questions"]) == (5, [700], [0.2, 0.8], 1, 3)
    assert out["memory_config"]["budget_tokens"] == 256 and out["scorer"] == "attention" and out["elapsed_s"] > 0
    assert len(out["cells"]) == 10 and len(out["samples"]) == 10 and len(out["summary"]) == 5
    for cell in out["cells"]:
        for key in ("recall", "visible", "resident", "coverage", "cited", "accuracy", "full_accuracy"):
            assert 0.0 <= cell[key] <= 1.0, (cell["task"], key)
    (mq,) = [c for c in out["cells"] if c["task"] == "multiquestion" and c["depth"] == 0.2]
    assert [q["question"] for q in mq["by_question"]] == [0, 1, 2] and len(out["multiquestion_by_question"]) == 3
    assert [len(s["needles"]) for s in out["samples"] if s["depth"] == 0.2] == [1, 4, 4, 3, 1]
    assert len(result.stderr.strip().splitlines()) == 20  # a progress line per sample, memory and full attention
    print_report("recall", out)
    table = capsys.readouterr().out
    assert all(f"{task}:" in table for task in ("single", "multikey", "multivalue", "multiquestion", "where"))
    assert "by question" in table and "700" in table


@pytest.mark.parametrize("flag, value", [("--depths", "0.5,1.5"), ("--tasks", "single,needle"), ("--trials", "0"),
                                         ("--questions", "6"), ("--context", "0")])
def test_bad_flags_are_refused_by_name(flag, value):
    result = run_cli("bench", "recall", flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: argument {flag}: " in result.stderr.strip().splitlines()[-1]


def test_bad_texts_and_contexts_end_in_one_sentence(model, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(_text(20))
    common = ("bench", "recall", "--model", str(model), "--budget", "256", "--chunk", "64")
    assert_one_sentence(run_cli(*common, "--text", str(short), "--context", "1500"), "tokens", "longer --text")
    assert_one_sentence(run_cli(*common, "--text", str(text_file), "--context", "100"), "--context 100")
    assert_one_sentence(run_cli(*common, "--text", str(tmp_path / "missing.txt")), "Cannot read")
    assert_one_sentence(run_cli(*common, "--text", str(text_file), "--corpus", "docs"), "pick one")
    assert_one_sentence(run_cli(*common, "--text", str(text_file), "--context", "700", "--resume", str(tmp_path)),
                        "Cannot read the resume file")


def test_a_resumed_run_reads_only_the_missing_samples_and_gives_the_same_figures(engine, text_file, tmp_path, monkeypatch):
    """`--resume FILE`: a run stopped part way (its last line cut by the kill) goes on from the samples it kept and
    ends with the figures of one whole run; a log from other settings, or a damaged one, is refused."""
    grid = RecallGrid([1000], [0.2, 0.9], trials=2, tasks=["single"], answer_tokens=4, full=True)
    whole = run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False)
    log = tmp_path / "grid.jsonl"
    run_recall(engine, RecallGrid([1000], [0.2, 0.9], trials=1, tasks=["single"], answer_tokens=4, full=True),
               SMALL, texts=[str(text_file)], log=False, resume=log)
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 2 * 2  # the header, then memory and full attention for each of 2 samples
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed while writing the last record
    asked = []
    ask = recall_module._ask
    monkeypatch.setattr(recall_module, "_ask", lambda e, s, n: asked.append((s.key.rsplit(":", 1)[0], "memory" in s.results)) or ask(e, s, n))
    resumed = run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False, resume=log)
    # Trial 2's four answers, and the full-attention answer whose record was cut (full attention reads the
    # latest needle first, so its last record is depth 0.2's)
    expected = [(f"single:1000:{d}:1", full) for d in (0.2, 0.9) for full in (False, True)] + [("single:1000:0.2:0", True)]
    assert sorted(asked) == sorted(expected), asked
    strip = [{k: v for k, v in s.items() if not k.endswith("_s")} for s in whole["samples"]]
    assert [{k: v for k, v in s.items() if not k.endswith("_s")} for s in resumed["samples"]] == strip
    assert [c["recall"] for c in resumed["cells"]] == [c["recall"] for c in whole["cells"]]
    assert len(log.read_text().splitlines()) == 1 + 4 * 2 and json.loads(log.read_text().splitlines()[-1])["key"].startswith("single:1000:")
    asked.clear()
    again = run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False, resume=log)
    assert asked == [] and [s["memory"] for s in again["samples"]] == [s["memory"] for s in whole["samples"]]

    with pytest.raises(UsageError, match="other settings \\(seed differ"):
        run_recall(engine, RecallGrid([1000], [0.2], seed=1, answer_tokens=4), SMALL, texts=[str(text_file)], log=False,
                   resume=log)
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(lines[0] + "not json\n" + lines[1])
    with pytest.raises(UsageError, match="Line 2 of .* is not a sample record"):
        run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False, resume=damaged)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    with pytest.raises(UsageError, match="is not a recall log"):
        run_recall(engine, grid, SMALL, texts=[str(text_file)], log=False, resume=foreign)
