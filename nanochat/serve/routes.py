"""The chat routes of the server: the page, its SSE stream, the OpenAI-compatible completions and models, health,
stats and metrics, each turning a request body into jobs for the replicas and their events into a reply (OpenAI's
bodies: openai_schema.py, its messages: openai_messages.py, its replies: openai_reply.py). The app around them
(middleware, error handlers, startup) is app.py's; the live-learning routes are live_routes.py's."""
import logging
import os
import re
import time
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from nanochat.engine import MIN_TEMPERATURE
from nanochat.serve.live import AUTO
from nanochat.serve.openai_api import (
    Defaults,
    EventStream,
    Limits,
    PageRequest,
    RequestError,
    check_adapter_stack,
    check_chat_options,
    check_logit_bias,
    check_messages,
    check_openai_options,
    check_sampling,
    check_text_options,
    sse,
)
from nanochat.serve.openai_messages import conversation
from nanochat.serve.openai_reply import OpenAIReply
from nanochat.serve.openai_schema import ChatRequest, CompletionRequest, ignored_fields
from nanochat.serve.replicas import Job, PoolMetrics, WorkerPool
from nanochat.serve.security import SSE, documented_errors

logger = logging.getLogger("nanochat.serve.routes")
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
GENERATES = {200: {"content": SSE}} | documented_errors(400, 401, 404, 413, 415)
IGNORED_HEADER = "x-nanochat-ignored-fields"
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.\[\]-]{1,64}")  # what a header may repeat of a client's field names
MAX_LOGGED_NAMES = 1000  # ignored field names logged once each; a client inventing names can't grow this further


