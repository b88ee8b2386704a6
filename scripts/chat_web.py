"""Serve a chat model over HTTP: a chat page and an OpenAI-compatible API.

    python -m scripts.chat_web                          # the SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0 --port 8000

Endpoints
    GET  /                      the chat page (nanochat/ui.html, self-contained)
    POST /chat/completions      the page's own stream (SSE): one JSON event per `data:` line, each with a
                                "type": queued {position} | text {text} | python {text} | python_output {text}
                                | done {finish_reason, usage} | error {message}
    POST /v1/chat/completions   OpenAI-compatible, stream true (chat.completion.chunk events, then
                                `data: [DONE]`) or false (one chat.completion with usage)
    GET  /v1/models             the one model served
    GET  /health                liveness, workers, queue depth
    GET  /stats                 per-worker and total requests, tokens and tokens/s, queue depth

OpenAI compatibility notes
    Accepted fields: model (the reply names the served model whatever is asked), messages (roles system,
    user, assistant; content a string or a list of {"type": "text"} parts), temperature, top_k, top_p,
    max_tokens / max_completion_tokens, n (1 only), stream, stream_options.include_usage, seed. Any other
    field is refused with 400, so a client never silently loses a setting it relies on.
    top_p is accepted and ignored: the engine samples with temperature and top-k only (use top_k).
    Tool calls (calculator, python REPL, search; nanochat.tools) run on the server. In OpenAI content
    they are visible text with the model's own markers, the tool named inside the call:
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>"                   calculator
        "<|python_start|>python:\nx = 6\nx * 7<|python_end|><|output_start|>42<|output_end|>"   python
        "<|python_start|>search: capital of Velmora<|python_end|><|output_start|>[1] ...<|output_end|>"
    and assistant messages sent back are split on those markers again, so a conversation re-renders to
    exactly the tokens the model saw; the python REPL starts each reply from the python calls in the
    messages, so its variables last the conversation. The page's stream (/chat/completions) sends a call
    as a `python` event and its output as a `python_output` event. --index picks the search index
    (default <base>/search_index when built; without one, search is off and its calls get no output).
    usage.completion_tokens counts every token appended after the prompt: sampled, forced tool output,
    and the closing <|assistant_end|>.

Security
    --api-key KEY (or NANOCHAT_API_KEY): every endpoint but GET /health and the page itself (GET /) needs
    "Authorization: Bearer KEY" (what the OpenAI client sends); the page asks for the key in its settings
    when the server answers 401, and keeps it in the browser's localStorage. --admin-key KEY (or
    NANOCHAT_ADMIN_KEY) is then needed for /learn and for changing adapters (activate, delete); without
    one, the API key is enough. Without any key the server listens on loopback only; another --host then
    needs --insecure. A request (headers and body) must arrive within --request-timeout seconds of its
    first byte, or the connection is closed.

Workers: one model replica per GPU (or one on CPU), each with its own thread. A request waits in a FIFO
queue until a worker is free (never refused for being busy), then that worker generates for it alone.
Tokens cross from the worker's thread to the request's event loop through an asyncio queue; when the
client goes away the request's event generator is closed, which sets a flag the worker checks at every
token, so it stops and takes the next request.
"""
import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import re
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.common import autocast, resolve_dtype, script_argv
from nanochat.engine import Engine, StreamDecoder
from nanochat.tools import make_registry
from nanochat.tokenizer import validate_messages as _validate_messages  # public now; the alias keeps this file's uses

logger = logging.getLogger("nanochat.chat_web")

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "ui.html")
MIN_TEMPERATURE = 1e-6  # below this, logits / T overflows float32 (NaN probabilities): sample greedily instead
QUEUE_NOTICE_S = 1.0  # while a request waits for a worker, tell its client its place this often
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request checks whether its client is still there


# --------------------------------------------------------------------------------------------
# limits and request bodies

@dataclass
class Limits:
    """Per-request input limits; each has a command-line flag of the same name (--max-messages, ...)."""
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are refused, not silently ignored


class Part(_Body):
    """A piece of an assistant message as the page keeps it (the format render_conversation takes)."""
    type: Literal["text", "python", "python_output"]
    text: str


class PageMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class PageRequest(_Body):
    messages: list[PageMessage]
    adapter: str | None = None  # a learned adapter's name, "none" for the base model; default: the active one
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class OpenAIMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Body):
    include_usage: bool = False


class OpenAIRequest(_Body):
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
    adapter: str | None = None  # nanochat's own field (openai client: extra_body={"adapter": ...})


class Fact(_Body):
    question: str
    answer: str


class LearnRequest(_Body):
    adapter: str
    facts: list[Fact] = []
    conversations: list[list[PageMessage]] = []
    steps: int = 150
    replace: bool = False


# The model's tool markers, as they appear in OpenAI message content.
TOOL_MARKERS = {"python": ("<|python_start|>", "<|python_end|>"),
                "python_output": ("<|output_start|>", "<|output_end|>")}
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
        _validate_messages(messages)  # roles: optional system first, then user/assistant alternating
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


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: OpenAI's error shape."""
    error: _ErrorDetail


_STATUS_WHY = {400: "invalid request (what is wrong is in error.message)", 401: "missing or wrong API key",
               403: "the admin key is needed", 404: "no such adapter / job, or live learning is off",
               405: "method not allowed", 409: "conflicts with an adapter or job", 413: "request body too large",
               429: "too many learning jobs queued (see Retry-After)"}
SSE = {"text/event-stream": {"schema": {"description": "server-sent events: one JSON object per data line"}}}


def documented_errors(*codes):
    """OpenAPI `responses` for the error statuses an endpoint can answer (the document lists exactly
    what the server sends: 400 for bad input, never FastAPI's default 422)."""
    return {c: {"model": ErrorBody, "description": _STATUS_WHY[c]} for c in codes}


def without_422(app):
    """Replace app.openapi by one that drops FastAPI's automatic 422 responses: validation errors are
    answered with 400 (on_validation_error), which each route documents itself."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in doc["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    if op.pop("x-sse-only", False):  # FastAPI adds application/json to every 200
                        op["responses"]["200"]["content"].pop("application/json", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi


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


# --------------------------------------------------------------------------------------------
# generation

class ApiKeyAuth:
    """ASGI middleware: Bearer-key checks. With api_key set, every request but PUBLIC needs it (or the
    admin key); admin_key, when set, is the only key for ADMIN requests (training and changing adapters).
    401 when the key is missing or wrong, 403 when the API key is used where the admin key is needed."""
    PUBLIC = {("GET", "/"), ("GET", "/health"), ("HEAD", "/"), ("HEAD", "/health")}

    def __init__(self, app, api_key=None, admin_key=None):
        self.app, self.api_key, self.admin_key = app, api_key or None, admin_key or None

    @staticmethod
    def is_admin(method, path):
        return path == "/learn" or path.startswith("/learn/") or (
            path.startswith("/adapters/") and method in ("POST", "DELETE", "PUT", "PATCH"))

    @staticmethod
    def _matches(given, key):
        import hmac
        return key is not None and hmac.compare_digest(given.encode(), key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (self.api_key is None and self.admin_key is None):
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        auth = Headers(scope=scope).get("authorization", "")
        scheme, _, given = auth.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        admin = self.is_admin(method, path)
        if admin and self.admin_key is not None:
            if self._matches(given, self.admin_key):
                return await self.app(scope, receive, send)
            if self._matches(given, self.api_key):
                return await error_response(403, f"{method} {path} needs the admin key (--admin-key), not the API "
                                                 "key")(scope, receive, send)
        elif (method, path) in self.PUBLIC or self.api_key is None or \
                self._matches(given, self.api_key) or self._matches(given, self.admin_key):
            return await self.app(scope, receive, send)
        what = "the admin key" if admin and self.admin_key is not None else "the API key"
        message = (f"missing or wrong key: send \"Authorization: Bearer <key>\" with {what} "
                   "(the chat page: enter it under settings)")
        response = error_response(401, message, kind="authentication_error")
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)


def guarded_protocol(request_timeout):
    """uvicorn's h11 protocol, plus a deadline: a request's headers and body must all arrive within
    request_timeout seconds of the connection opening (or of the previous response ending), else the
    connection is closed. uvicorn alone keeps a connection that trickles a byte now and then open forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self):
            self._deadline = None
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                logger.info("closing a connection whose request did not arrive within %gs", request_timeout)
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is h11.DONE:  # the whole request is in
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def is_loopback(host):
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host, api_key, insecure):
    """Refuse to serve an unauthenticated API beyond this machine unless asked to: -> a line to print."""
    if api_key:
        return f"API key required (Bearer) on every endpoint but /health and the page"
    if is_loopback(host):
        return "no --api-key: listening on loopback only, so only this machine can reach the server"
    if not insecure:
        raise ValueError(f"--host {host} without --api-key would let anyone who can reach the port chat, train and "
                         "delete adapters: set --api-key (or NANOCHAT_API_KEY), or pass --insecure to do it anyway")
    return f"WARNING: --insecure: no API key, listening on {host}: anyone who can reach the port can use everything"


