"""The terminal UI end to end with the real Engine on a tiny random GGUF, in an isolated data dir: an answer
streams in and is stored, a document is read and snapshotted, and a new app lists the conversation,
reopens it with its messages and restores its document from the snapshot."""

from __future__ import annotations

import pytest

from tiny_gguf import write_tiny_gguf
from tui_fakes import RecordingApp, settle, shown, stored

from edgectx.engine import Cancelled, Engine
from edgectx.memory.config import MemoryConfig
from edgectx.model.sampling import SamplingParams
from edgectx.store.conversations import ConversationStore
from edgectx.chat.conversation import Settings
from edgectx.tui.bridge import Bridge
from edgectx.tui.widgets.prompt import PromptInput
from edgectx.tui.widgets.sidebar import ConversationList
from edgectx.tui.widgets.status import StatusBar
from edgectx.tui.widgets.transcript import Transcript

def bridge_for(model, store) -> Bridge:
    memory = MemoryConfig.for_budget(512, chunk_tokens=128)
    settings = Settings(sampling=SamplingParams(temperature=0), max_tokens=8)
    loader = lambda progress: Engine.load(model, device="cpu", memory_config=memory, progress=progress)  # noqa: E731
    return Bridge(loader, store, settings)


def app_for(model, store) -> RecordingApp:
    return RecordingApp(bridge_for(model, store))


def _doc(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\n" + "the quick brown fox jumps over the lazy dog. " * 20)
    return doc


@pytest.mark.anyio
async def test_real_engine_answer_document_and_resume(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=4096)
    doc = _doc(tmp_path)
    with ConversationStore() as store:
        app = app_for(model, store)
        async with app.run_test() as pilot:
            await settle(pilot, app)
            assert "tiny.gguf" in app.chat.query_one(StatusBar).full_text and app.chat.query_one(PromptInput).border_subtitle == "tiny.gguf"
            await pilot.press("ctrl+o")
            await pilot.pause()
            await pilot.press(*str(doc), "enter")
            await settle(pilot, app)
            read_line = app.chat.query_one(Transcript).messages[-1]
            assert read_line[0] == "notice" and read_line[1].startswith("notes.md: read ") and "saved for next time" in read_line[1]
            n_doc_tokens = app.chat.bridge.engine.stats()["tokens"]
            assert n_doc_tokens > 512  # past the budget: the memory evicted and kept every token on the host
            app.chat.query_one(PromptInput).focus()
            await pilot.press(*"What is it about?", "enter")
            await settle(pilot, app)
            engine = app.chat.bridge.engine
            assert engine.last_stats.generated_tokens > 0 and engine.last_stats.reused_tokens >= n_doc_tokens
            answer = shown(app)[-1]
            assert answer[0] == "assistant" and answer[1]
            (conversation,) = store.list_conversations()
            assert stored(store, conversation.id) == [("user", "What is it about?"), answer]
            assert [d.path for d in store.documents.attached(conversation.id)] == [str(doc)]
            assert "tok in context" in app.chat.query_one(StatusBar).full_text
            # Citations come from what the memory retrieved; they point into notes.md and nowhere else.
            for citation in app.chat.bridge.citations():
                assert citation.file == "notes.md" and citation.text in doc.read_text()
            # Regenerate: the same answer (greedy), the memory cut back to the prompt, the store unchanged in size.
            await pilot.press("ctrl+r")
            await settle(pilot, app)
            assert engine.last_stats.reused_tokens == engine.last_stats.prompt_tokens  # nothing re-run: its logits were kept
            assert shown(app)[-1] == answer
            assert stored(store, conversation.id) == [("user", "What is it about?"), answer]

        second = app_for(model, store)
        async with second.run_test() as pilot:
            await settle(pilot, second)
            sidebar = second.chat.query_one(ConversationList)
            assert sidebar.conversation_ids == [conversation.id]
            sidebar.focus()
            sidebar.index = 0
            await pilot.press("enter")
            await settle(pilot, second)
            assert shown(second) == [("user", "What is it about?"), answer]
            restored = second.chat.query_one(Transcript).messages[-1]
            assert restored[0] == "notice" and restored[1].startswith(f"notes.md: restored {n_doc_tokens:,} tokens in ")
            assert second.chat.bridge.conversation_id == conversation.id
            second.chat.query_one(PromptInput).focus()
            await pilot.press(*"And then?", "enter")
            await settle(pilot, second)
            assert [m[0] for m in stored(store, conversation.id)] == ["user", "assistant", "user", "assistant"]


def test_a_stopped_attach_leaves_the_conversation_as_it_was(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=4096)
    with ConversationStore() as store:
        bridge = bridge_for(model, store)
        bridge.load()
        bridge.send("hello", on_piece=lambda piece: None, cancel=lambda: False)
        before = list(bridge.conversation.messages)
        chunks = []
        with pytest.raises(Cancelled):
            bridge.attach(bridge.read_document(str(_doc(tmp_path))), progress=lambda done, total: chunks.append(done),
                          cancel=lambda: len(chunks) >= 2)
        assert len(chunks) == 2 and bridge.conversation.documents == [] and bridge.conversation.messages == before
        conversation_id = bridge.conversation_id
        assert store.documents.attached(conversation_id) == []

        bridge.send("again", on_piece=lambda piece: None, cancel=lambda: False)
        engine = bridge.engine
        prompt = engine.template.render(before + [{"role": "user", "content": "again"}], add_generation_prompt=True)
        prompt_ids = engine.tokenizer.encode(prompt, add_bos=engine.tokenizer.add_bos)
        assert engine.tokens[: len(prompt_ids)] == prompt_ids  # the memory holds the conversation, not half a document
        assert [m.role for m in store.messages(conversation_id)] == ["user", "assistant", "user", "assistant"]
