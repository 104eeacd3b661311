"""edgectx's chat, TUI and documents over a remote engine: real server processes on local ports, llama-cpp-python's
own OpenAI-compatible server (`llama_cpp.server`) and `edgectx serve`, each with the embedded model (a random
tiny model's greedy answers are often bytes that are no text, which llama.cpp's server drops)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import assert_one_sentence, run_cli
from server_helpers import edgectx_server, llama_cpp_server
from tui_fakes import RecordingApp, settle, shown, stored

from edgectx.chat.conversation import Settings
from edgectx.chat.documents import read_document
from edgectx.chat.remote import RemoteConversation, RemoteEngine, RemoteEngineError
from edgectx.model.sampling import SamplingParams
from edgectx.store.conversations import ConversationStore

pytestmark = pytest.mark.slow  # the embedded model, in two servers
# The server's and the ingest's: snapshots are per memory config. fp16 weights: float32 arithmetic that no chunking
# changes (GGUF blocks round activations to 8 bits, which moves near-ties: tests/test_ggml_linear.py).
SERVE_MEMORY = ("--budget", "256", "--chunk", "128", "--weights", "fp16")


@pytest.fixture(scope="module")
def tiny(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def serve_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-serve-home")
    return {"EDGECTX_HOME": str(root / "home"), "EDGECTX_CONFIG": str(root / "config.toml"), "HOME": str(root / "user")}


@pytest.fixture(scope="module")
def llama_url(tiny):
    with llama_cpp_server(tiny) as url:
        yield url


@pytest.fixture(scope="module")
def edgectx_url(tiny, serve_home):
    with edgectx_server(tiny, *SERVE_MEMORY, env=serve_home) as url:
        yield url


@pytest.fixture(params=["llama_cpp", "edgectx"])
def engine_url(request):
    """Either server's URL; `request.param` says which (llama-cpp-python's stream carries no usage figures)."""
    return request.getfixturevalue("llama_url" if request.param == "llama_cpp" else "edgectx_url")


def _reports_usage(request) -> bool:
    return request.node.callspec.params["engine_url"] == "edgectx"


def _settings(max_tokens: int = 6) -> Settings:
    return Settings(sampling=SamplingParams(temperature=0), max_tokens=max_tokens)


def test_chat_prompt_against_a_remote_engine(engine_url, tiny):
    result = run_cli("chat", "--engine", engine_url, "--prompt", "Say hello.", "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Traceback" not in result.stderr
    assert "(remote engine)" in result.stderr
    history = json.loads(run_cli("history", "--json").stdout)
    assert len(history) == 1 and history[0]["messages"] == 2
    exported = json.loads(run_cli("export", str(history[0]["id"]), "--format", "json").stdout)
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["content"] == result.stdout.rstrip("\n")


def test_an_unreachable_or_wrong_engine_is_one_sentence():
    assert_one_sentence(run_cli("chat", "--engine", "http://127.0.0.1:9/v1", "--prompt", "x"), "cannot be reached")
    assert_one_sentence(run_cli("chat", "--engine", "ftp://x", "--prompt", "x"), "http://")


def test_turns_regenerate_stop_and_history_over_a_remote_engine(engine_url, request):
    with ConversationStore() as store:
        conversation = RemoteConversation(RemoteEngine.connect(engine_url), store, _settings())
        pieces: list[str] = []
        first = conversation.send("Tell me a story.", on_piece=pieces.append)
        answer = "".join(pieces)
        assert answer and first.stop_reason == "max_tokens" and first.generated_tokens == 6
        second = conversation.send("Go on.", on_piece=lambda p: None)
        assert conversation.messages[-2:] == [{"role": "user", "content": "Go on."},
                                              {"role": "assistant", "content": conversation.messages[-1]["content"]}]
        if _reports_usage(request):  # the whole conversation went to the server
            assert second.prompt_tokens > first.prompt_tokens + first.generated_tokens > 6
        redone = []
        conversation.redo(None, on_piece=redone.append)  # greedy: the same answer again, in the same place
        assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
        assert [r for r, _ in stored(store, conversation.id)] == ["user", "assistant", "user", "assistant"]
        # Stop after two pieces: the part written is kept and stored.
        got: list[str] = []
        stats = conversation.send("Once more, at length.", on_piece=got.append, cancel=lambda: len(got) >= 2)
        assert stats.stop_reason == "cancelled" and len(got) == 2
        assert stored(store, conversation.id)[-1] == ("assistant", "".join(got))
        assert conversation.citations() == [] and conversation.plan("x") is None  # unavailable, not faked


def test_the_edgectx_server_reports_cache_reuse_to_a_remote_conversation(edgectx_url):
    with ConversationStore() as store:
        conversation = RemoteConversation(RemoteEngine.connect(edgectx_url), store, _settings())
        first = conversation.send("Tell me a story.", on_piece=lambda p: None)
        second = conversation.send("Go on.", on_piece=lambda p: None)
        assert first.reused_tokens < first.prompt_tokens
        assert second.reused_tokens >= first.prompt_tokens


def test_an_ingested_document_is_restored_by_the_server(tiny, edgectx_url, serve_home, tmp_path):
    """The remote conversation sends the document as edgectx's own opening; the server finds the snapshot
    `edgectx ingest` made of exactly those tokens and reads only the question."""
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\n" + "".join(f"Item {i}: the fox jumps over the dog.\n" for i in range(50)))
    ingest = subprocess.run([sys.executable, "-m", "edgectx", "ingest", str(doc), "--model", str(tiny), *SERVE_MEMORY,
                             "--json"], capture_output=True, text=True, timeout=300, cwd="/", env={**os.environ, **serve_home})
    assert ingest.returncode == 0, ingest.stderr
    n_doc = json.loads(ingest.stdout)[0]["n_tokens"]
    assert n_doc > 500
    with ConversationStore() as store:
        conversation = RemoteConversation(RemoteEngine.connect(edgectx_url), store, _settings())
        line = conversation.attach([read_document(doc)])
        assert "notes.md" in line
        stats = conversation.send("What is item 7?", on_piece=lambda p: None)
        assert stats.reused_tokens >= n_doc  # restored, not read: the prompt's first n_doc tokens came from the snapshot
        (row,) = store.list_conversations()
        assert [d.path for d in store.documents.attached(row.id)] == [str(doc)]


def test_doctor_checks_the_configured_engine(edgectx_url, tmp_path):
    config = os.environ["EDGECTX_CONFIG"]
    with open(config, "w") as f:
        f.write(f'engine_url = "{edgectx_url}"\n')
    checks = {c["name"]: c for c in json.loads(run_cli("doctor", "--json").stdout)["checks"]}
    assert checks["engine"]["ok"] and "remote engine" in checks["engine"]["detail"]
    with open(config, "w") as f:
        f.write('engine_url = "http://127.0.0.1:9/v1"\n')
    result = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert not checks["engine"]["ok"] and "cannot be reached" in checks["engine"]["advice"] and result.returncode == 1


def test_a_remote_engine_that_refuses_the_key(tiny, serve_home):
    with edgectx_server(tiny, *SERVE_MEMORY, env={**serve_home, "EDGECTX_API_KEY": "k1"}) as url:
        with pytest.raises(RemoteEngineError, match="refused the API key"):
            RemoteEngine.connect(url, api_key="wrong")
        assert RemoteEngine.connect(url, api_key="k1").model == tiny.stem


@pytest.mark.anyio
async def test_the_tui_over_a_remote_engine(engine_url):
    from edgectx.tui.bridge import Bridge
    from edgectx.tui.widgets.prompt import PromptInput
    from edgectx.tui.widgets.status import StatusBar

    with ConversationStore() as store:
        app = RecordingApp(Bridge(lambda progress: RemoteEngine.connect(engine_url), store, _settings()))
        async with app.run_test() as pilot:
            await settle(pilot, app)
            assert "(remote engine)" in app.chat.query_one("Transcript").messages[-1][1]
            app.chat.query_one(PromptInput).focus()
            await pilot.press(*"Hello there", "enter")
            await settle(pilot, app)
            answer = shown(app)[-1]
            assert answer[0] == "assistant" and answer[1]
            (conversation,) = store.list_conversations()
            assert stored(store, conversation.id) == [("user", "Hello there"), answer]
            assert "memory gauge unavailable" in app.chat.query_one(StatusBar).full_text
            await pilot.press("ctrl+r")  # regenerate: the new answer takes the old one's place
            await settle(pilot, app)
            again = shown(app)[-1]
            assert again[0] == "assistant" and again[1] and shown(app).count(("user", "Hello there")) == 1
            assert stored(store, conversation.id) == [("user", "Hello there"), again]
            await pilot.press("f4")  # settings open; the budget cannot change a remote engine's memory
            await pilot.press("escape")
            assert not [n for n, severity in app.notes if severity == "error"]