class ReplyParser:
    """The engine's tokens -> page events: text deltas (UTF-8 safe) and, for calculator use, the whole
    expression ("python") and its output ("python_output"). Reads the token stream as chat_cli does, except
    that a tool part left unfinished (cut off, or interrupted by a new call) is kept as text with its
    marker, so the events always add up to everything the model wrote."""

    def __init__(self, tokenizer):
        S = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = S("<|python_start|>"), S("<|python_end|>")
        self.output_start, self.output_end = S("<|output_start|>"), S("<|output_end|>")
        self.decoder = StreamDecoder(tokenizer)
        self.mode = "text"  # which part the next tokens belong to: text / python / python_output
        self.buf = []  # token ids of the current python or python_output part

    def _text(self, s):
        return [{"type": "text", "text": s}] if s else []

    def _flush(self):
        """Close the current part: held-back text bytes, or an unfinished tool part as text."""
        if self.mode == "text":
            return self._text(self.decoder.flush())
        return self._text(TOOL_MARKERS[self.mode][0] + self.tokenizer.decode(self.buf))

    def push(self, tok):
        if tok == self.python_start or (tok == self.output_start and self.mode == "text"):
            events = self._flush()
            self.mode, self.buf = ("python" if tok == self.python_start else "python_output"), []
            return events
        if (tok == self.python_end and self.mode == "python") or (tok == self.output_end and self.mode == "python_output"):
            event = {"type": self.mode, "text": self.tokenizer.decode(self.buf)}
            self.mode = "text"
            return [event]
        if self.mode == "text":
            return self._text(self.decoder.push(tok))
        self.buf.append(tok)
        return []

    def finish(self):
        events = self._flush()
        self.mode = "text"
        return events


