"""Pilot tests of the TUI's second slice, over the real bridge and store with the fake engine: regenerate,
edit and resend, copy, citations and the passage panel, sidebar search, the model picker, the settings
screen and its config file, themes, remapped keys, the cached / to-prefill figure and the status line's width."""

from __future__ import annotations

import tomllib

import pytest

from tui_fakes import FakeEngine, RecordingApp, settle, shown, stored, wait_for

from edgectx.config import Config, config_path, load_config
from edgectx.errors import ModelFileError
from edgectx.model.discover import ModelEntry
from edgectx.tui.bridge import Bridge
from edgectx.tui.screens.help import HelpScreen
from edgectx.tui.screens.models import ModelScreen
from edgectx.tui.screens.settings import SettingsScreen
from edgectx.tui.widgets.citations import PassagePanel
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.sidebar import ConversationList
from edgectx.tui.widgets.status import StatusBar, status_line
from edgectx.tui.widgets.transcript import Transcript, UserMessage

pytestmark = pytest.mark.anyio
WIDE = (120, 40)


def make_app(store, engine=None, config=None, **bridge_kwargs) -> RecordingApp:
    engine = engine or FakeEngine()
    return RecordingApp(Bridge(lambda progress: engine, store, **bridge_kwargs), config=config)


async def send(pilot, app, text: str) -> None:
    app.chat.query_one(PromptInput).focus()
    await pilot.press(*text, "enter")
    await settle(pilot, app)


async def test_regenerate_replaces_the_answer_and_prefills_only_the_last_token(store):
    engine = FakeEngine(answer=["A1"])
    app = make_app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "one")
        await send(pilot, app, "two")
        engine.answer = ["B2"]
        await pilot.press("ctrl+r")
        await settle(pilot, app)
        assert shown(app) == [("user", "one"), ("assistant", "A1"), ("user", "two"), ("assistant", "B2")]
        conversation_id = app.chat.bridge.conversation_id
        assert stored(store, conversation_id) == shown(app)
        # The memory was cut back to the end of the prompt: nothing of the old answer, one token run again.
        assert engine.last_stats.reused_tokens == engine.last_stats.prompt_tokens - 1
        assert engine.tokenizer.decode(engine.tokens).endswith("<user>two</user><assistant>B2")
        assert engine.tokenizer.decode(engine.tokens).count("two") == 1


async def test_edit_and_resend_replaces_the_last_message_and_its_answer(store):
    engine = FakeEngine(answer=["ok"])
    app = make_app(store, engine)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "one")
        await send(pilot, app, "two")
        before_turn = len(engine.tokenizer.encode("<user>one</user><assistant>ok</assistant><user>"))
        await pilot.press("ctrl+t")
        prompt = app.chat.query_one(PromptInput)
        assert prompt.text == "two" and app.chat.editing and "Editing the last message" in prompt.border_title
        await pilot.press("escape")  # leaves editing
        assert prompt.text == "" and not app.chat.editing
        await pilot.press("ctrl+t", *"!!", "enter")
        await settle(pilot, app)
        assert shown(app) == [("user", "one"), ("assistant", "ok"), ("user", "two!!"), ("assistant", "ok")]
        assert stored(store, app.chat.bridge.conversation_id) == shown(app)
        assert engine.last_stats.reused_tokens == before_turn + len("two")  # the common prefix "…<user>two"
        assert "<user>two</user>" not in engine.tokenizer.decode(engine.tokens)
        assert not app.chat.editing and prompt.border_title is None


