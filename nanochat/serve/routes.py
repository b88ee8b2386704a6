"""The chat routes of the server: the page, its SSE stream, the OpenAI-compatible completions, models, health,
stats and metrics, each turning a request body into jobs for the replicas and their events into a reply. The
app around them (middleware, error handlers, startup) is app.py's; the live-learning routes are live_routes.py's."""
import os
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.sse import format_sse_event

from nanochat.engine import MIN_TEMPERATURE
from nanochat.serve.openai_api import (CompletionRequest, Defaults, EventStream, Limits, OpenAIRequest, PageRequest,
                                       RequestError, chat_messages, check_adapter_stack, check_chat_options,
                                       check_messages, check_openai_options, check_sampling, check_text_options,
                                       error_response, legacy_logprobs, part_as_openai_text, sse, sum_usage)
from nanochat.serve.replicas import Job, PoolMetrics, WorkerPool
from nanochat.serve.security import SSE, documented_errors

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request checks whether its client is still there
GENERATES = {200: {"content": SSE}} | documented_errors(400, 401, 404, 413, 415)


@dataclass
class Served:
    """What the chat routes answer from: the replicas, live learning (None: off) and the server's settings."""
    pool: WorkerPool
    metrics: PoolMetrics
    live: object  # nanochat.serve.live.LiveLearning or None
    model_id: str
    limits: Limits
    defaults: Defaults
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.pool.workers[0].tokenizer

    @property
    def context(self):
        return self.pool.workers[0].model.config.sequence_len

    def adapter_names(self):
        return self.live.names() if self.live is not None else []

    def adapter_for(self, name, model=None, weights=None):
        """The adapter a request runs with: `model` naming a loaded adapter selects it (vLLM's way), as
        does the `adapter` field (a name, or a list of names with adapter_weights: a stack); any other model
        name means the served model."""
        name = check_adapter_stack(name, weights, self.limits)
        if model is not None and model in self.adapter_names():
            if name not in (None, model):
                raise RequestError(f"model {model!r} is an adapter but adapter is {name!r}: give one", "adapter")
            name = model
        if self.live is None:
            if name not in (None, "none"):
                raise RequestError("this server has no adapters (live learning is off)", "adapter")
            return None
        try:
            return self.live.resolve(name)
        except KeyError as e:
            raise RequestError(f"no adapter {e.args[0]!r}; GET /adapters lists them", "adapter", status=404) from None

    def make_jobs(self, prompt, temperature, top_k, max_tokens, seed, adapter=None, model=None, n=1,
                  adapter_weights=None, **extra):
        """One Job per choice (n), checked against the limits, the server's defaults filled in."""
        check_sampling(temperature, top_k, max_tokens, seed, self.limits)
        if len(prompt) >= self.context:
            raise RequestError(f"the prompt is {len(prompt)} tokens but the model's context is {self.context} "
                               "tokens, with room needed for the reply: start a new conversation or shorten it",
                               "messages")
        d = self.defaults
        temperature = d.temperature if temperature is None else temperature
        job = Job(prompt=prompt, max_tokens=max_tokens or d.max_tokens,
                  temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                  top_k=d.top_k if top_k is None else top_k, adapter=self.adapter_for(adapter, model, adapter_weights),
                  **{k: v for k, v in extra.items() if v is not None})
        if seed is not None:
            job.seed = seed
        # n choices: rows of one batch, each with its own seed (seed, seed + 1, ...) so they differ
        return [Job(**{**vars(job), "seed": job.seed + i}) for i in range(n)]

    def chat_prompt(self, messages):
        check_messages(messages, self.limits)
        return self.tokenizer.render_for_completion(messages)


def info_router(served):
    """GET /, /health, /stats, /metrics and /v1/models."""
    router = APIRouter()
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()

    @router.get("/", response_class=HTMLResponse, responses=documented_errors(400))
    async def index():
        return page

    @router.get("/health", responses=documented_errors(400))
    async def health():
        pool = served.pool
        return {"status": "ok", "model": served.model_id, "workers": len(pool.workers),
                "idle_workers": sum(not w.busy for w in pool.workers), "queue_depth": pool.queue_depth()}

    @router.get("/stats", responses=documented_errors(400, 401))
    async def stats():
        return {"model": served.model_id, **served.pool.stats()}

    @router.get("/metrics", response_class=PlainTextResponse, responses=documented_errors(400, 401))  # Prometheus
    async def prometheus_metrics():
        body, content_type = served.metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/v1/models", responses=documented_errors(400, 401))
    async def models():
        live, created = served.live, served.created
        data = [{"id": served.model_id, "object": "model", "created": created, "owned_by": "nanochat"}]
        provenance = {a["name"]: a["provenance"] for a in live.describe()["adapters"]} if live else {}
        for name in served.adapter_names():
            # beside vLLM's fields: how a merged or nested adapter came about (GET /adapters has the rest)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "nanochat",
                         "parent": served.model_id, "root": served.model_id, "provenance": provenance.get(name)})
        return {"object": "list", "data": data}

    return router


