"""One request at a time on the engine: a single worker thread answers the queued requests in order.

The engine is not thread-safe and one answer uses every core, so requests queue (`/health` shows how many run
and wait). Each job reports to the request's handler through events on an asyncio queue: `accepted` (the prompt
fits; from here on a stream may start), `progress` (prefill chunks), `piece` (answer text), `reasoning` (a
reasoning model's thinking, told apart from its answer: edgectx.chat.reasoning), `done` (usage,
finish reason, citations) or `error` (an ApiError). `Job.cancel()` (the client left) stops the job at the next
chunk or token; the memory keeps what was read or generated, so it stays consistent for the next request.

    runner = Runner(engine, pool)
    job = runner.submit(request, loop)
    event = await job.events.get()
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edgectx.chat.reasoning import Routing, prompt_opens_thinking, template_reasons
from edgectx.engine import Cancelled, ContextFullError, Engine
from edgectx.errors import EdgectxError
from edgectx.server.errors import ApiError
from edgectx.server.pool import MemoryPool
from edgectx.server.request import ChatRequest

log = logging.getLogger("edgectx.server")
FINISH = {"eog": "stop", "stop_string": "stop", "max_tokens": "length", "context": "length", "cancelled": "stop"}
_DOC_OPEN = re.compile(r'<document name="([^"]*)">')


@dataclass
class Event:
    kind: str  # accepted | progress | piece | reasoning | done | error
    data: dict = field(default_factory=dict)
    text: str = ""
    error: ApiError | None = None


class Job:
    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


def passages(engine: Engine, retrieved: list[dict]) -> list[dict]:
    """The retrieved blocks as passages of the prompt: their text, token span, score and the `<document>` they
    lie in (as edgectx's own opening and `edgectx chat --engine` name documents), when they lie in one."""
    tokens, decode = engine.tokens, engine.tokenizer.decode
    found = []
    for block in retrieved:
        start, end = block["start_token"], block["end_token"]
        before = decode(tokens[:start])
        opened = list(_DOC_OPEN.finditer(before))
        document = opened[-1].group(1) if opened and "</document>" not in before[opened[-1].end():] else None
        found.append({"document": document, "start_token": start, "end_token": end, "score": round(block["score"], 4),
                      "text": decode(tokens[start:end])})
    return found


class Runner:
    def __init__(self, engine: Engine, pool: MemoryPool):
        self.engine, self.pool = engine, pool
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgectx-engine")
        self._lock = threading.Lock()
        self._closing = threading.Event()  # the server stops: the running answer stops at its next chunk or token
        self.waiting = 0
        self.running = 0

    def submit(self, request: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(request, loop)
        with self._lock:
            self.waiting += 1
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            if not self._stopped(job):  # a client that left while it waited costs nothing
                self._answer(job)
        except ApiError as e:
            job.emit(Event("error", error=e))
        except Cancelled:
            job.emit(Event("error", error=ApiError(499, "The request was cancelled.", code="cancelled")))
        except ContextFullError as e:
            job.emit(Event("error", error=ApiError(400, str(e), param="messages", code="context_length_exceeded")))
        except EdgectxError as e:
            job.emit(Event("error", error=ApiError(400, str(e))))
        except Exception:  # the sentence goes to the client, the traceback to the server's log
            log.exception("a request failed")
            job.emit(Event("error", error=ApiError(500, "The server failed while answering: see its log.")))
        finally:
            with self._lock:
                self.running -= 1

    def _answer(self, job: Job) -> None:
        engine, pool, request = self.engine, self.pool, job.request
        text = engine.template.render(request.messages, add_generation_prompt=True, **request.template_kwargs)
        plan = pool.choose(text)
        if engine.memory_config is None and len(plan.ids) > engine.n_ctx:
            raise ContextFullError(f"The prompt is {len(plan.ids):,} tokens but the context holds {engine.n_ctx:,}: "
                                   "shorten it, or serve with the long-context memory (a --budget, not 'full').")
        job.emit(Event("accepted", {"prompt_tokens": len(plan.ids)}))
        progress = lambda done, total: job.emit(Event("progress", {"done": done, "total": total}))  # noqa: E731
        cancel = lambda: self._stopped(job)  # noqa: E731
        reused = pool.apply(plan, progress=progress, cancel=cancel)
        start = len(engine.tokens)
        route = Routing(lambda part: job.emit(Event("piece", text=part)),
                        lambda part: job.emit(Event("reasoning", text=part)),
                        reasons=not request.reasoning_inline and template_reasons(engine.template.source),
                        opened=lambda: prompt_opens_thinking(text))
        for piece in engine.generate(request.sampling, max_tokens=request.max_tokens, stop=request.stop,
                                     cancel=cancel):
            route(piece)
        route.close()
        stats = engine.last_stats
        pool.finished(text + engine.tokenizer.decode(engine.tokens[start:]))
        usage = {"prompt_tokens": len(plan.ids), "completion_tokens": stats.generated_tokens,
                 "total_tokens": len(plan.ids) + stats.generated_tokens,
                 "prompt_tokens_details": {"cached_tokens": reused}}
        job.emit(Event("done", {"usage": usage, "finish_reason": FINISH.get(stats.stop_reason, "stop"),
                                "citations": passages(engine, stats.retrieved),
                                "prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4)}))

    def _stopped(self, job: Job) -> bool:
        return job.cancelled.is_set() or self._closing.is_set()

    def stop(self) -> None:
        """The server is stopping: the running answer ends at its next chunk or token (the memory keeps what it
        has), so the server does not wait for a long prefill to finish."""
        self._closing.set()

    def close(self) -> None:
        """Stop, drop the waiting requests, and wait for the engine's thread."""
        self.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
