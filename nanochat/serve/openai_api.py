"""The HTTP surface's requests and replies: OpenAI-compatible and page request bodies, input limits, the
translation between OpenAI content and the model's conversation parts, and the shared HTTP pieces (error
shape, body-size limit, SSE responses). It knows nothing of models or scheduling.

OpenAI compatibility decisions
    Unknown fields are refused with 400, so a client never silently loses a setting it relies on.
    Tool calls (calculator, python REPL, search; nanochat.tools.registry) run on the server. In OpenAI content
    they are visible text with the model's own markers, the tool named inside the call:
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"                   calculator
        "<|python_start|>python:\nx = 6\nx * 7<|python_end|><|output_start|>42<|output_end|>"   python
        "<|python_start|>search: capital of Velmora<|python_end|><|output_start|>[1] ...<|output_end|>"
    and assistant messages sent back are split on those markers again, so a conversation re-renders to
    exactly the tokens the model saw; the python REPL starts each reply from the python calls in the
    messages, so its variables last the conversation.
    usage.completion_tokens counts every token appended after the prompt: sampled, forced tool output,
    and the closing <|assistant_end|>.
"""
import json
import re
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.engine import TOOL_MARKERS
from nanochat.tokenizer import validate_messages


# --------------------------------------------------------------------------------------------
# limits and request bodies

@dataclass
class Limits:
    """Input limits; each has a command-line flag of the same name (--max-messages, ...)."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_max_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_learn_items: int = 256  # facts + conversations in one POST /learn
    max_learn_steps: int = 2000
    max_learn_jobs: int = 8  # queued or running; more get 429 with Retry-After
    max_adapters: int = 64
    max_adapter_bytes: int = 1 << 30  # all adapters on disk together
    job_ttl: float = 3600.0  # seconds a finished /learn job stays visible at /learn/{id}
    request_timeout: float = 30.0  # seconds for a request's headers and body to arrive
    max_n: int = 8  # choices per request (n)
    max_stop: int = 4  # stop strings per request, as OpenAI
    max_stop_chars: int = 64  # characters per stop string
    max_stack: int = 8  # adapters in one request's stack (`adapter` as a list)


@dataclass
class Defaults:
    """Sampling settings for requests that don't give their own."""
    temperature: float = 0.6
    top_k: int = 50
    max_tokens: int = 512


class RequestError(Exception):
    """A request we refuse; the message says what is wrong and, for a limit, which one."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class StrictBody(BaseModel):
    # unknown fields are refused, not silently ignored; strict: a bool or a string is no number (JSON Schema agrees)
    model_config = ConfigDict(extra="forbid", strict=True)


class Part(StrictBody):
    """A piece of an assistant message as the page keeps it (the format render_conversation takes)."""
    type: Literal["text", "python", "python_output"]
    text: str


class PageMessage(StrictBody):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class PageRequest(StrictBody):
    messages: list[PageMessage]
    adapter: str | list[str] | None = None  # an adapter's name, "none" for the base model, or a list of names
    # (a stack: all apply, each times its weight); default: the active one
    adapter_weights: list[float] | None = None  # one per name in `adapter` (default 1.0 each)
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class OpenAIMessage(StrictBody):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(StrictBody):
    include_usage: bool = False


class OpenAIRequest(StrictBody):
    model: str | None = None
    messages: list[OpenAIMessage]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    adapter: str | list[str] | None = None  # nanochat's own field (openai client: extra_body={"adapter": ...})
    adapter_weights: list[float] | None = None


class CompletionRequest(StrictBody):
    """POST /v1/completions: plain text in, its continuation out (base models too)."""
    model: str | None = None
    prompt: str | list[str]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: int | None = None  # the legacy API: how many alternatives per token (0: only the chosen one)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    adapter: str | list[str] | None = None
    adapter_weights: list[float] | None = None


# The model's tool markers appear as such in OpenAI message content (see the module docstring).
_TOOL_SPLIT = re.compile("(" + "|".join(re.escape(a) + ".*?" + re.escape(b) for a, b in TOOL_MARKERS.values()) + ")",
                         re.DOTALL)


def part_as_openai_text(kind, text):
    if kind == "text":
        return text
    start, end = TOOL_MARKERS[kind]
    return start + text + end


def openai_text_as_parts(text):
    """An assistant's OpenAI content -> the str or list of parts render_conversation takes."""
    pieces = [p for p in _TOOL_SPLIT.split(text) if p]
    if not any(p.startswith(start) for p in pieces for start, _ in TOOL_MARKERS.values()):
        return text
    parts = []
    for p in pieces:
        for kind, (start, end) in TOOL_MARKERS.items():
            if p.startswith(start) and p.endswith(end):
                parts.append({"type": kind, "text": p[len(start):-len(end)]})
                break
        else:
            parts.append({"type": "text", "text": p})
    return parts