async def test_regenerate_and_edit_with_nothing_sent_say_so(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("ctrl+r", "ctrl+t")
        await pilot.pause()
        warnings = [n for n, s in app.notes if s == "warning"]
        assert warnings == ["There is no answer to regenerate yet: send a message first.",
                            "There is no message to edit yet: send one first."]


async def test_copy_the_last_answer_or_the_focused_message(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await send(pilot, app, "question")
        await pilot.press("ctrl+b")
        assert app.clipboard == "Hello **world**!"
        app.set_focus(app.chat.query_one(UserMessage))
        await pilot.press("ctrl+b")
        assert app.clipboard == "question"
        assert "Copied the message (8 characters) to the clipboard." in [n for n, _ in app.notes]


async def test_citations_under_the_answer_open_the_passage(store, tmp_path):
    doc = tmp_path / "notes.md"
    text = "".join(f"line {i}: fact number {i}\n" for i in range(1, 61))
    doc.write_text(text)
    engine = FakeEngine(answer=["It is fact 7."])
    app = make_app(store, engine)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        await send(pilot, app, "no documents yet")
        assert app.chat.query_one(Transcript).last_citations() is None
        await pilot.press("ctrl+g")
        assert any("cites no passages" in n for n, _ in app.notes)

        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press(*str(doc), "enter")
        await settle(pilot, app)
        assert app.chat.bridge.snapshot_state == "snapshot saved"
        assert "snapshot saved" in app.chat.query_one(StatusBar).full_text
        opening = app.chat.bridge.conversation.opening
        first, end = text.index("line 7:"), text.index("line 9:")
        engine.retrieved = [{"block": 3, "start_token": opening.offsets[0].index(first),
                             "end_token": opening.offsets[0].index(end), "score": 0.42},
                            {"block": 99, "start_token": 10**6, "end_token": 10**6 + 128, "score": 0.9}]  # past the documents
        await send(pilot, app, "which fact?")
        citations = app.chat.query_one(Transcript).last_citations()
        assert [c.where for c in citations.citations] == ["notes.md:7-8"]
        await pilot.press("ctrl+g")
        assert app.focused is citations
        await pilot.press("enter")
        await pilot.pause()
        panel = app.chat.query_one(PassagePanel)
        assert panel.is_open and panel.text == "line 7: fact number 7\nline 8: fact number 8\n"
        await pilot.press("escape")
        assert not panel.is_open


async def test_sidebar_search_filters_with_the_stores_full_text_search(store):
    ids = {}
    for title, words in (("Cooking", "a recipe for bread"), ("Travel", "trains to Lisbon"), ("More cooking", "bread again")):
        ids[title] = store.create_conversation(title).id
        store.add_message(ids[title], "user", words)
    app = make_app(store)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        sidebar = app.chat.query_one(ConversationList)
        assert len(sidebar.conversation_ids) == 3
        await pilot.press("ctrl+f", *"bread")
        await pilot.pause()
        assert sorted(sidebar.conversation_ids) == sorted([ids["Cooking"], ids["More cooking"]])
        await pilot.press("enter")  # from the search box to the list
        assert app.focused is sidebar
        await pilot.press("ctrl+f", *["backspace"] * 5, *"lisbon")
        await pilot.pause()
        assert sidebar.conversation_ids == [ids["Travel"]]
        await pilot.press(*["backspace"] * 6)
        await pilot.pause()
        assert len(sidebar.conversation_ids) == 3


async def test_model_picker_switches_the_model_in_a_worker_and_keeps_it_in_the_config(store, tmp_path):
    embedded, other, broken = tmp_path / "embedded.gguf", tmp_path / "other.gguf", tmp_path / "broken.gguf"
    entries = [ModelEntry("smollm2 (embedded default)", embedded, "embedded"), ModelEntry("other", other, "config"),
               ModelEntry("broken", broken, "config")]

    def load_model(path, progress):
        if path == broken:
            raise ModelFileError(f"{path} is not a GGUF file: pass a .gguf model file.")
        return FakeEngine(name=path.name, answer=[f"from {path.stem}"])

    app = make_app(store, FakeEngine(name="embedded.gguf"), load_model=load_model, list_models=lambda: entries)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, ModelScreen)
        await pilot.press("down", "enter")
        await settle(pilot, app)
        assert app.chat.bridge.model_name == "other.gguf"
        assert app.chat.query_one(StatusBar).full_text.startswith("other.gguf")
        assert load_config().model == str(other)
        await send(pilot, app, "hi")
        assert shown(app)[-1] == ("assistant", "from other")

        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("down", "down", "enter")
        await settle(pilot, app)
        assert (f"{broken} is not a GGUF file: pass a .gguf model file. other.gguf stays loaded.", "error") in app.notes
        assert app.chat.bridge.model_name == "other.gguf" and load_config().model == str(other)

        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("enter")  # back to the embedded default: the config forgets the model key
        await settle(pilot, app)
        assert app.chat.bridge.model_name == "embedded.gguf" and load_config().model is None


async def _fill_settings(pilot, app, **fields) -> None:
    await pilot.press("f4")
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, SettingsScreen)
    from textual.widgets import Input

    for name, value in fields.items():
        screen.query_one(f"#{name}", Input).focus()
        await pilot.press("ctrl+a", "ctrl+k", *value)
    await pilot.press("ctrl+s")
    await settle(pilot, app)


