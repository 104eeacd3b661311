"""A reasoning model behind `edgectx serve`: its thinking comes apart from its answer as `reasoning_content`
(edgectx.chat.reasoning), `reasoning_format: "none"` keeps it in the content, and `chat_template_kwargs` reach
the model's template. A real server on a local port with a tiny GGUF whose template opens a thinking block in
the generation prompt (as DeepSeek-R1's does) unless `enable_thinking` is false (then an empty one, as Qwen3's);
its random weights never close the block, so all it writes is thinking."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from cli_helpers import run_cli
from server_helpers import edgectx_server
from tiny_gguf import THINKING_TEMPLATE, write_tiny_gguf

ASK = dict(model="tiny", messages=[{"role": "user", "content": "Why is the sky blue?"}], temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_gguf(tmp_path_factory.mktemp("reasoning") / "tiny.gguf", chat_template=THINKING_TEMPLATE)
    root = tmp_path_factory.mktemp("reasoning-home")
    env = {"EDGECTX_HOME": str(root / "home"), "EDGECTX_CONFIG": str(root / "config.toml"), "HOME": str(root / "user")}
    with edgectx_server(model, "--weights", "fp16", env=env) as url:
        yield url


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def test_thinking_comes_apart_and_none_keeps_it_in_the_content(client):
    split = client.chat.completions.create(**ASK).choices[0].message
    thinking = split.model_extra.get("reasoning_content")
    assert thinking and split.content == ""
    inline = client.chat.completions.create(**ASK, extra_body={"reasoning_format": "none"}).choices[0].message
    assert inline.content.strip() == thinking.strip() and "reasoning_content" not in inline.model_extra


def test_a_stream_sends_thinking_as_reasoning_content_deltas(client):
    whole = client.chat.completions.create(**ASK).choices[0].message.model_extra["reasoning_content"]
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**ASK, stream=True) if c.choices]
    streamed = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert streamed == whole and not "".join(d.content or "" for d in deltas)


def test_template_kwargs_reach_the_template(client):
    off = client.chat.completions.create(**ASK, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = off.choices[0].message
    assert message.content and "reasoning_content" not in message.model_extra  # the block closed: an answer


@pytest.mark.parametrize("body,param", [({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                                        ({"chat_template_kwargs": {"x": [1]}}, "chat_template_kwargs"),
                                        ({"chat_template_kwargs": "yes"}, "chat_template_kwargs"),
                                        ({"reasoning_format": "raw"}, "reasoning_format")])
def test_bad_reasoning_fields_get_a_400_naming_them(server, body, param):
    response = httpx.post(server + "/chat/completions", json={**ASK, **body}, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and error["message"].endswith(".")


def test_edgectx_chat_against_the_server_puts_thinking_on_stderr_and_keeps_the_block(server, client):
    """`edgectx chat --engine URL`: the thinking the server sends apart goes to stderr (stdout: the answer alone, here
    empty), and the conversation keeps the answer as the model wrote it, the block back in its tags."""
    from edgectx.chat.conversation import Settings
    from edgectx.chat.remote import RemoteConversation, RemoteEngine
    from edgectx.model.sampling import SamplingParams
    from edgectx.store.conversations import ConversationStore

    whole = client.chat.completions.create(**ASK).choices[0].message.model_extra["reasoning_content"]
    with ConversationStore() as store:
        conversation = RemoteConversation(RemoteEngine.connect(server), store, Settings(sampling=SamplingParams(temperature=0), max_tokens=8))
        answer, thinking = [], []
        conversation.send(ASK["messages"][0]["content"], on_piece=answer.append, on_reasoning=thinking.append)
        assert "".join(thinking) == whole and not "".join(answer)
        assert conversation.messages[-1]["content"] == "<think>" + whole
        plain = RemoteConversation(RemoteEngine.connect(server), store,
                                   Settings(sampling=SamplingParams(temperature=0), max_tokens=8, thinking=False))
        answer, thinking = [], []
        plain.send(ASK["messages"][0]["content"], on_piece=answer.append, on_reasoning=thinking.append)
        assert "".join(answer) and not thinking  # chat_template_kwargs reached the server's template
    result = run_cli("chat", "--engine", server, "--prompt", ASK["messages"][0]["content"], "--max-tokens", "8",
                     "--temperature", "0")
    assert result.returncode == 0 and result.stdout.strip() == "" and whole in result.stderr