def content_chars(content):
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


def check_messages(messages, limits):
    """messages: [{"role", "content"}] with content a str or a list of part dicts. Raises RequestError."""
    if not messages:
        raise RequestError("messages is empty: send at least one user message", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages in one request; the limit is {limits.max_messages} "
                           "messages per request (--max-messages)", "messages")
    total = 0
    for i, msg in enumerate(messages):
        n = content_chars(msg["content"])
        if n > limits.max_message_chars:
            raise RequestError(f"message {i} is {n} characters long; the limit is {limits.max_message_chars} "
                               "characters per message (--max-message-chars)", f"messages[{i}].content")
        total += n
    if total > limits.max_total_chars:
        raise RequestError(f"the messages are {total} characters in total; the limit is {limits.max_total_chars} "
                           "characters per request (--max-total-chars)", "messages")
    try:
        validate_messages(messages)  # roles: optional system first, then user/assistant alternating
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's: the reply to it is what gets generated", "messages")


def check_sampling(temperature, top_k, max_tokens, seed, limits):
    # `not a <= x <= b` (rather than `x < a or x > b`) also refuses NaN
    if temperature is not None and not 0.0 <= temperature <= limits.max_temperature:
        raise RequestError(f"temperature must be between 0 and {limits.max_temperature} (--max-temperature); "
                           f"got {temperature}", "temperature")
    if top_k is not None and not 0 <= top_k <= limits.max_top_k:
        raise RequestError(f"top_k must be between 0 (no top-k) and {limits.max_top_k} (--max-top-k); got {top_k}",
                           "top_k")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_max_tokens:
        raise RequestError(f"max_tokens must be between 1 and {limits.max_max_tokens} (--max-max-tokens); "
                           f"got {max_tokens}", "max_tokens")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise RequestError(f"seed must be between 0 and 2**63 - 1; got {seed}", "seed")


def check_openai_options(body, limits):
    """The OpenAI-only fields of a chat or text completion request -> (n, stop strings). Raises RequestError."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= limits.max_n:
        raise RequestError(f"n must be between 1 and {limits.max_n} (--max-n); got {n}", "n")
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1]; got {body.top_p}", "top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise RequestError(f"{name} must be between -2 and 2; got {value}", name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > limits.max_stop:
        raise RequestError(f"stop has {len(stop)} strings; the limit is {limits.max_stop}", "stop")
    for s in stop:
        if not 1 <= len(s) <= limits.max_stop_chars:
            raise RequestError(f"each stop string must be 1 to {limits.max_stop_chars} characters; got {len(s)}", "stop")
    return n, stop


def check_chat_options(body):
    """The chat-only fields of an OpenAIRequest -> max_tokens (from max_tokens or max_completion_tokens)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise RequestError(f"top_logprobs must be between 0 and 20; got {body.top_logprobs}", "top_logprobs")
    return body.max_tokens if body.max_tokens is not None else body.max_completion_tokens


def chat_messages(body):
    """An OpenAIRequest's messages -> [{"role", "content"}] as render_conversation takes them (an assistant's
    tool calls split out of its text)."""
    messages = []
    for m in body.messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        messages.append({"role": m.role, "content": openai_text_as_parts(text) if m.role == "assistant" else text})
    return messages