def completion_router(served):
    """POST /chat/completions (the page's stream), /v1/chat/completions and /v1/completions."""
    router = APIRouter()

    @router.post("/chat/completions", responses=GENERATES, openapi_extra={"x-sse-only": True})
    async def page_completion(body: PageRequest):
        messages = [m.model_dump() for m in body.messages]
        (job,) = served.make_jobs(served.chat_prompt(messages), body.temperature, body.top_k, body.max_tokens,
                                  body.seed, body.adapter, adapter_weights=body.adapter_weights)

        async def events():
            async with aclosing(served.pool.run(job)) as stream:
                async for event in stream:
                    event.pop("logprobs", None)
                    yield sse(event)

        return EventStream(events())

    @router.post("/v1/chat/completions", responses=GENERATES)
    async def openai_chat(body: OpenAIRequest, request: Request):
        n, stop = check_openai_options(body, served.limits)
        max_tokens = check_chat_options(body)
        jobs = served.make_jobs(served.chat_prompt(chat_messages(body)), body.temperature, body.top_k, max_tokens,
                                body.seed, body.adapter, body.model, n, body.adapter_weights, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                stop=stop, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        return await respond(served, jobs, body, request, "chat")

    @router.post("/v1/completions", responses=GENERATES)
    async def openai_text(body: CompletionRequest, request: Request):
        n, stop = check_openai_options(body, served.limits)
        text = check_text_options(body, served.limits)
        prompt = [served.tokenizer.get_bos_token_id()] + served.tokenizer.encode(text)
        jobs = served.make_jobs(prompt, body.temperature, body.top_k, body.max_tokens, body.seed, body.adapter,
                                body.model, n, body.adapter_weights, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                stop=stop, logprobs=body.logprobs)
        return await respond(served, jobs, body, request, "text")

    return router


async def respond(served, jobs, body, request, kind):
    """Run the n jobs of an OpenAI request; kind "chat" (chat.completion) or "text" (text_completion)."""
    # replies name the served model, or the adapter that `model` selected
    reply_model = body.model if body.model in served.adapter_names() else served.model_id
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    reply = OpenAIReply(kind, len(jobs), reply_model, jobs[0].logprobs is not None, include_usage)
    if body.stream:
        return EventStream(reply.stream(served.pool, jobs))
    return await reply.collect(served.pool, jobs, request)


class OpenAIReply:
    """The reply to an OpenAI request's n jobs, streamed as chunks or collected into one body: chat.completion
    (kind "chat") or the legacy text_completion (kind "text"), with logprobs in the matching shape."""

    def __init__(self, kind, n, model, want_logprobs, include_usage):
        self.kind, self.n, self.model = kind, n, model
        self.want_logprobs, self.include_usage = want_logprobs, include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.created = int(time.time())
        self.offsets = [0] * n  # legacy logprobs: text offset of each choice's next token

    def choice(self, i, text=None, finish=None, entries=None, delta=None):
        chat = self.kind == "chat"
        c = {"index": i, "finish_reason": finish, "logprobs": None}
        if self.want_logprobs and entries is not None:
            if chat:
                c["logprobs"] = {"content": entries}
            else:
                c["logprobs"], self.offsets[i] = legacy_logprobs(entries, self.offsets[i])
        if chat and delta is not None:  # a stream chunk
            c["delta"] = delta
        elif chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text or ""
        return c

    def chunk(self, choices, usage=None):
        out = {"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = usage  # as OpenAI: null on every chunk but the last
        return out

    async def stream(self, pool, jobs):
        """SSE events: one chunk per piece of text and per finished choice, then [DONE]."""
        chat = self.kind == "chat"
        if chat:
            yield sse(self.chunk([self.choice(i, delta={"role": "assistant", "content": ""}) for i in range(self.n)]))
        usages = [None] * self.n
        async with aclosing(pool.run_many(jobs)) as stream:
            async for i, event in stream:
                t = event["type"]
                if t == "queued":  # a comment: keeps the connection alive, clients ignore it
                    yield format_sse_event(comment=f"queued at position {event['position']}")
                elif t == "error":
                    yield sse({"error": {"message": event["message"], "type": "server_error"}})
                    break
                elif t == "done":
                    usages[i] = event["usage"]
                    yield sse(self.chunk([self.choice(i, finish=event["finish_reason"], entries=event.get("logprobs"),
                                                      delta={} if chat else None)]))
                else:
                    text = part_as_openai_text(t, event["text"])
                    yield sse(self.chunk([self.choice(i, text=text, entries=event.get("logprobs"),
                                                      delta={"content": text} if chat else None)]))
        if self.include_usage and all(usages):
            yield sse(self.chunk([], sum_usage(usages)))
        yield format_sse_event(data_str="[DONE]")

    async def collect(self, pool, jobs, request):
        """The whole reply as one body, or an error response; 499 when the client left meanwhile."""
        n = self.n
        pieces, entries, finishes, usages = [[] for _ in jobs], [[] for _ in jobs], [None] * n, [None] * n
        last_check = time.monotonic()
        async with aclosing(pool.run_many(jobs)) as stream:
            async for i, event in stream:
                t = event["type"]
                entries[i].extend(event.get("logprobs") or [])
                if t in ("text", "python", "python_output"):
                    pieces[i].append(part_as_openai_text(t, event["text"]))
                elif t == "done":
                    finishes[i], usages[i] = event["finish_reason"], event["usage"]
                elif t == "error":
                    status = event.get("status", 500)
                    return error_response(status, event["message"],
                                          kind="server_error" if status >= 500 else "invalid_request_error")
                if time.monotonic() - last_check > DISCONNECT_CHECK_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():  # nobody to answer: free the rows
                        return Response(status_code=499)
        if not all(usages):
            return error_response(500, "generation ended without a result", kind="server_error")
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i, "".join(pieces[i]), finishes[i], entries[i]) for i in range(n)],
                "usage": sum_usage(usages)}
