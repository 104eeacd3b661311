"""The terminal UI driven through Textual's Pilot, over the real bridge and store with a fake engine
(tests/tui_fakes.py): streaming and storing answers, stopping them, the conversation list, documents,
errors, the help screen and the memory gauge."""

from __future__ import annotations

import threading
import time

import pytest

from tui_fakes import FakeEngine, RecordingApp, settle, shown, stored, wait_for

from edgectx.engine import Cancelled
from edgectx.errors import ModelFileError
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.help import HelpScreen
from edgectx.tui.widgets.progress import WorkProgress
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.sidebar import ConversationList
from edgectx.tui.widgets.status import StatusBar
from edgectx.tui.widgets.transcript import Transcript

pytestmark = pytest.mark.anyio


def make_app(store, engine=None, export_dir=None, bridge=None) -> RecordingApp:
    engine = engine or FakeEngine()
    return RecordingApp(bridge or Bridge(lambda progress: engine, store), export_dir=export_dir)


async def attach(pilot, path) -> None:
    """Ctrl+O, then type the path into the prompt that opens."""
    await pilot.press("ctrl+o")
    await pilot.pause()
    await pilot.press(*str(path), "enter")


async def send(pilot, app, text: str) -> None:
    app.chat.query_one(PromptInput).focus()
    await pilot.press(*text, "enter")
    await settle(pilot, app)


async def test_a_reasoning_models_thinking_shows_as_a_dimmed_quote_above_its_answer(store):
    """Thinking streams into a quote above the answer (tags split across pieces); the stored answer keeps the
    model's block; reopened from the store, it shows the same way; an ordinary model's answer is untouched."""
    from textual.widgets._markdown import MarkdownBlockQuote

    from edgectx.tui.widgets.transcript import AssistantMessage

    engine = FakeEngine(answer=["<thi", "nk>Weighing ", "it.\nDone.</th", "ink>\n\nThe answer ", "is **42**."])
    engine.template.source = "{{ '<think>' }} ... {{ '</think>' }}"  # an instance attribute: this engine only
    app = make_app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Why?")
        assert shown(app) == [("user", "Why?"), ("assistant", "The answer is **42**.")]
        answer = app.chat.query_one(Transcript).last_answer()
        assert answer.thinking == "Weighing it.\nDone." and len(answer.query(MarkdownBlockQuote)) == 1
        (conversation,) = store.list_conversations()
        raw = "<think>Weighing it.\nDone.</think>\n\nThe answer is **42**."
        assert stored(store, conversation.id)[-1] == ("assistant", raw)
        await app.chat.query_one(Transcript).show([{"role": "assistant", "content": raw},
                                                   {"role": "assistant", "content": "a <think> b"}])
        await pilot.pause()
        again, plain = app.chat.query_one(Transcript).query(AssistantMessage)
        assert (again.thinking, again.text) == ("Weighing it.\nDone.", "The answer is **42**.")
        assert (plain.thinking, plain.text) == ("", "a <think> b") and not plain.query(MarkdownBlockQuote)


async def test_send_streams_the_answer_and_stores_both_messages(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "Hi there")
        assert shown(app) == [("user", "Hi there"), ("assistant", "Hello **world**!")]
        (conversation,) = store.list_conversations()
        assert stored(store, conversation.id) == [("user", "Hi there"), ("assistant", "Hello **world**!")]
        assert app.chat.query_one(PromptInput).text == ""  # sent and cleared
        assert app.chat.query_one(ConversationList).conversation_ids == [conversation.id]
        assert "last answer 3 tok," in app.chat.query_one(StatusBar).full_text


