"""`edgectx serve` with real clients: the `openai` package and raw HTTP against a server this module starts on a
free local port with a tiny GGUF (and, marked slow, the embedded model). Nothing is faked: the answers come from
the engine through uvicorn."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from openai import OpenAI

from server_helpers import edgectx_server
from tiny_gguf import write_tiny_gguf

GREEDY = dict(temperature=0, max_tokens=6)


def _home(tmp_path_factory) -> dict:
    """The server's own isolated data dirs (module fixtures start before the per-test isolation applies)."""
    root = tmp_path_factory.mktemp("serve-home")
    return {"EDGECTX_HOME": str(root / "home"), "EDGECTX_CONFIG": str(root / "config.toml"), "HOME": str(root / "user")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Trained for 512 tokens: prompts of a few thousand run past the window, read in chunks with eviction.
    return write_tiny_gguf(tmp_path_factory.mktemp("serve-model") / "tiny.gguf", context_length=512)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    # fp16 weights: float32 arithmetic that no chunking changes, so a greedy answer is the same however its
    # prompt was read (GGUF blocks round activations to 8 bits, which moves near-ties: tests/test_ggml_linear.py).
    with edgectx_server(tiny, "--weights", "fp16", "--budget", "256", "--chunk", "128", "--conversations", "1", "--max-body-mib", "1",
                        "--max-tokens", "4000", env=_home(tmp_path_factory)) as url:
        yield url


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def _health(url: str) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = _health(server)
    assert health["status"] == "ok" and health["queue"] == {"running": 0, "waiting": 0}


def test_answer_stream_and_second_turn_reuse(client):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    first = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    answer = first.choices[0].message.content
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 6 and answer
    assert first.usage.total_tokens == first.usage.prompt_tokens + 6

    # The same request streamed: the same greedy answer, piece by piece, and usage in the last chunk.
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == first.usage.prompt_tokens
    assert "citations" in chunks[-2].model_extra["edgectx"]  # the finishing chunk carries them

    # The second turn prefills only its new tokens: the first prompt (and answer) come from memory.
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert cached < second.usage.prompt_tokens


def test_a_seed_makes_sampling_repeat(client):
    messages = [{"role": "user", "content": "Pick some letters at random."}]
    answers = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=1.0, seed=seed,
                                              max_tokens=12).choices[0].message.content for seed in (7, 7, 8)]
    assert answers[0] == answers[1] != answers[2]


def test_a_prompt_past_the_trained_window_is_read_whole_with_progress(client):
    """3,000 tokens on a model trained for 512, with a 256-token budget: read in chunks, nothing cut off."""
    text = "".join(f"line {i}: the fox jumps over the dog. " for i in range(120))
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    progress = [c.model_extra["edgectx"]["prefill"] for c in chunks if "prefill" in (c.model_extra or {}).get("edgectx", {})]
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 3000 and usage.prompt_tokens_details.cached_tokens == 0
    assert len(progress) == -(-usage.prompt_tokens // 128)  # one per 128-token chunk
    assert progress[-1] == {"done": usage.prompt_tokens, "total": usage.prompt_tokens}
    assert usage.completion_tokens == 6
    # Past the budget the memory evicted and retrieved: the passages it brought back are the prompt's own text.
    citations = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].model_extra["edgectx"]["citations"]
    prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert citations and all(c["text"] in prompt and c["document"] is None for c in citations)
    assert all(0 <= c["start_token"] < c["end_token"] <= usage.prompt_tokens and c["score"] > 0 for c in citations)


def test_citations_name_the_document_they_lie_in(client):
    body = "".join(f"Entry {i}: the fox jumps over the dog.\n" for i in range(80))
    messages = [{"role": "system", "content": f'<document name="notes.md">\n{body}\n</document>\n\nAnswer briefly.'},
                {"role": "user", "content": "What is entry 5?"}]
    response = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    citations = response.model_extra["edgectx"]["citations"]
    inside = [c for c in citations if c["document"] == "notes.md"]
    assert inside and any(c["text"] in body for c in inside)
    assert all(c["text"] in body for c in inside if "<" not in c["text"])  # whole blocks of the text are its own


def test_conversations_take_turns_through_ram_and_disk(client):
    """With --conversations 1, a second conversation sends the first to disk; its next turn restores it."""
    a = [{"role": "user", "content": "Conversation A: " + "alpha " * 40}]
    b = [{"role": "user", "content": "Conversation B: " + "beta " * 40}]
    first_a = client.chat.completions.create(model="tiny", messages=a, **GREEDY)
    first_b = client.chat.completions.create(model="tiny", messages=b, **GREEDY)
    assert first_b.usage.prompt_tokens_details.cached_tokens < 10  # nothing of A is B's
    a += [{"role": "assistant", "content": first_a.choices[0].message.content}, {"role": "user", "content": "More."}]
    second_a = client.chat.completions.create(model="tiny", messages=a, **GREEDY)
    assert second_a.usage.prompt_tokens_details.cached_tokens >= first_a.usage.prompt_tokens
    b += [{"role": "assistant", "content": first_b.choices[0].message.content}, {"role": "user", "content": "More."}]
    second_b = client.chat.completions.create(model="tiny", messages=b, **GREEDY)
    assert second_b.usage.prompt_tokens_details.cached_tokens >= first_b.usage.prompt_tokens