@dataclass
class Served:
    """What the chat routes answer from: the replicas, live learning (None: off) and the server's settings.
    aliases: more names the served model answers to ("*": any name); fingerprint: system_fingerprint."""
    pool: WorkerPool
    metrics: PoolMetrics
    live: object  # nanochat.serve.live.LiveLearning or None
    model_id: str
    limits: Limits
    defaults: Defaults
    aliases: tuple = ()
    fingerprint: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    logged: set = field(default_factory=set)  # ignored field names already logged

    @property
    def tokenizer(self):
        return self.pool.workers[0].tokenizer

    @property
    def context(self):
        return self.pool.workers[0].model.config.sequence_len

    def adapter_names(self):
        return self.live.names() if self.live is not None else []

    def answers_to(self, model):
        """Whether `model` names the served model (its id, an alias, or any name with the alias "*")."""
        return model == self.model_id or model in self.aliases or "*" in self.aliases

    def resolve(self, model=None, adapter=None, weights=None):
        """A request's `model`, `adapter` and `adapter_weights` -> (what its Job runs with: None for the base, an
        adapter's name, or ((name, weight), ...) for a stack; the name its reply's `model` carries). The one place
        these fields are read. `model` naming a loaded adapter selects it (vLLM's way), as does `adapter` (a name,
        "none" for the base model, or a list of names: a stack); the served model's names mean the server's
        default (the active adapter, if any). Any other model name is a 404 model_not_found."""
        stack = check_adapter_stack(adapter, weights, self.limits)
        if model is not None and model in self.adapter_names():
            if stack not in (None, model):
                raise RequestError(f"model {model!r} is an adapter but adapter is {stack!r}: give one", "adapter")
            stack = model
        elif model is not None and not self.answers_to(model):
            known = [self.model_id, *(a for a in self.aliases if a != "*"), *self.adapter_names()]
            raise RequestError(f"the model {model[:200]!r} does not exist on this server; it serves "
                               f"{', '.join(map(repr, known))} (GET /v1/models lists them; chat_web "
                               "--served-model-name NAME adds a name it answers to)", "model", status=404,
                               code="model_not_found")
        if self.live is None:
            if stack not in (None, "none"):
                raise RequestError("this server has no adapters (live learning is off)", "adapter")
            return None, self.model_id
        try:
            spec = self.live.resolve(stack)
        except KeyError as e:
            raise RequestError(f"no adapter {e.args[0]!r}; GET /adapters lists them", "adapter", status=404) from None
        except ValueError as e:
            raise RequestError(str(e), "adapter") from None
        return spec, served_name(spec, self.model_id)

    async def route(self, prompt, spec, model=None, adapter=None):
        """Where a request runs, given resolve()'s spec and the request's own `model` and `adapter` fields: "auto"
        (asked for, or the server's default) becomes the adapter whose training prompts the prompt resembles, or None
        for the base model (LiveLearning.auto_adapter). Counted in /metrics by adapter and by how it was chosen
        (request, default, auto). -> (spec, the name the reply's `model` carries)."""
        chosen = "request" if adapter is not None or model in self.adapter_names() else "default"
        if spec == AUTO:
            spec, chosen = await self.live.auto_adapter(prompt), "auto"
        if self.live is not None:
            self.live.count(spec, chosen)
        return spec, served_name(spec, self.model_id)

    def model_entry(self, name):
        """GET /v1/models' entry for `name` (the served model, an alias, or an adapter), or None."""
        entry = {"id": name, "object": "model", "created": self.created, "owned_by": "nanochat"}
        if name == self.model_id or (name in self.aliases and name != "*"):
            return entry if name == self.model_id else entry | {"root": self.model_id}
        if name in self.adapter_names():
            provenance = next((a["provenance"] for a in self.live.describe()["adapters"] if a["name"] == name), None)
            # beside vLLM's fields: how a merged or nested adapter came about (GET /adapters has the rest)
            return entry | {"parent": self.model_id, "root": self.model_id, "provenance": provenance}
        return None

    def make_jobs(self, prompt, temperature, top_k, max_tokens, seed, adapter=None, n=1, **extra):
        """One Job per choice (n), checked against the limits, the server's defaults filled in. adapter: as
        resolve() gives it."""
        check_sampling(temperature, top_k, max_tokens, seed, self.limits)
        if len(prompt) >= self.context:
            raise RequestError(f"the prompt is {len(prompt)} tokens but the model's context is {self.context} "
                               "tokens, with room needed for the reply: start a new conversation or shorten it",
                               "messages", code="context_length_exceeded")
        d = self.defaults
        temperature = d.temperature if temperature is None else temperature
        job = Job(prompt=prompt, max_tokens=max_tokens or d.max_tokens,
                  temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                  top_k=d.top_k if top_k is None else top_k, adapter=adapter,
                  **{k: v for k, v in extra.items() if v is not None})
        if seed is not None:
            job.seed = seed
        # n choices: rows of one batch, each with its own seed (seed, seed + 1, ...) so they differ
        return [Job(**{**vars(job), "seed": job.seed + i}) for i in range(n)]

    def chat_prompt(self, messages, continues=False):
        """The prompt ids of a conversation: for the next assistant turn, or (continues) going on with the
        assistant's last turn, after a tool's result."""
        check_messages(messages, self.limits, continues)
        if continues:
            return self.tokenizer.render_conversation(messages, max_tokens=10 ** 9)[0][:-1]  # open: no assistant_end
        return self.tokenizer.render_for_completion(messages)

    def note_ignored(self, body, response):
        """Name what `body` sent but nothing here acts on in the reply's header, and in the log once per name."""
        names = ignored_fields(body)
        if not names:
            return
        shown = [n for n in names if _FIELD_NAME.fullmatch(n)][:32]
        response.headers[IGNORED_HEADER] = ", ".join(shown + ([f"(+{len(names) - len(shown)} more)"]
                                                              if len(names) > len(shown) else []))
        for name in names:
            if name not in self.logged and len(self.logged) < MAX_LOGGED_NAMES:
                self.logged.add(name)
                logger.info("ignoring the request field %r: nothing on this server acts on it (each name is logged "
                            "once; replies name them in %s)", name[:100], IGNORED_HEADER)


def served_name(spec, model_id):
    """The name a reply's `model` carries: the served model's, the adapter's, or a stack's names joined by '+'."""
    if spec is None:
        return model_id
    return spec if isinstance(spec, str) else "+".join(name for name, _ in spec)


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
        names = [served.model_id, *(a for a in served.aliases if a != "*"), *served.adapter_names()]
        return {"object": "list", "data": [e for e in map(served.model_entry, names) if e is not None]}

    @router.get("/v1/models/{model:path}", responses=documented_errors(400, 401, 404))
    async def model(model: str):
        entry = served.model_entry(model)
        if entry is None:
            raise RequestError(f"the model {model[:200]!r} does not exist on this server; GET /v1/models lists "
                               "them", "model", status=404, code="model_not_found")
        return entry

    return router


