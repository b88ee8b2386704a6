"""The HTTP surface's shared pieces: page request bodies, input limits and the checks of sampling fields common to
every generating route, the error shape (OpenAI's, with its codes), the body-size limit and SSE responses. It knows
nothing of models or scheduling; OpenAI's own bodies are openai_schema.py's, its messages openai_messages.py's.

usage.completion_tokens counts every token appended after the prompt: sampled, forced tool output, and the
closing <|assistant_end|>.
"""
import json
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    """A request we refuse; the message says what is wrong and, for a limit, which one. code: OpenAI's error
    code where one fits (model_not_found, context_length_exceeded, ...), else one from the status."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


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


def content_chars(content):
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


def check_messages(messages, limits, continues=False):
    """messages: [{"role", "content"}] with content a str or a list of part dicts; continues: the conversation
    ends inside the assistant's turn (after a tool's result) instead of with the user's message. Raises
    RequestError."""
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
    if messages[-1]["role"] != ("assistant" if continues else "user"):
        raise RequestError("the last message must be the user's (or a tool's result): the reply to it is what gets "
                           "generated", "messages")


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
            raise RequestError(f"each stop string must be 1 to {limits.max_stop_chars} characters; got {len(s)}",
                               "stop")
    return n, stop


def check_logit_bias(bias, vocab_size):
    """A request's logit_bias ({"token id": bias}) -> {int id: float bias} for the sampler, or None."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"logit_bias keys are token ids from 0 to {vocab_size - 1} (as strings); got {key!r}",
                               "logit_bias")
        if not -100.0 <= value <= 100.0:  # also refuses NaN
            raise RequestError(f"logit_bias values must be between -100 and 100; got {value} for token {key}",
                               "logit_bias")
        out[int(key)] = float(value)
    return out


def check_chat_options(body):
    """The chat-only fields of a ChatRequest -> max_tokens (from max_tokens or max_completion_tokens)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
    if body.response_format is not None and body.response_format.type != "text":
        raise RequestError(f"response_format {body.response_format.type!r} is not supported: this server cannot "
                           "constrain a reply to JSON; leave response_format out (or send {\"type\": \"text\"}) "
                           "and ask for JSON in the prompt", "response_format", code="unsupported_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise RequestError(f"top_logprobs must be between 0 and 20; got {body.top_logprobs}", "top_logprobs")
    return body.max_tokens if body.max_tokens is not None else body.max_completion_tokens


def check_text_options(body, limits, vocab_size):
    """The legacy-only fields of a CompletionRequest -> its prompts, each a str or a list of token ids."""
    prompt = body.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts:
        raise RequestError("prompt is an empty list: send a text, a list of texts or token ids", "prompt")
    n = 1 if body.n is None else body.n
    if len(prompts) * n > limits.max_n:
        raise RequestError(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; the limit is "
                           f"{limits.max_n} (--max-n)", "prompt")
    for p in prompts:
        if isinstance(p, str) and len(p) > limits.max_total_chars:
            raise RequestError(f"a prompt is {len(p)} characters; the limit is {limits.max_total_chars} "
                               "(--max-total-chars)", "prompt")
        if not isinstance(p, str) and (not p or not all(0 <= t < vocab_size for t in p)):
            raise RequestError(f"a token prompt must be a non-empty list of token ids from 0 to {vocab_size - 1}",
                               "prompt")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise RequestError(f"logprobs must be between 0 and 5; got {body.logprobs}", "logprobs")
    return prompts


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


def sum_usage(usages, per_prompt=None):
    """Usage of the choices of one request, per_prompt (default: all) choices per prompt: each prompt counted
    once, completions summed (as OpenAI)."""
    prompt = sum(u["prompt_tokens"] for u in usages[::per_prompt or len(usages)])
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


VALIDATION_CODES = {"json_invalid": "invalid_json", "missing": "missing_required_parameter",
                    "extra_forbidden": "unknown_parameter"}


def validation_error_code(errors):
    """OpenAI's code for pydantic's first error: a malformed body, a missing field, an unknown one, else a type."""
    return VALIDATION_CODES.get(errors[0].get("type") if errors else None, "invalid_type")


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


# OpenAI's error codes where one fits a status (a RequestError may name a more precise one)
STATUS_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "insufficient_permissions", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "request_too_large", 415: "unsupported_media_type",
                429: "rate_limit_exceeded", 500: "server_error", 503: "server_overloaded"}


def error_response(status, message, param=None, kind="invalid_request_error", code=None):
    # OpenAI's error shape: the openai client raises with this message, and the page shows it
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code or STATUS_CODES.get(status, "error")}}, status_code=status)


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