@dataclass
class Job:
    """One reply to generate: the prompt's token ids and how to sample."""
    prompt: list
    max_tokens: int
    temperature: float
    top_k: int
    seed: int = field(default_factory=lambda: random.randrange(2 ** 31))
    adapter: str | None = None  # LoRA adapter to generate with (None: the base weights)


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Worker:
    """One model replica and the one thread that runs it. Jobs reach it only through WorkerPool, which
    lends a worker to one request at a time, so the model never runs two jobs at once and anything that
    changes its weights can run on the same thread between jobs (WorkerPool.on_each_worker)."""

    def __init__(self, index, model, tokenizer, tools=None):
        self.index = index
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, tools=tools)
        self.device = next(model.parameters()).device
        init = (lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"nanochat-worker{index}", initializer=init)
        self.lora = None  # a nanochat.lora.LoRA when live learning is on (set by LiveLearning)
        self.busy = False
        self.requests = 0
        self.tokens = 0
        self.busy_seconds = 0.0

    def autocast(self):
        return autocast(resolve_dtype("auto", self.device.type), self.device.type)

    def run(self, job, emit, cancelled):
        """Generate job's reply on this worker's thread, passing each event to emit(). Checks `cancelled`
        (a threading.Event) before every token. Returns the finish reason: stop, length, cancelled or error."""
        start = time.perf_counter()
        parser = ReplyParser(self.tokenizer)
        n, finish = 0, "length"  # length = max_tokens or the model's context ran out
        try:
            if self.lora is not None:
                try:
                    self.lora.activate(job.adapter)  # a pointer swap
                except KeyError:  # deleted meanwhile (the lease in WorkerPool.run should make this impossible)
                    finish = "error"
                    emit({"type": "error", "status": 404, "message": f"adapter {job.adapter!r} was deleted"})
                    return finish
            with self.autocast():
                steps = self.engine.generate(job.prompt, num_samples=1, max_tokens=job.max_tokens,
                                             temperature=job.temperature, top_k=job.top_k or None, seed=job.seed)
                try:
                    for column, _ in steps:
                        if cancelled.is_set():
                            finish = "cancelled"
                            break
                        n += 1
                        tok = column[0]
                        if tok in self.engine.stop_tokens:
                            finish = "stop"
                            break
                        for event in parser.push(tok):
                            emit(event)
                finally:
                    steps.close()  # a break leaves the engine suspended; closing it runs no further forward
            if finish != "cancelled":
                for event in parser.finish():
                    emit(event)
                emit({"type": "done", "finish_reason": finish, "usage": usage(len(job.prompt), n)})
        except Exception as e:
            logger.exception("generation failed on worker %d", self.index)
            finish = "error"
            emit({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            self.requests += 1
            self.tokens += n
            self.busy_seconds += time.perf_counter() - start
        return finish

    def warm_up(self):
        """One short generation, so the first real request doesn't pay for lazy initialisation."""
        prompt = self.tokenizer.render_for_completion([{"role": "user", "content": "Hello"}])
        with self.autocast():
            for _ in self.engine.generate(prompt, max_tokens=2, temperature=0.0):
                pass

    def stats(self):
        return {"id": self.index, "device": str(self.device), "busy": self.busy, "requests": self.requests,
                "tokens": self.tokens, "busy_seconds": round(self.busy_seconds, 3),
                "tokens_per_second": round(self.tokens / self.busy_seconds, 2) if self.busy_seconds else None}


class WorkerPool:
    """Lends workers to requests, first come first served. Lives on the server's event loop: every
    method is called from it (workers' threads reach it only through call_soon_threadsafe)."""

    def __init__(self, workers):
        self.workers = list(workers)
        self._idle = deque(self.workers)
        self._waiting = deque()  # futures of requests waiting for a worker, oldest first
        self.active = 0
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.started_at = time.time()
        self.leases = None  # nanochat.live.LiveLearning when adapters exist: held while a job uses one

    def _ask(self):
        """A future that resolves to a worker, at once if one is idle and nobody is waiting."""
        ticket = asyncio.get_running_loop().create_future()
        if self._idle and not self._waiting:
            ticket.set_result(self._take(self._idle.popleft()))
        else:
            self._waiting.append(ticket)
        return ticket

    def _take(self, worker):
        worker.busy = True
        return worker

    def _give(self, worker):
        """Hand a worker to the oldest request still waiting, or mark it idle."""
        worker.busy = False
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket.done():
                ticket.set_result(self._take(worker))
                return
        self._idle.append(worker)

    def _forget(self, ticket):
        """A request leaves: out of the queue if it was waiting, its worker back if it got one unused."""
        if ticket.done() and not ticket.cancelled():
            self._give(ticket.result())
        else:
            ticket.cancel()
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    def queue_depth(self):
        return sum(not t.done() for t in self._waiting)

    def _position(self, ticket):
        return sum(not t.done() for t in itertools.takewhile(lambda t: t is not ticket, self._waiting)) + 1

    async def run(self, job):
        """Async generator of a job's events: {"type": "queued", "position": n} while it waits for a
        worker (every QUEUE_NOTICE_S), then the worker's events, ending with "done" or "error".
        Closing it early (the client left) stops the generation and frees the worker."""
        loop = asyncio.get_running_loop()
        leased = job.adapter is not None and self.leases is not None
        if leased and not self.leases.acquire(job.adapter):  # deleted between admission and now
            yield {"type": "error", "status": 404, "message": f"adapter {job.adapter!r} was deleted; GET /adapters lists them"}
            return
        ticket = self._ask()
        cancelled = threading.Event()
        started = False
        try:
            while not ticket.done():
                yield {"type": "queued", "position": self._position(ticket)}
                await asyncio.wait([ticket], timeout=QUEUE_NOTICE_S)
            worker = ticket.result()
            events = asyncio.Queue()

            def emit(event):  # runs on the worker's thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                    cancelled.set()

            def finished(fut):  # runs on the loop once the worker's thread is done with the job
                self.active -= 1
                reason = fut.result() if not fut.cancelled() and fut.exception() is None else "error"
                self.finished[reason] += 1
                self._give(worker)

            self.active += 1
            started = True
            loop.run_in_executor(worker.executor, worker.run, job, emit, cancelled).add_done_callback(finished)
            while True:
                event = await events.get()
                yield event
                if event["type"] in ("done", "error"):
                    return
        finally:
            cancelled.set()
            if not started:
                self._forget(ticket)
            if leased:
                self.leases.release(job.adapter)

    async def on_each_worker(self, fn):
        """Run fn(worker) on every worker's own thread while no request is using it: takes every worker
        (after the requests they are serving finish), runs fn on all of them, then lends them out again.
        Used for the warm-up at start; also the way to change every replica's weights between requests."""
        loop = asyncio.get_running_loop()
        tickets = [self._ask() for _ in self.workers]
        try:
            workers = [await t for t in tickets]
            return await asyncio.gather(*(loop.run_in_executor(w.executor, fn, w) for w in workers))
        finally:
            for t in tickets:
                self._forget(t)

    def stats(self):
        tokens = sum(w.tokens for w in self.workers)
        busy = sum(w.busy_seconds for w in self.workers)
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "workers": [w.stats() for w in self.workers],
            "queue_depth": self.queue_depth(),
            "requests_active": self.active,
            "requests_served": self.finished["stop"] + self.finished["length"],
            "requests_cancelled": self.finished["cancelled"],
            "requests_failed": self.finished["error"],
            "tokens_generated": tokens,
            # tokens per second of generating, per request (prefill included); all workers busy, the
            # server's throughput is about this times the number of workers
            "tokens_per_second": round(tokens / busy, 2) if busy else None,
        }

    def shutdown(self):
        for w in self.workers:
            w.executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# the app

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


def create_app(workers, model_id="nanochat", limits=None, defaults=None, warm_up=True, learn=None,
               api_key=None, admin_key=None):
    """The FastAPI app serving `workers` (a list of Worker over replicas of one model and tokenizer).
    learn: None (no live learning) or a function pool -> nanochat.live.LiveLearning.
    api_key / admin_key: see ApiKeyAuth (None: open)."""
    limits = limits or Limits()
    defaults = defaults or Defaults()
    pool = WorkerPool(workers)
    live = learn(pool) if learn else None
    if live:
        live.max_jobs, live.job_ttl = limits.max_learn_jobs, limits.job_ttl
        live.max_adapters, live.max_adapter_bytes = limits.max_adapters, limits.max_adapter_bytes
    tokenizer = workers[0].tokenizer
    context = workers[0].model.config.sequence_len
    created = int(time.time())
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()

    @asynccontextmanager
    async def lifespan(app):
        if live:
            live.load_saved()  # before any request: the workers are idle
        if warm_up:
            await pool.on_each_worker(Worker.warm_up)
        yield
        if live:
            live.shutdown()
        pool.shutdown()

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=api_key, admin_key=admin_key)  # added last: runs first
    without_422(app)
    app.state.pool = pool
    app.state.live = live

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return error_response(400, describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. 405's Allow
        return response

    def adapter_for(name):
        if live is None:
            if name not in (None, "none"):
                raise RequestError("this server has no adapters (live learning is off)", "adapter")
            return None
        try:
            return live.resolve(name)
        except KeyError:
            raise RequestError(f"no adapter {name!r}; GET /adapters lists them", "adapter", status=404) from None

    def make_job(messages, temperature, top_k, max_tokens, seed, adapter=None):
        check_messages(messages, limits)
        check_sampling(temperature, top_k, max_tokens, seed, limits)
        prompt = tokenizer.render_for_completion(messages)
        if len(prompt) >= context:
            raise RequestError(f"the conversation is {len(prompt)} tokens but the model's context is {context} "
                               "tokens, with room needed for the reply: start a new conversation or shorten it",
                               "messages")
        temperature = defaults.temperature if temperature is None else temperature
        job = Job(prompt=prompt, max_tokens=max_tokens or defaults.max_tokens,
                  temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                  top_k=defaults.top_k if top_k is None else top_k, adapter=adapter_for(adapter))
        if seed is not None:
            job.seed = seed
        return job

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "workers": len(pool.workers),
                "idle_workers": sum(not w.busy for w in pool.workers), "queue_depth": pool.queue_depth()}

    @app.get("/stats", responses=documented_errors(401))
    async def stats():
        return {"model": model_id, **pool.stats()}

    @app.get("/v1/models", responses=documented_errors(401))
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                             "owned_by": "nanochat"}]}

    @app.post("/chat/completions", responses={200: {"content": SSE}} | documented_errors(400, 401, 404, 413),
              openapi_extra={"x-sse-only": True})
    async def page_completion(body: PageRequest):
        messages = [m.model_dump() for m in body.messages]
        job = make_job(messages, body.temperature, body.top_k, body.max_tokens, body.seed, body.adapter)

        async def events():
            async with aclosing(pool.run(job)) as stream:
                async for event in stream:
                    yield sse(event)

        return EventStream(events())

    @app.post("/v1/chat/completions", responses={200: {"content": SSE}} | documented_errors(400, 401, 404, 413))
    async def openai_completion(body: OpenAIRequest, request: Request):
        if body.n not in (None, 1):
            raise RequestError(f"n must be 1: one reply per request (got {body.n})", "n")
        if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1]; got {body.top_p}", "top_p")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": m.role, "content": openai_text_as_parts(text) if m.role == "assistant" else text})
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        job = make_job(messages, body.temperature, body.top_k, max_tokens, body.seed, body.adapter)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta, finish_reason=None):
            out = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                out["usage"] = None  # as OpenAI: null on every chunk but the last
            return out

        if body.stream:
            async def events():
                yield sse(chunk({"role": "assistant", "content": ""}))
                async with aclosing(pool.run(job)) as stream:
                    async for event in stream:
                        kind = event["type"]
                        if kind == "queued":  # a comment: keeps the connection alive, clients ignore it
                            yield format_sse_event(comment=f"queued at position {event['position']}")
                        elif kind == "done":
                            yield sse(chunk({}, event["finish_reason"]))
                            if include_usage:
                                yield sse({**chunk({}), "choices": [], "usage": event["usage"]})
                        elif kind == "error":
                            yield sse({"error": {"message": event["message"], "type": "server_error"}})
                        else:
                            yield sse(chunk({"content": part_as_openai_text(kind, event["text"])}))
                yield format_sse_event(data_str="[DONE]")

            return EventStream(events())

        pieces, last_check = [], time.monotonic()
        async with aclosing(pool.run(job)) as stream:
            async for event in stream:
                kind = event["type"]
                if kind in ("text", "python", "python_output"):
                    pieces.append(part_as_openai_text(kind, event["text"]))
                elif kind == "done":
                    return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                         "logprobs": None, "finish_reason": event["finish_reason"]}],
                            "usage": event["usage"]}
                elif kind == "error":
                    status = event.get("status", 500)
                    return error_response(status, event["message"], kind="server_error" if status >= 500 else
                                          "invalid_request_error")
                if time.monotonic() - last_check > DISCONNECT_CHECK_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():  # nobody to answer: free the worker
                        return Response(status_code=499)
        return error_response(500, "generation ended without a result", kind="server_error")

    # --- live learning: adapters trained in the background, chosen per request ------------
    def need_live():
        if live is None:
            raise RequestError("live learning is off on this server (started with --no-learn)", status=404)
        return live

    def learn_examples(body):
        """The request's facts and conversations -> conversations to train on, or RequestError."""
        from nanochat.live import facts_to_conversations
        n = len(body.facts) + len(body.conversations)
        if n == 0:
            raise RequestError("nothing to learn: send \"facts\": [{\"question\", \"answer\"}, ...] and/or "
                               "\"conversations\": [[messages], ...]", "facts")
        if n > limits.max_learn_items:
            raise RequestError(f"{n} facts and conversations; the limit is {limits.max_learn_items} per request "
                               "(--max-learn-items)", "facts")
        for i, f in enumerate(body.facts):
            for key in ("question", "answer"):
                text = getattr(f, key)
                if not text.strip():
                    raise RequestError(f"facts[{i}].{key} is empty", f"facts[{i}].{key}")
                if len(text) > limits.max_message_chars:
                    raise RequestError(f"facts[{i}].{key} is {len(text)} characters; the limit is "
                                       f"{limits.max_message_chars} (--max-message-chars)", f"facts[{i}].{key}")
        convs = facts_to_conversations([f.model_dump() for f in body.facts])
        for i, c in enumerate(body.conversations):
            messages = [m.model_dump() for m in c]
            if not messages or messages[-1]["role"] != "assistant":
                raise RequestError(f"conversations[{i}] must end with the assistant's message: that is what is "
                                   "learned", f"conversations[{i}]")
            try:
                check_messages(messages[:-1], limits)  # the prompt: roles, sizes, ends with the user
            except RequestError as e:
                raise RequestError(f"conversations[{i}]: {e.message}", f"conversations[{i}]") from None
            if content_chars(messages[-1]["content"]) > limits.max_message_chars:
                raise RequestError(f"conversations[{i}]: the reply is longer than {limits.max_message_chars} "
                                   "characters (--max-message-chars)", f"conversations[{i}]")
            convs.append(messages)
        for i, c in enumerate(convs):
            n_tokens = len(tokenizer.render_conversation(c, max_tokens=10 ** 9)[0])
            if n_tokens > context:
                raise RequestError(f"example {i} is {n_tokens} tokens; the model's context is {context}",
                                   "conversations")
        return convs

    @app.post("/learn", status_code=202, responses=documented_errors(400, 401, 403, 404, 409, 413, 429))
    async def learn(body: LearnRequest):
        lv = need_live()
        if not 1 <= body.steps <= limits.max_learn_steps:
            raise RequestError(f"steps must be between 1 and {limits.max_learn_steps} (--max-learn-steps); "
                               f"got {body.steps}", "steps")
        convs = learn_examples(body)
        from nanochat.live import AdapterLimit, JobQueueFull
        try:
            job = lv.submit(body.adapter, convs, body.steps, replace=body.replace)
        except ValueError as e:
            raise RequestError(str(e), "adapter") from None
        except (FileExistsError, AdapterLimit) as e:
            raise RequestError(str(e), "adapter", status=409) from None
        except JobQueueFull as e:
            response = error_response(429, str(e))
            response.headers["Retry-After"] = str(e.retry_after)
            return response
        return {"job": job.id, "adapter": job.adapter, "status": job.status, "steps": job.steps,
                "examples": job.examples, "url": f"/learn/{job.id}"}

    @app.get("/learn/{job_id}", responses=documented_errors(401, 403, 404))
    async def learn_status(job_id: str):
        job = need_live().job(job_id)
        if job is None:
            raise RequestError(f"no learning job {job_id!r}", status=404)
        return job.view()

    @app.get("/adapters", responses=documented_errors(401, 404))
    async def adapters():
        return need_live().describe()

    @app.post("/adapters/{name}/activate", responses=documented_errors(401, 403, 404))
    async def activate(name: str):
        lv = need_live()
        t0 = time.perf_counter()
        try:
            lv.set_default(None if name == "none" else name)
        except KeyError:
            raise RequestError(f"no adapter {name!r}; GET /adapters lists them", status=404) from None
        return {"active": lv.default, "switch_ms": round((time.perf_counter() - t0) * 1000, 3)}

    @app.delete("/adapters/{name}", responses=documented_errors(401, 403, 404, 409))
    async def delete(name: str):
        lv = need_live()
        if lv.busy_with(name):
            raise RequestError(f"a job is training adapter {name!r}; delete it after the job ends", status=409)
        try:
            await lv.delete(name)
        except KeyError:
            raise RequestError(f"no adapter {name!r}; GET /adapters lists them", status=404) from None
        return {"deleted": name, "active": lv.default}

    return app