def test_a_client_that_leaves_mid_stream_stops_the_answer(server, client):
    messages = [{"role": "user", "content": "Write a very long story."}]
    body = {"model": "tiny", "messages": messages, "stream": True, "max_tokens": 3000, "temperature": 0}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60) as response:
        pieces = 0
        for line in response.iter_lines():
            if line.startswith("data:") and '"content": "' in line:
                pieces += 1
            if pieces >= 3:
                break  # leaving closes the connection
    deadline = time.monotonic() + 10
    while _health(server)["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(server)["queue"]["running"] == 0  # 3,000 tokens would take far longer than this
    held = _health(server)["conversations"]["tokens"]
    assert held < 1000  # the prompt and the few tokens made before the client left, not 3,000
    # The memory is consistent: the same conversation goes on, its prompt reused.
    again = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert again.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens  # the prompt's logits were kept


def test_a_client_that_leaves_a_whole_answer_stops_it(server):
    """Not streamed: the server notices the closed connection while it waits for the answer (once a second)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Another long story."}], "max_tokens": 4000,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    deadline = time.monotonic() + 10
    while _health(server)["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    # Stopped within about two seconds of the client leaving, well before the 4,000 tokens it asked for.
    assert _health(server)["queue"]["running"] == 0 and _health(server)["conversations"]["tokens"] < 3000


def test_two_clients_at_once_are_answered_one_after_the_other(server, client):
    # Within the budget (prompt and answer about 220 tokens each): nothing is evicted, so a memory cut back to the
    # prompt is exactly a fresh read and the greedy answer must repeat.
    requests = {name: [{"role": "user", "content": f"{name}: say something"}] for name in ("one", "two")}
    answers, seen = {}, []

    def ask(name):
        answers[name] = client.chat.completions.create(model="tiny", messages=requests[name], temperature=0,
                                                       max_tokens=200).choices[0].message.content

    first, second = (threading.Thread(target=ask, args=(name,)) for name in requests)
    first.start()
    deadline = time.monotonic() + 30
    while _health(server)["queue"]["running"] == 0 and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    second.start()  # while the first is being answered
    while first.is_alive() or second.is_alive():
        seen.append(_health(server)["queue"])
        time.sleep(0.01)
    first.join()
    second.join()
    assert max(q["running"] for q in seen) == 1  # never two at once
    assert any(q == {"running": 1, "waiting": 1} for q in seen)  # the second waited its turn
    for name, messages in requests.items():  # each got its own conversation's greedy answer
        alone = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=200)
        assert answers[name] == alone.choices[0].message.content


def test_full_attention_refuses_a_prompt_longer_than_its_context(tiny, tmp_path_factory):
    """With --budget full nothing is silently cut: a prompt past the context is a 400 that says so."""
    with edgectx_server(tiny, "--budget", "full", env=_home(tmp_path_factory)) as url:
        long = {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 4}
        response = httpx.post(f"{url}/chat/completions", json=long, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert "1,0" in response.json()["error"]["message"] and "512" in response.json()["error"]["message"]
        short = httpx.post(f"{url}/chat/completions", json={**long, "messages": [{"role": "user", "content": "hi"}]},
                           timeout=60)
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4


def test_binding_beyond_loopback_needs_an_api_key(tiny):
    from cli_helpers import assert_one_sentence, run_cli

    result = run_cli("serve", "--model", str(tiny), "--host", "0.0.0.0", timeout=60)
    assert_one_sentence(result, "--api-key", "EDGECTX_API_KEY")
    assert result.returncode == 2


def test_the_api_key_is_checked_as_a_bearer_token(tiny, tmp_path_factory):
    with edgectx_server(tiny, "--budget", "256", env={**_home(tmp_path_factory), "EDGECTX_API_KEY": "s3cret"}) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        good = OpenAI(base_url=url, api_key="s3cret", max_retries=0).chat.completions.create(
            model="tiny", messages=body["messages"], max_tokens=2)
        assert good.usage.completion_tokens == 2


BAD = [  # (what, body bytes or JSON, status, param)
    ("not JSON", b"{messages: [", 400, None),
    ("a JSON list", [1, 2], 400, None),
    ("no messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("a bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content a number", {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    ("an image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    ("temperature a string", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("top_p above 1", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("max_tokens past the limit", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens negative", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ("stop a number", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
    ("stream a string", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("n of 3", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("a seed past 64 bits", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "seed"),
    ("a body past the limit", {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}, 413, None),
]


def test_malformed_requests_get_4xx_json_errors_and_the_server_goes_on(server, client):
    base = server.removesuffix("/v1")
    for what, body, status, param in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server}/chat/completions", content=content,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith("."), what
        assert error["param"] == param, what
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404)):
        response = httpx.request(method, base + path, timeout=10)
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    # Still serving.
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert ok.usage.completion_tokens == 6 and _health(server)["status"] == "ok"


@pytest.mark.slow
def test_end_to_end_with_the_embedded_model(embedded_model, tmp_path_factory):
    """SmolLM2 behind `edgectx serve`, the openai client streaming a two-turn conversation."""
    with edgectx_server(embedded_model, env=_home(tmp_path_factory)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                                     stream=True, stream_options={"include_usage": True},
                                                     temperature=0, max_tokens=24))
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in answer and len(chunks) > 10  # streamed piece by piece
        first = chunks[-1].usage
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And Italy?"}]
        second = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
        assert "Rome" in second.choices[0].message.content
        assert second.usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens
        # A stop string ends the answer before it (and is not sent); finish_reason says "stop".
        stopped = client.chat.completions.create(model="smollm2", messages=messages[:1], temperature=0, max_tokens=24,
                                                 stop=["Paris"])
        assert stopped.choices[0].finish_reason == "stop" and "Paris" not in stopped.choices[0].message.content
        assert answer.startswith(stopped.choices[0].message.content)