def check_text_options(body, limits):
    """The legacy-only fields of a CompletionRequest -> its one prompt's text."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise RequestError(f"one prompt per request; got {len(prompts)}", "prompt")
    if len(prompts[0]) > limits.max_total_chars:
        raise RequestError(f"the prompt is {len(prompts[0])} characters; the limit is {limits.max_total_chars} "
                           "(--max-total-chars)", "prompt")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise RequestError(f"logprobs must be between 0 and 5; got {body.logprobs}", "logprobs")
    return prompts[0]


MAX_ADAPTER_WEIGHT = 10.0  # a stack weight beyond this is a typo, not a setting: each adapter was trained at 1


def check_adapter_stack(adapter, weights, limits):
    """A request's `adapter` (None, a name, or a list of names) and `adapter_weights` (one number per name)
    -> None, a name, or [(name, weight), ...] for a stack. Raises RequestError (400) for a bad combination;
    whether the adapters exist is the caller's question (404)."""
    if weights is not None and adapter is None:
        raise RequestError("adapter_weights needs adapter: the adapters' names, one weight each", "adapter_weights")
    if adapter is None or (isinstance(adapter, str) and weights is None):
        return adapter
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    if not names:
        raise RequestError("adapter is an empty list: name at least one adapter, or \"none\" for the base model",
                           "adapter")
    if len(names) > limits.max_stack:
        raise RequestError(f"a stack of {len(names)} adapters; the limit is {limits.max_stack} (--max-stack)",
                           "adapter")
    if "none" in names:
        raise RequestError("\"none\" (the base model) cannot be part of a stack: leave it out", "adapter")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RequestError(f"adapter {twice[0]!r} appears twice in the stack", "adapter")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise RequestError(f"{len(names)} adapters but {len(weights)} adapter_weights: give one weight per adapter",
                           "adapter_weights")
    for w in weights:
        if not -MAX_ADAPTER_WEIGHT <= w <= MAX_ADAPTER_WEIGHT:  # also refuses NaN
            raise RequestError(f"each adapter weight must be a number from {-MAX_ADAPTER_WEIGHT:g} to "
                               f"{MAX_ADAPTER_WEIGHT:g}; got {w}", "adapter_weights")
    return [(n, float(w)) for n, w in zip(names, weights)]


def sum_usage(usages):
    """Usage of n choices of one prompt: the prompt counted once, completions summed (as OpenAI)."""
    prompt = usages[0]["prompt_tokens"]
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def legacy_logprobs(entries, offset=0):
    """Chat-shaped logprob entries -> the legacy completions shape (tokens, token_logprobs, top_logprobs,
    text_offset)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out, offset


def describe_validation_errors(errors):
    """pydantic's errors for a request body -> one readable sentence per problem."""
    out = []
    for err in errors[:3]:
        where = ""
        for x in err.get("loc", ())[1:]:  # the first is "body"
            where += f"[{x}]" if isinstance(x, int) else (f".{x}" if where else str(x))
        kind = err.get("type")
        if kind == "json_invalid":
            out.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif kind == "extra_forbidden":
            out.append(f"unknown field {where!r}")
        elif kind == "missing":
            out.append(f"missing field {where!r}" if where else "missing JSON body")
        else:
            out.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 3:
        out.append(f"and {len(errors) - 3} more problems")
    return "; ".join(out)


def error_response(status, message, param=None, kind="invalid_request_error"):
    # OpenAI's error shape: the openai client raises with this message, and the page shows it
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class BodySizeLimit:
    """ASGI middleware: refuse a request body over max_bytes with 413 and a message naming the limit;
    by its Content-Length before reading anything, and while reading one sent without a length."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size):
        return f"request body is {size} bytes; the limit is {self.max_bytes} bytes (--max-body-bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self._too_large(declared))(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # handled by the app's HTTPException handler
                    raise StarletteHTTPException(413, self._too_large(f"over {self.max_bytes}"))
            return message

        await self.app(scope, counting_receive, send)


class EventStream(StreamingResponse):
    """A text/event-stream response that closes its event generator however the response ends. Starlette
    cancels it when the client disconnects, or (ASGI >= 2.4 servers) the next send fails; closing it
    is what stops the worker, so it must not wait for garbage collection."""
    media_type = "text/event-stream"

    def __init__(self, events):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(obj):
    # ASCII-only JSON: no client's line splitting can break an event (U+2028 and friends stay escaped)
    return format_sse_event(data_str=json.dumps(obj))

