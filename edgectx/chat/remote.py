"""A remote engine: any server of the OpenAI chat-completions API (vLLM, llama.cpp's server, Ollama, another
`edgectx serve`) behind edgectx's own chat, TUI, history and export.

`RemoteEngine` talks HTTP (httpx) and streams answers; `RemoteConversation` is `Conversation`'s counterpart
for it, with the same methods, so `edgectx chat --engine URL` and the TUI drive either. What works remotely:
chat, streaming, stop (the stream is closed, which stops a server's generation), regenerate, edit, history,
export, documents (sent as the same `<document>` opening as the local engine's, so the server's prefix cache
serves later turns). What needs the local memory is unavailable, never faked: the memory gauge
(`stats()` says "remote"), snapshots, citations, the cached / to-prefill figure before sending.

    engine = RemoteEngine.connect("http://127.0.0.1:8000/v1", api_key=os.environ.get("EDGECTX_ENGINE_API_KEY"))
    conversation = RemoteConversation(engine, store, Settings(system="Be brief."))
    conversation.send("Hello", on_piece=print)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import httpx

from edgectx.chat.citations import Citation
from edgectx.chat.conversation import OnPiece, Problem, Resumption, Settings
from edgectx.chat.documents import Document
from edgectx.chat.opening import document_block, system_content
from edgectx.chat.reasoning import CLOSE, OPEN, Routing
from edgectx.chat.recorder import ChatRecorder, load_resumed
from edgectx.engine import Cancel, GenerationStats, Progress
from edgectx.errors import EdgectxError, UsageError
from edgectx.store.conversations import ConversationStore

KEY_ENVS = ("EDGECTX_ENGINE_API_KEY", "OPENAI_API_KEY")  # the remote engine's key, first found
FINISH = {"stop": "eog", "length": "max_tokens"}  # OpenAI's finish_reason -> GenerationStats.stop_reason
UNAVAILABLE = "unavailable with a remote engine"


class RemoteEngineError(EdgectxError):
    """The remote engine cannot be reached, refuses the key, or answers with an error."""


def api_key_from_env() -> str | None:
    return next((os.environ[name] for name in KEY_ENVS if os.environ.get(name)), None)


def _error_sentence(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or response.reason_phrase or "no reason given").split())[:300]


class RemoteEngine:
    """The parts of an engine a conversation needs, served by a remote OpenAI-compatible server."""

    tokenizer = None  # the server tokenizes; token counts come back in its usage figures
    memory_config = None

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Reading waits without limit: a long document's prefill on the server can take minutes before the first token.
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, read=None))
        self.model = model or ""
        self.path = Path(self.model or "remote")
        self.fingerprint = f"remote:{self.url}"
        self.last_stats = GenerationStats()

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, model: str | None = None) -> "RemoteEngine":
        """Check the server answers (its model list); the first model it lists is used unless one is named."""
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"The engine URL must start with http:// or https:// (got {url!r}), e.g. "
                             "http://127.0.0.1:8000/v1.")
        engine = cls(url, api_key, model)
        models = engine.models()
        if not engine.model:
            if not models:
                raise RemoteEngineError(f"The engine at {engine.url} lists no model: name one with --engine-model.")
            engine.model = models[0]
        engine.path = Path(engine.model)
        return engine

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RemoteEngineError(f"The engine at {self.url} cannot be reached ({type(e).__name__}): is it running, "
                                    "and is the URL right (it usually ends in /v1)?") from None
        self._check(response)
        return response

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            raise RemoteEngineError(f"The engine at {self.url} refused the API key: set EDGECTX_ENGINE_API_KEY "
                                    "(or OPENAI_API_KEY).")
        if response.status_code >= 400:
            response.read()
            raise RemoteEngineError(f"The engine at {self.url} answered {response.status_code}: {_error_sentence(response)}")

    def models(self) -> list[str]:
        try:
            data = self._request("GET", "/models").json().get("data", [])
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, AttributeError):
            raise RemoteEngineError(f"{self.url}/models is not an OpenAI-compatible model list: is the URL right "
                                    "(it usually ends in /v1)?") from None

    def describe(self) -> str:
        return f"{self.model} at {self.url} (remote engine)"

    def stats(self) -> dict:
        """No memory gauge: the server's memory is its own."""
        return {"remote": self.url}

    def chat(self, messages: list[dict[str, str]], settings: Settings, cancel: Cancel | None = None) -> Iterator[str]:
        """Stream the answer to `messages`; `cancel()` closes the stream (the server stops). Figures land in
        `last_stats` (prompt and cached tokens as the server reports them)."""
        s = settings.sampling
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "temperature": s.temperature, "top_p": s.top_p, "max_tokens": settings.max_tokens}
        if s.seed is not None:
            body["seed"] = s.seed
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.template_vars:  # what llama.cpp's, vLLM's and edgectx's servers pass to the template
            body["chat_template_kwargs"] = settings.template_vars
        stats = self.last_stats = GenerationStats()
        t0 = time.perf_counter()
        first, thinking = None, False
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if cancel and cancel():
                        stats.stop_reason = "cancelled"
                        break
                    if not line.startswith("data:"):
                        continue  # SSE comments and blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RemoteEngineError(f"The engine at {self.url} failed: {chunk['error'].get('message', chunk['error'])}")
                    self._usage(chunk.get("usage"), stats)
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        piece, thought = delta.get("content"), delta.get("reasoning_content")
                        # A reasoning model's thinking, sent apart (edgectx's server, llama.cpp's, vLLM's): back in
                        # its tags, so the answer reads as a local model's would (edgectx.chat.reasoning)
                        if thought:
                            piece = ("" if thinking else OPEN) + thought + (piece or "")
                            thinking = True
                        elif piece and thinking:
                            piece, thinking = CLOSE + "\n\n" + piece, False
                        if piece:
                            first = first or time.perf_counter()
                            stats.generated_tokens += 1  # until usage says how many tokens they were
                            yield piece
                        if choice.get("finish_reason"):
                            stats.stop_reason = FINISH.get(choice["finish_reason"], choice["finish_reason"])
        except httpx.HTTPError as e:
            raise RemoteEngineError(f"The connection to the engine at {self.url} broke ({type(e).__name__}).") from None
        except (ValueError, AttributeError):
            raise RemoteEngineError(f"The engine at {self.url} sent a stream this client cannot read.") from None
        end = time.perf_counter()
        stats.prefill_s = (first or end) - t0
        stats.decode_s = end - (first or end)

    @staticmethod
    def _usage(usage, stats: GenerationStats) -> None:
        if not isinstance(usage, dict):
            return
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        stats.generated_tokens = int(usage.get("completion_tokens") or stats.generated_tokens)
        details = usage.get("prompt_tokens_details") or {}
        stats.reused_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0

    def close(self) -> None:
        self.client.close()