# --------------------------------------------------------------------------------------------
# command line

def load_workers(source, device_type, num_gpus=1, model_tag=None, step=None, tools=None):
    """One Worker per device: cuda:0..num_gpus-1, or a single one on cpu/mps. -> (workers, meta)."""
    from nanochat.checkpoint_manager import load_model
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if not 1 <= num_gpus <= available:
            raise ValueError(f"--num-gpus {num_gpus}: this machine has {available} GPU(s)")
        devices = [torch.device("cuda", i) for i in range(num_gpus)]
    else:
        devices = [torch.device(device_type)]
    workers, meta = [], None
    for i, device in enumerate(devices):
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
        workers.append(Worker(i, model, tokenizer, tools=tools))
    return workers, meta


@contextmanager
def serve_in_thread(app, startup_timeout=60, request_timeout=Limits.request_timeout):
    """Serve `app` with uvicorn on a free loopback port in a background thread and yield its URL; the
    server stops on exit. For tests and benchmarks that talk HTTP to a server in their own process."""
    import socket
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                                           http=guarded_protocol(request_timeout)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:  # set once the app's startup (warm-up, adapters) is done
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def general_chats(n_replay=512, n_eval=32):
    """Offline human chats (tasks/conversations.py): train-split ones to replay while an adapter learns,
    test-split ones to measure what it costs. ([], []) with a warning when they can't be read."""
    try:
        from tasks.conversations import ChatterBot, ChitChat
        replay = [ex["messages"] for task in (ChitChat("train"), ChatterBot("train"))
                  for ex in (task[i] for i in range(min(len(task), n_replay // 2)))]
        held = ChitChat("test")
        return replay, [held[i]["messages"] for i in range(min(len(held), n_eval))]
    except (OSError, ValueError, ImportError) as e:
        logger.warning("no general chat data for replay (%s): adapters will learn without it", e)
        return [], []


def make_live_learning(workers, root):
    """pool -> LiveLearning: adapters under root, trained on a private copy of the served weights."""
    import copy
    from nanochat.live import LiveLearning
    trainer = copy.deepcopy(workers[0].model)  # taken before the workers get their LoRA hooks
    replay, general = general_chats()
    return lambda pool: LiveLearning(pool, trainer, workers[0].tokenizer, root, replay, general)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl", "dpo"], help="which stage's model")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (ignored without CUDA)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index", default="", help="search index for the search tool (default <base>/search_index if built)")
    p.add_argument("--adapters-dir", default="", help="where learned adapters live (default: $NANOCHAT_BASE_DIR/adapters)")
    p.add_argument("--no-learn", action="store_true", help="serve without live learning (no /learn, no adapters)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY", ""),
                   help="require 'Authorization: Bearer KEY' (default $NANOCHAT_API_KEY; none: loopback only)")
    p.add_argument("--admin-key", default=os.environ.get("NANOCHAT_ADMIN_KEY", ""),
                   help="key for /learn and adapter changes (default $NANOCHAT_ADMIN_KEY; none: the API key)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    d, lim = Defaults(), Limits()
    p.add_argument("-t", "--temperature", type=float, default=d.temperature, help="default temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=d.top_k, help="default top-k (0 = none)")
    p.add_argument("-m", "--max-tokens", type=int, default=d.max_tokens, help="default reply length limit")
    for name, value in vars(lim).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help="request limit")
    args = p.parse_args(script_argv(argv))
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error("need --temperature >= 0, --top-k >= 0, --max-tokens >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    import uvicorn
    from nanochat.common import autodetect_device_type, setup_logging
    setup_logging()
    try:
        exposure = check_exposure(args.host, args.api_key, args.insecure)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    device_type = args.device_type or autodetect_device_type()
    try:
        tools, tools_line = make_registry(args.index)
        workers, meta = load_workers(args.source, device_type, args.num_gpus, args.model_tag, args.step, tools=tools)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd%d' % workers[0].model.config.n_layer}"
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    defaults = Defaults(args.temperature, args.top_k, args.max_tokens)
    learn = None
    if not args.no_learn:
        from nanochat.lora import adapters_dir
        learn = make_live_learning(workers, args.adapters_dir or adapters_dir())
    app = create_app(workers, model_id, limits, defaults, learn=learn, api_key=args.api_key or None,
                     admin_key=args.admin_key or None)
    devices = ", ".join(str(w.device) for w in workers)
    print(f"serving {model_id} (step {meta.get('step', '?')}) on {devices}: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    print(exposure, file=sys.stderr, flush=True)
    print(tools_line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=guarded_protocol(args.request_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