async def test_ctrl_j_inserts_a_newline_and_question_mark_is_typed(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("a", "ctrl+j", "b", "?")
        assert app.chat.query_one(PromptInput).text == "a\nb?"
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("enter")
        await settle(pilot, app)
        assert shown(app)[0] == ("user", "a\nb?")


async def test_escape_stops_a_long_answer_and_keeps_the_partial(store):
    engine = FakeEngine(answer=[f"w{i} " for i in range(300)], piece_delay_s=0.02)
    app = make_app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press(*"go", "enter")
        await wait_for(pilot, lambda: engine.last_stats.generated_tokens >= 5, "the answer to start")
        await pilot.press("escape")
        await settle(pilot, app)
        partial = shown(app)[1][1]
        assert partial.startswith("w0 w1 w2 w3 w4 ") and 5 <= engine.last_stats.generated_tokens < 300
        assert partial == "".join(f"w{i} " for i in range(engine.last_stats.generated_tokens))
        assert app.chat.query_one(Transcript).messages[-1] == ("notice", "(stopped: the answer so far is kept)")
        (conversation,) = store.list_conversations()
        messages = store.messages(conversation.id)
        assert [(m.role, m.content) for m in messages] == [("user", "go"), ("assistant", partial)]
        assert messages[1].timings["stop_reason"] == "cancelled"
        assert app.chat.busy is None  # the next message can be sent
        engine.answer, engine.piece_delay_s = ["again"], 0.0
        await send(pilot, app, "more")
        assert stored(store, conversation.id)[-2:] == [("user", "more"), ("assistant", "again")]


async def test_opening_a_conversation_while_answering_is_refused(store):
    older = store.create_conversation("older")
    store.add_message(older.id, "user", "old question")
    engine = FakeEngine(answer=[f"w{i} " for i in range(300)], piece_delay_s=0.02)
    app = make_app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press(*"go", "enter")
        await wait_for(pilot, lambda: engine.last_stats.generated_tokens >= 2, "the answer to start")
        sidebar = app.chat.query_one(ConversationList)
        sidebar.focus()
        sidebar.index = sidebar.conversation_ids.index(older.id)
        await pilot.press("enter")
        assert any(note.startswith("Wait for the current task") for note, _ in app.notes)
        assert shown(app)[0] == ("user", "go")  # the transcript still shows the conversation being answered
        await pilot.press("escape")
        await settle(pilot, app)
        assert app.chat.bridge.conversation_id != older.id


async def test_sidebar_new_rename_select_and_delete(store, tmp_path):
    engine = FakeEngine(answer=["ok"])
    app = make_app(store, engine, export_dir=tmp_path)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "first question")
        first = app.chat.bridge.conversation_id
        await pilot.press("ctrl+n")
        await settle(pilot, app)
        assert shown(app) == [] and app.chat.bridge.conversation_id is None
        await send(pilot, app, "second question")
        second = app.chat.bridge.conversation_id
        sidebar = app.chat.query_one(ConversationList)
        assert sidebar.conversation_ids == [second, first]  # newest first

        # Rename the highlighted (current) conversation.
        sidebar.focus()
        sidebar.index = 0
        await pilot.press("f2")
        await pilot.pause()
        await pilot.press("ctrl+a", "ctrl+k", *"Renamed", "enter")
        await pilot.pause()
        assert store.get_conversation(second).title == "Renamed"
        assert "Renamed" in str(app.chat.query_one(f"#conversation-{second}").query_one("Label").render())

        # Open the first one from the keyboard (Ctrl+L reaches the list): its messages are shown, and the next
        # message continues it.
        app.chat.query_one(PromptInput).focus()
        await pilot.press("ctrl+l")
        assert app.focused is sidebar
        sidebar.index = 0
        await pilot.press(*["down"] * sidebar.conversation_ids.index(first))
        await pilot.press("enter")
        await settle(pilot, app)
        assert shown(app) == [("user", "first question"), ("assistant", "ok")]
        assert app.chat.bridge.conversation_id == first
        assert isinstance(app.focused, PromptInput)  # opened to be continued
        await send(pilot, app, "follow-up")
        assert stored(store, first) == [("user", "first question"), ("assistant", "ok"),
                                        ("user", "follow-up"), ("assistant", "ok")]
        # The continued conversation's prompt held the earlier turns.
        assert "first question" in engine.tokenizer.decode(engine.tokens)

        # Export the highlighted one into the export folder.
        sidebar.focus()
        sidebar.index = sidebar.conversation_ids.index(first)
        await pilot.press("ctrl+s")
        exported = tmp_path / f"edgectx-conversation-{first}.md"
        assert "follow-up" in exported.read_text()
        assert any(str(exported) in note for note, _ in app.notes)

        # Delete the other one after confirming; "n" keeps it.
        sidebar.index = sidebar.conversation_ids.index(second)
        await pilot.press("delete", "n")
        await settle(pilot, app)
        assert second in [c.id for c in store.list_conversations()]
        sidebar.index = sidebar.conversation_ids.index(second)
        await pilot.press("delete", "y")
        await settle(pilot, app)
        assert [c.id for c in store.list_conversations()] == [first]
        assert sidebar.conversation_ids == [first]
        assert app.chat.bridge.conversation_id == first  # deleting another conversation leaves this one open

        # Deleting the open conversation starts a new, empty one.
        await pilot.press("delete", "y")
        await settle(pilot, app)
        assert store.list_conversations() == [] and sidebar.conversation_ids == []
        assert app.chat.bridge.conversation_id is None and shown(app) == []
        await send(pilot, app, "fresh start")
        assert [stored(store, c.id) for c in store.list_conversations()] == [[("user", "fresh start"), ("assistant", "ok")]]


