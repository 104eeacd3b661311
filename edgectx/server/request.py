"""A chat-completions request, checked field by field: what the engine runs, or an ApiError naming the field.

OpenAI's fields that change the answer are honoured (`messages`, `temperature`, `top_p`, `max_tokens` or
`max_completion_tokens`, `stop`, `seed`, `stream`, `stream_options.include_usage`), and two that llama.cpp's and
vLLM's servers take: `chat_template_kwargs` (variables for the model's chat template, such as Qwen3's
`enable_thinking`) and `reasoning_format` ("none" keeps a reasoning model's `<think>` block in the answer's
text; otherwise it comes apart as `reasoning_content`, edgectx.chat.reasoning); fields that only
describe the client (`user`, `metadata`, ...) are ignored; what this server cannot do as asked (`n` > 1,
`logprobs`, a JSON `response_format`, images) is refused, never silently dropped.

    request = parse_chat_request(json.loads(body), Limits(max_tokens=4096))
    request.sampling, request.max_tokens, request.stream
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgectx.model.chat_template import TEMPLATE_NAMES
from edgectx.model.sampling import SamplingParams
from edgectx.server.errors import ApiError

ROLES = {"system", "developer", "user", "assistant"}  # developer: OpenAI's newer name for system
MAX_STOPS = 16
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 4096  # the longest answer a request may ask for (and what it gets when it does not ask)
    max_body_bytes: int = 32 * 2**20  # a request body; a million-token prompt is about 4 MiB of text


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    extra: dict = field(default_factory=dict)
    template_kwargs: dict = field(default_factory=dict)  # chat_template_kwargs
    reasoning_inline: bool = False  # reasoning_format "none": the thinking stays in the content


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code or "invalid_value")


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise _bad(f"{name} must be a number from {low:g} to {high:g}, got {value!r}.", name)
    return float(value)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""  # an assistant turn that only called tools: no text
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content parts must be text parts ({{\"type\": \"text\", \"text\": ...}}): "
                           "this model reads text only.", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts.", f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {\"role\", \"content\"} objects.", "messages",
                   "missing_required_parameter" if messages is None else "invalid_value")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}.", f"messages[{i}].role")
        checked.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    if checked[-1]["role"] == "assistant":
        raise _bad("The last message must not be the assistant's: there is nothing to answer.", "messages")
    return checked


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them.", "stop")
    return tuple(stops)


def _max_tokens(body: dict, limits: Limits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return limits.max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_tokens:
        raise _bad(f"{name} must be a whole number from 1 to {limits.max_tokens} (this server's limit), got {value!r}.", name)
    return value


def _refuse_what_cannot_be_done(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1: this server writes one answer per request, got {n!r}.", "n")
    if body.get("logprobs") not in (None, False):
        raise _bad("logprobs are not available from this server.", "logprobs", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format must be {\"type\": \"text\"}: this server cannot constrain answers to JSON.",
                   "response_format", "unsupported_parameter")


MAX_TEMPLATE_KWARGS = 16
REASONING_FORMATS = ("auto", "deepseek", "none")


def _template_kwargs(body: dict) -> dict:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_TEMPLATE_KWARGS or not all(
            isinstance(k, str) and k.isidentifier() and k not in TEMPLATE_NAMES and
            (v is None or isinstance(v, (bool, int, float, str))) for k, v in kwargs.items()):
        raise _bad(f"chat_template_kwargs must be an object of at most {MAX_TEMPLATE_KWARGS} names (not "
                   f"{', '.join(sorted(TEMPLATE_NAMES))}) with plain values (true, 1, \"text\").", "chat_template_kwargs")
    return dict(kwargs)


def _reasoning_inline(body: dict) -> bool:
    value = body.get("reasoning_format")
    if value is not None and value not in REASONING_FORMATS:
        raise _bad(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, got {value!r}.", "reasoning_format")
    return value == "none"


def parse_chat_request(body, limits: Limits) -> ChatRequest:
    """The request in `body` (parsed JSON), or an ApiError (400) that names the first field at fault."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    _refuse_what_cannot_be_done(body)
    messages = _messages(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object.", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise _bad(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.", "seed")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _bad("model must be a string.", "model")
    defaults = SamplingParams()
    sampling = SamplingParams(temperature=_number(body, "temperature", 0, 2, defaults.temperature),
                              top_p=_number(body, "top_p", 0, 1, defaults.top_p), top_k=defaults.top_k,
                              repeat_penalty=defaults.repeat_penalty, seed=seed)
    return ChatRequest(messages, sampling, _max_tokens(body, limits), _stop(body), stream,
                       include_usage=bool(options.get("include_usage")), model=model,
                       template_kwargs=_template_kwargs(body), reasoning_inline=_reasoning_inline(body))