def completion_router(served):
    """POST /chat/completions (the page's stream), /v1/chat/completions and /v1/completions."""
    router = APIRouter()

    @router.post("/chat/completions", responses=GENERATES, openapi_extra={"x-sse-only": True})
    async def page_completion(body: PageRequest):
        messages = [m.model_dump() for m in body.messages]
        adapter, _ = served.resolve(None, body.adapter, body.adapter_weights)
        prompt = served.chat_prompt(messages)
        adapter, _ = await served.route(prompt, adapter, adapter=body.adapter)
        (job,) = served.make_jobs(prompt, body.temperature, body.top_k, body.max_tokens, body.seed, adapter)

        async def events():
            async with aclosing(served.pool.run(job)) as stream:
                async for event in stream:
                    if event["type"] != "special":  # a special token out of place is never shown
                        event.pop("logprobs", None)
                        yield sse(event)

        return EventStream(events())

    @router.post("/v1/chat/completions", responses=GENERATES)
    async def openai_chat(body: ChatRequest, request: Request, response: Response):
        adapter, name = served.resolve(body.model, body.adapter, body.adapter_weights)
        n, stop = check_openai_options(body, served.limits)
        max_tokens = check_chat_options(body)
        messages, continues = conversation(body.messages)
        prompt = served.chat_prompt(messages, continues)
        adapter, name = await served.route(prompt, adapter, body.model, body.adapter)
        jobs = served.make_jobs(prompt, body.temperature, body.top_k, max_tokens, body.seed, adapter, n,
                                top_p=body.top_p, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty, stop=stop,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                logit_bias=check_logit_bias(body.logit_bias, served.tokenizer.get_vocab_size()))
        reply = OpenAIReply("chat", jobs, name, served.fingerprint, jobs[0].logprobs is not None,
                            include_usage(body), raw=bool(body.raw_content))
        return await respond(served, reply, jobs, body, request, response)

    @router.post("/v1/completions", responses=GENERATES)
    async def openai_text(body: CompletionRequest, request: Request, response: Response):
        adapter, name = served.resolve(body.model, body.adapter, body.adapter_weights)
        n, stop = check_openai_options(body, served.limits)
        tok = served.tokenizer
        prompts = check_text_options(body, served.limits, tok.get_vocab_size())
        prompts_ids = [[tok.get_bos_token_id()] + tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        # one reply, one `model`: "auto" routes a request of several prompts on its first
        adapter, name = await served.route(prompts_ids[0], adapter, body.model, body.adapter)
        jobs = []
        for ids in prompts_ids:
            jobs += served.make_jobs(ids, body.temperature, body.top_k, body.max_tokens, body.seed, adapter, n,
                                     top_p=body.top_p, presence_penalty=body.presence_penalty,
                                     frequency_penalty=body.frequency_penalty, stop=stop, logprobs=body.logprobs,
                                     logit_bias=check_logit_bias(body.logit_bias, tok.get_vocab_size()))
        echo = [p if isinstance(p, str) else tok.decode(p) for p in prompts for _ in range(n)] if body.echo else None
        reply = OpenAIReply("text", jobs, name, served.fingerprint, body.logprobs is not None, include_usage(body),
                            per_prompt=n, raw=bool(body.raw_content), echo=echo)
        return await respond(served, reply, jobs, body, request, response)

    return router


def include_usage(body):
    return bool(body.stream_options and body.stream_options.include_usage)


async def respond(served, reply, jobs, body, request, response):
    """Run an OpenAI request's jobs into its reply: streamed, or one body. The fields it ignored go in a header."""
    if body.user:
        logger.info("%s for user %r", reply.id, body.user[:200])
    if body.stream:
        stream = EventStream(reply.stream(served.pool, jobs))
        served.note_ignored(body, stream)
        return stream
    served.note_ignored(body, response)
    return await reply.collect(served.pool, jobs, request)