async def test_settings_are_saved_to_the_config_file_and_used(store):
    config_path().write_text('future_option = "kept"\n')
    engine = FakeEngine()
    app = make_app(store, engine)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        await _fill_settings(pilot, app, temperature="0.2", top_k="5", max_tokens="2", budget="1024")
        raw = tomllib.loads(config_path().read_text())
        assert (raw["temperature"], raw["top_k"], raw["max_tokens"], raw["budget"]) == (0.2, 5, 2, 1024)
        assert raw["future_option"] == "kept" and raw["snapshot_codec"] == "int4"
        settings = app.chat.bridge.settings
        assert (settings.sampling.temperature, settings.sampling.top_k, settings.max_tokens) == (0.2, 5, 2)
        assert settings.budget == 1024 and engine.memory_config.budget_tokens == 1024  # the memory was rebuilt
        assert app.chat.query_one(Transcript).messages[-1] == ("notice", "Memory budget: 1024 tokens; a new conversation is open.")
        await send(pilot, app, "short answer please")
        assert shown(app)[-1] == ("assistant", "Hello **world**")  # max_tokens 2


async def test_the_thinking_setting_is_saved_and_asks_reasoning_models_for_none(store):
    """The settings' "Reasoning models" choice: "answer without thinking" is `thinking = false` in the config file
    and the conversation's `enable_thinking` from the next message on; back to the default removes the key."""
    from textual.widgets import Select

    app = make_app(store)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        for choice, saved, template_vars in (("off", False, {"enable_thinking": False}), ("default", None, {})):
            await pilot.press("f4")
            await pilot.pause()
            app.screen.query_one("#thinking", Select).value = choice
            await pilot.press("ctrl+s")
            await settle(pilot, app)
            assert load_config().thinking is saved and app.chat.bridge.settings.thinking is saved
            assert app.chat.bridge.settings.template_vars == template_vars
            assert ("thinking" in tomllib.loads(config_path().read_text())) == (saved is not None)
        await pilot.press("f4")
        await pilot.pause()
        assert app.screen.query_one("#thinking", Select).value == "default"  # the screen shows what is in use


async def test_a_malformed_setting_is_a_notification_and_nothing_is_saved(store):
    config_path().write_text("temperature = 0.5\n")
    app = make_app(store)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        await _fill_settings(pilot, app, temperature="warm")
        assert ("Temperature must be a number, not 'warm'.", "error") in app.notes
        await _fill_settings(pilot, app, temperature="9")
        errors = [n for n, s in app.notes if s == "error"]
        assert errors[-1] == f"In {config_path()}, temperature must be a number between 0.0 and 5.0 (got 9.0)."
        assert config_path().read_text() == "temperature = 0.5\n"
        assert app.chat.bridge.settings.sampling.temperature == 0.7
        assert app.screen is app.chat  # and the app goes on
        await send(pilot, app, "still fine")
        assert shown(app)[-1] == ("assistant", "Hello **world**!")