class RemoteConversation:
    """`edgectx.chat.conversation.Conversation`'s methods over a RemoteEngine: the messages live here and go to
    the server whole with every turn; documents open the first system message as they do locally."""

    def __init__(self, engine: RemoteEngine, store: ConversationStore, settings: Settings | None = None,
                 record: bool = True):
        self.engine, self.store, self.record = engine, store, record
        self.settings = settings or Settings()
        self.opening = None  # no local memory: documents are text in the first message
        self.snapshot_state = None
        self.new()

    def new(self) -> None:
        self._begin(self.settings.system, [], [], None)

    def _begin(self, system: str | None, documents: list[Document], document_ids: list[int], stored,
               turns: list[dict[str, str]] = ()) -> None:
        self.documents = list(documents)
        content = system_content("".join(document_block(d) for d in self.documents), system)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": content}] if content else []
        self.messages += list(turns)
        self.recorder = ChatRecorder(self.store if self.record else None, self.engine, system, self.documents,
                                     document_ids, stored)
        if stored is not None and self.record:
            for doc_id in document_ids:
                self.store.documents.attach(stored.id, doc_id)

    @property
    def id(self) -> int | None:
        return self.recorder.conversation.id if self.recorder.conversation is not None else None

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
        self.recorder.new_conversation()

    def attach(self, documents: list[Document], progress: Progress | None = None, cancel: Cancel | None = None,
               on_problem: Problem | None = None) -> str:
        """Add documents to the opening (the server reads them with the next message)."""
        held = {d.sha256 for d in self.documents}
        new = [d for d in documents if d.sha256 not in held]
        if not new:
            return f"{', '.join(d.path.name for d in documents)} is already attached to this conversation."
        turns = [m for m in self.messages if m["role"] != "system"]
        all_docs = self.documents + new
        ids = [self.store.documents.add_read(d).id for d in all_docs] if not self.store.read_only else []
        self._begin(self.recorder.system, all_docs, ids, self.recorder.conversation, turns)
        chars = sum(len(d.text) for d in new)
        return f"{', '.join(d.path.name for d in new)}: {chars:,} characters, sent to the engine with the next message"

    def resume(self, conversation_id: int, documents: list[Document] = (), progress: Progress | None = None,
               cancel: Cancel | None = None, on_problem: Problem | None = None) -> Resumption:
        resumed = load_resumed(self.store, conversation_id, self.settings.max_file_bytes)
        system = resumed.conversation.system_prompt or self.settings.system
        held = {d.sha256 for d in resumed.documents}
        docs = resumed.documents + [d for d in documents if d.sha256 not in held]
        ids = [self.store.documents.add_read(d).id for d in docs] if not self.store.read_only else []
        self._begin(system, docs, ids, resumed.conversation, resumed.messages)
        line = f"{', '.join(d.path.name for d in docs)}: sent to the engine with the next message" if docs else None
        return Resumption(resumed.conversation, resumed.messages, resumed.warnings, line)

    def send(self, text: str, on_piece: OnPiece, cancel: Cancel | None = None,
             progress: Progress | None = None, on_reasoning: OnPiece | None = None) -> GenerationStats:
        """One exchange: the user's message is stored before the answer, the answer (a stopped one too) after.
        `on_reasoning`: a reasoning model's thinking goes there (as Conversation.send)."""
        self.recorder.user(text)
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        route = Routing(on_piece, on_reasoning)
        try:
            for piece in self.engine.chat(self.messages, self.settings, cancel=cancel):
                pieces.append(piece)
                route(piece)
            route.close()
        except BaseException:
            if not pieces:  # nothing came back: the message leaves again, here and in the store
                self.messages.pop()
                self._unstore_last_message()
                raise
            self._keep(pieces)
            raise
        if not pieces and self.engine.last_stats.stop_reason == "cancelled":  # stopped before any answer
            self.messages.pop()
            self._unstore_last_message()
            return self.engine.last_stats
        self._keep(pieces)
        return self.engine.last_stats

    def _keep(self, pieces: list[str]) -> None:
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.recorder.assistant("".join(pieces), self.engine.last_stats)

    def _unstore_last_message(self) -> None:
        if self.id is None or self.recorder.store is None:
            return
        self.store.delete_last(self.id, 1)
        if not self.store.messages(self.id):
            self.store.delete_conversation(self.id)
            self.recorder.new_conversation()

    def redo(self, text: str | None, on_piece: OnPiece, cancel: Cancel | None = None,
             progress: Progress | None = None, on_reasoning: OnPiece | None = None) -> GenerationStats:
        """Send the last user message again (`text` None) or an edited one in its place."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last is None:
            raise UsageError("There is no message to send again yet.")
        content = self.messages[last]["content"]
        del self.messages[last:]
        if self.id is not None and self.recorder.store is not None:
            stored = self.store.messages(self.id)
            users = [i for i, m in enumerate(stored) if m.role == "user"]
            if users:
                self.store.delete_last(self.id, len(stored) - users[-1])
        return self.send(content if text is None else text, on_piece, cancel, progress, on_reasoning)

    def last_user_message(self) -> str | None:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else None

    def plan(self, text: str) -> None:
        """Unavailable: the server's cache is its own."""
        return None

    def citations(self) -> list[Citation]:
        """Unavailable: retrieval happens in the server's memory, if it has one."""
        return []