async def test_help_screen_opens_and_closes(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        keys = dict(app.screen.rows)
        assert keys["Ctrl+O"] == "Attach document" and keys["Esc"] == "Stop the answer or the read"
        assert "Ctrl+J / Shift+Enter" in keys
        await pilot.press("ctrl+n")  # chat keys are off while help is open
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.chat
        app.chat.query_one(ConversationList).focus()
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen is app.chat


async def test_command_palette_has_the_main_actions(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        titles = [c.title for c in app.get_system_commands(app.chat)]
        for title in ("New conversation", "Attach document", "Export conversation", "Help: keys", "Regenerate answer",
                      "Edit last message", "Copy answer", "Sources", "Search conversations", "Models", "Settings",
                      "Theme"):  # Theme: Textual's own theme picker
            assert title in titles


class SlowAttachBridge(Bridge):
    """Reads a document in four steps, waiting between the second and third until the test says go."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.halfway, self.go = threading.Event(), threading.Event()

    def attach(self, doc, progress=None, cancel=None, on_problem=None) -> str:
        total = 40_000
        for done in (10_000, 20_000):
            progress(done, total)
        on_problem(f"The snapshot for {doc.path.name} is damaged: it was read again.")
        self.halfway.set()
        self.go.wait(10)
        for done in (30_000, 40_000):
            progress(done, total)
        return f"{doc.path.name}: read {total:,} tokens in 1.5 s (saved for next time)"


async def test_attach_shows_progress_then_the_completion_line(store, tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nSome text.\n")
    bridge = SlowAttachBridge(lambda progress: FakeEngine(), store)
    app = make_app(store, bridge=bridge)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await attach(pilot, doc)
        await wait_for(pilot, bridge.halfway.is_set, "the read to be half way")
        row = app.chat.query_one(WorkProgress)
        await wait_for(pilot, lambda: "20,000/40,000 tokens" in row.rate_text, "the progress row")
        assert row.active and "tokens/s" in row.rate_text and "ETA" in row.rate_text and "Esc cancels" in row.rate_text
        bridge.go.set()
        await settle(pilot, app)
        assert not row.active
        line = "notes.md: read 40,000 tokens in 1.5 s (saved for next time)"
        assert app.chat.query_one(Transcript).messages[-1] == ("notice", line)
        assert ("The snapshot for notes.md is damaged: it was read again.", "warning") in app.notes


class EndlessAttachBridge(Bridge):
    """Reads a document until told to stop, as a very long one would."""

    def attach(self, doc, progress=None, cancel=None, on_problem=None) -> str:
        done = 0
        while not cancel():
            done += 512
            progress(done, 10**9)
            time.sleep(0.01)
        raise Cancelled("Cancelled; the tokens read so far stay in memory.")


async def test_escape_stops_reading_a_document(store, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text("long text\n")
    bridge = EndlessAttachBridge(lambda progress: FakeEngine(), store)
    app = make_app(store, bridge=bridge)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await attach(pilot, doc)
        row = app.chat.query_one(WorkProgress)
        await wait_for(pilot, lambda: "tokens/s" in row.rate_text, "the progress row")
        await pilot.press("escape")
        await settle(pilot, app)
        assert not row.active and app.chat.busy is None
        assert ("Stopped reading the document: the conversation goes on without it.", "warning") in app.notes


async def test_a_refused_file_becomes_a_notification_and_the_app_goes_on(store, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await attach(pilot, binary)
        await settle(pilot, app)
        errors = [note for note, severity in app.notes if severity == "error"]
        assert len(errors) == 1 and str(binary) in errors[0] and "\n" not in errors[0]
        assert app.chat.busy is None
        await send(pilot, app, "still here?")
        assert shown(app)[-1] == ("assistant", "Hello **world**!")


async def test_a_model_that_fails_to_load_becomes_a_notification(store):
    def fail(progress):
        raise ModelFileError("/models/missing.gguf does not exist: pass a .gguf model file.")

    store.add_message(store.create_conversation("kept").id, "user", "old")
    app = make_app(store, bridge=Bridge(fail, store))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert ("/models/missing.gguf does not exist: pass a .gguf model file.", "error") in app.notes
        assert "no model loaded" in app.chat.query_one(StatusBar).text
        # The stored conversations can still be browsed.
        assert len(app.chat.query_one(ConversationList).conversation_ids) == 1
        await pilot.press(*"hello", "enter")
        await pilot.pause()
        assert any("not loaded" in note for note, _ in app.notes)
        assert app.chat.query_one(PromptInput).text == "hello"  # kept, not lost


async def test_memory_gauge_shows_the_engines_stats(store):
    stats = {"tokens": 5000, "budget_tokens": 2048, "evicted_tokens": 3976, "device_kv_bytes": 2 * 2**20,
             "host_kv_bytes": 8 * 2**20, "context_tokens": 1 << 20}
    app = make_app(store, FakeEngine(stats=stats))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        text = app.chat.query_one(StatusBar).full_text
        assert "fake-model.gguf" in text and "5,000 tok in context" in text
        assert "[█████░░░░░] 1,024/2,048 on device" in text
        assert "KV 2.0 MiB dev, 8.0 MiB host" in text


def test_path_completion_extends_to_what_every_match_shares(tmp_path):
    from edgectx.tui.screens.prompts import complete_path

    (tmp_path / "report-2025.pdf").write_bytes(b"%PDF")
    (tmp_path / "report-2026.md").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".hidden.txt").write_text("x")
    base = f"{tmp_path}/"
    assert complete_path(base + "rep") == base + "report-202"  # two matches: their shared part only
    assert complete_path(base + "report-2026") == base + "report-2026.md"
    assert complete_path(base + "no") == base + "notes/"  # a folder gets its slash
    assert complete_path(base + "report-202") is None  # nothing more to add
    assert complete_path(base + "zzz") is None and complete_path(f"{tmp_path}/missing/x") is None
    assert complete_path(base + ".hi") == base + ".hidden.txt"  # hidden names only when asked for with a dot


async def test_attach_prompt_completes_the_path_with_tab(store, tmp_path):
    doc = tmp_path / "quarterly-notes.md"
    doc.write_text("# Notes\n\nSome text.\n")
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press(*f"{tmp_path}/quar", "tab", "enter")
        await settle(pilot, app)
        assert app.chat.query_one(Transcript).messages[-1][1].startswith("quarterly-notes.md: read ")