async def test_theme_from_the_config_and_a_changed_theme_is_saved(store):
    app = make_app(store, config=Config(theme="nord"))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.theme == "nord"
        app.theme = "gruvbox"  # as the palette's "Change theme" does
        await pilot.pause()
        assert load_config().theme == "gruvbox"


async def test_keys_are_remapped_from_the_config_and_the_help_shows_them(store):
    engine = FakeEngine(answer=["first"])
    app = make_app(store, engine, config=Config(keys={"regenerate": "f5", "copy": "f6,ctrl+b", "frobnicate": "f9"}))
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert any("unknown actions (frobnicate)" in n for n, s in app.notes if s == "warning")
        await send(pilot, app, "q")
        engine.answer = ["second"]
        await pilot.press("ctrl+r")  # no longer bound
        await settle(pilot, app)
        assert shown(app)[-1] == ("assistant", "first")
        await pilot.press("f5")
        await settle(pilot, app)
        assert shown(app) == [("user", "q"), ("assistant", "second")]
        await pilot.press("f1")
        await pilot.pause()
        rows = dict(app.screen.rows)
        assert isinstance(app.screen, HelpScreen)
        assert rows["F5"] == "Regenerate the last answer" and rows["F6 / Ctrl+B"].startswith("Copy")
        assert "Ctrl+R" not in rows


async def test_cached_and_to_prefill_is_shown_while_typing(store):
    app = make_app(store)
    async with app.run_test(size=WIDE) as pilot:
        await settle(pilot, app)
        bar = app.chat.query_one(StatusBar)
        await pilot.press(*"hello")
        await wait_for(pilot, lambda: bar.plan is not None, "the figure")
        assert bar.plan == (0, len("<user>hello</user><assistant>"))
        assert "0 cached / 29 to prefill" in bar.text
        await pilot.press("enter")
        await settle(pilot, app)
        assert bar.plan is None
        held = len(app.chat.bridge.engine.tokens)
        await pilot.press(*"more")
        await wait_for(pilot, lambda: bar.plan is not None, "the figure")
        assert bar.plan == (held, len("</assistant><user>more</user><assistant>"))
        assert f"{held:,} cached / 40 to prefill" in bar.text


def test_the_status_line_fits_120_columns_and_never_shows_more_than_the_budget():
    stats = {"tokens": 131_072, "budget_tokens": 2048, "evicted_tokens": 128_000, "device_kv_bytes": 123 * 2**20,
             "host_kv_bytes": 5432 * 2**20}
    answer = type("A", (), {"generated_tokens": 512, "decode_tok_s": 21.34})()
    model = "SmolLM2-135M-Instruct.Q4_1.gguf"
    full = status_line(model, stats, answer, plan=(131_072, 17), snapshot="snapshot restored")
    assert len(full) > 118
    line = status_line(model, stats, answer, plan=(131_072, 17), snapshot="snapshot restored", width=118)
    assert len(line) <= 118 and "[██████████] 2,048/2,048 on device" in line and "131,072 cached / 17 to prefill" in line
    assert "3,072" not in line  # 131,072 - 128,000 resident, clamped to the budget


def test_a_message_stopped_before_its_answer_leaves_the_store_as_the_chat(store):
    bridge = Bridge(lambda progress: FakeEngine(answer=["ok"]), store)
    bridge.load()
    bridge.send("never answered", on_piece=lambda p: None, cancel=lambda: True)
    assert store.list_conversations() == [] and bridge.conversation_id is None
    bridge.send("first", on_piece=lambda p: None, cancel=lambda: False)
    bridge.send("stopped while read", on_piece=lambda p: None, cancel=lambda: True)
    assert stored(store, bridge.conversation_id) == [("user", "first"), ("assistant", "ok")]
    assert [m["content"] for m in bridge.conversation.messages] == ["first", "ok"]
    bridge.redo("first, edited", on_piece=lambda p: None, cancel=lambda: False)
    assert stored(store, bridge.conversation_id) == [("user", "first, edited"), ("assistant", "ok")]
