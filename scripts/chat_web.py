"""Serve a chat model over HTTP: a chat page and an OpenAI-compatible API. This file only wires the parts:
nanochat/serve/replicas.py (replicas, continuous batching), nanochat/serve/openai_api.py (request bodies, limits, OpenAI
translation), nanochat/serve/live_routes.py (live learning).

    python -m scripts.chat_web                          # the SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0 --port 8000
    python -m scripts.chat_web -i base                  # a base model: /v1/completions is the useful route
    python -m scripts.chat_web --quantize int4          # a 4-bit frozen base: adapters learn and serve on it

Endpoints
    GET  /                      the chat page (nanochat/serve/ui.html, self-contained)
    POST /chat/completions      the page's own stream (SSE): one JSON event per `data:` line, each with a
                                "type": queued {position} | text {text} | python {text} | python_output {text}
                                | done {finish_reason, usage} | error {message}
    POST /v1/chat/completions   OpenAI chat completions, stream or not; n, stop, logprobs + top_logprobs, top_p,
                                presence/frequency_penalty, seed, stream_options.include_usage
    POST /v1/completions        OpenAI (legacy) text completions of a plain prompt, for base models too
    GET  /v1/models             the served model and every loaded adapter (`model: "<adapter>"` selects one)
    Every generating route takes "adapter": a name, "none" (the base), or a list of names with an optional
    "adapter_weights" list: a stack, all applied together (openai client: extra_body={"adapter": [...]}).
    GET  /health, GET /stats    liveness, queue depth; per-replica and total requests, tokens, tokens/s
    GET  /metrics               Prometheus text format
    /learn, /adapters           live learning (nanochat/serve/live_routes.py), unless --no-learn

Every replica decodes all of its requests as one batch (requests join and leave at token boundaries;
rows may use different adapters and stacks). A request waits only when its replica already holds --max-batch.

Tools (nanochat/tools/registry.py): calculator, a python REPL over the sandbox, and search over --index (default
<base>/search_index when built; without one, search calls get no output). Each request has its own tool
session; python and search calls run off the batch's thread, so their row sits out while the rest decode.

Security (nanochat/serve/security.py)
    --api-key KEY (or NANOCHAT_API_KEY): every endpoint but GET /health and the page itself (GET /) needs
    "Authorization: Bearer KEY" (what the OpenAI client sends); the page asks for the key in its settings
    when the server answers 401, and keeps it in the browser's localStorage. --admin-key KEY (or
    NANOCHAT_ADMIN_KEY) is then needed for /learn and for changing adapters (activate, delete); without
    one, the API key is enough. Without any key the server listens on loopback only; another --host then
    needs --insecure. A request (headers and body) must arrive within --request-timeout seconds of its
    first byte, or the connection is closed.
"""
import argparse
import logging
import os
import sys
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.sse import format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.common import script_argv
from nanochat.engine import MIN_TEMPERATURE
from nanochat.engine import ReplyParser  # noqa: F401 - re-exported for callers of the old location
from nanochat.serve.live_routes import live_router
from nanochat.serve.openai_api import (BodySizeLimit, CompletionRequest, Defaults, EventStream, Limits, OpenAIRequest,
                                 PageRequest, RequestError, check_adapter_stack, check_messages, check_openai_options,
                                 check_sampling,
                                 describe_validation_errors, error_response, legacy_logprobs,
                                 openai_text_as_parts, part_as_openai_text, sse, sum_usage)
from nanochat.serve.replicas import Job, PoolMetrics, Worker, WorkerPool, load_workers  # noqa: F401 - re-exported
from nanochat.tools.registry import make_registry
from nanochat.serve.security import (SSE, ApiKeyAuth, check_exposure, documented_errors,
                                   guarded_protocol, without_422)

logger = logging.getLogger("nanochat.chat_web")
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "serve", "ui.html")
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request checks whether its client is still there


def create_app(workers, model_id="nanochat", limits=None, defaults=None, warm_up=True, learn=None,
               api_key=None, admin_key=None):
    """The FastAPI app serving `workers` (a list of Worker over replicas of one model and tokenizer).
    learn: None (no live learning) or a function pool -> nanochat.serve.live.LiveLearning.
    api_key / admin_key: see web_security.ApiKeyAuth (None: open)."""
    limits = limits or Limits()
    defaults = defaults or Defaults()
    metrics = PoolMetrics()
    pool = WorkerPool(workers, observer=metrics)
    metrics.attach(pool)
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
            live.load_saved()  # before any request: the schedulers are idle
        pool.start()
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

    def adapter_for(name, model=None, weights=None):
        """The adapter a request runs with: `model` naming a loaded adapter selects it (vLLM's way), as
        does the `adapter` field (a name, or a list of names with adapter_weights: a stack); any other model
        name means the served model."""
        name = check_adapter_stack(name, weights, limits)
        if live is not None and model is not None and model in live.names():
            if name not in (None, model):
                raise RequestError(f"model {model!r} is an adapter but adapter is {name!r}: give one", "adapter")
            name = model
        if live is None:
            if name not in (None, "none"):
                raise RequestError("this server has no adapters (live learning is off)", "adapter")
            return None
        try:
            return live.resolve(name)
        except KeyError as e:
            raise RequestError(f"no adapter {e.args[0]!r}; GET /adapters lists them", "adapter", status=404) from None

    def make_jobs(prompt, temperature, top_k, max_tokens, seed, adapter=None, model=None, n=1, adapter_weights=None,
                  **extra):
        check_sampling(temperature, top_k, max_tokens, seed, limits)
        if len(prompt) >= context:
            raise RequestError(f"the prompt is {len(prompt)} tokens but the model's context is {context} tokens, "
                               "with room needed for the reply: start a new conversation or shorten it", "messages")
        temperature = defaults.temperature if temperature is None else temperature
        job = Job(prompt=prompt, max_tokens=max_tokens or defaults.max_tokens,
                  temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                  top_k=defaults.top_k if top_k is None else top_k,
                  adapter=adapter_for(adapter, model, adapter_weights),
                  **{k: v for k, v in extra.items() if v is not None})
        if seed is not None:
            job.seed = seed
        # n choices: rows of one batch, each with its own seed (seed, seed + 1, ...) so they differ
        return [Job(**{**vars(job), "seed": job.seed + i}) for i in range(n)]

    def chat_prompt(messages):
        check_messages(messages, limits)
        return tokenizer.render_for_completion(messages)

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

    @app.get("/metrics", response_class=PlainTextResponse, responses=documented_errors(401))  # Prometheus text
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", responses=documented_errors(401))
    async def models():
        data = [{"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}]
        provenance = {a["name"]: a["provenance"] for a in live.describe()["adapters"]} if live else {}
        for name in (live.names() if live else []):
            # beside vLLM's fields: how a merged or nested adapter came about (GET /adapters has the rest)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "nanochat",
                         "parent": model_id, "root": model_id, "provenance": provenance.get(name)})
        return {"object": "list", "data": data}

    @app.post("/chat/completions", responses={200: {"content": SSE}} | documented_errors(400, 401, 404, 413),
              openapi_extra={"x-sse-only": True})
    async def page_completion(body: PageRequest):
        messages = [m.model_dump() for m in body.messages]
        (job,) = make_jobs(chat_prompt(messages), body.temperature, body.top_k, body.max_tokens, body.seed,
                           body.adapter, adapter_weights=body.adapter_weights)

        async def events():
            async with aclosing(pool.run(job)) as stream:
                async for event in stream:
                    event.pop("logprobs", None)
                    yield sse(event)

        return EventStream(events())

    async def respond(jobs, body, request, kind):
        """Run the n jobs of an OpenAI request; kind "chat" (chat.completion) or "text" (text_completion)."""
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        now, n = int(time.time()), len(jobs)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        want_logprobs = jobs[0].logprobs is not None
        # replies name the served model, or the adapter that `model` selected
        reply_model = body.model if live is not None and body.model in live.names() else model_id
        offsets = [0] * n  # legacy logprobs: text offset of each choice's next token

        def choice(i, text=None, finish=None, entries=None, delta=None):
            c = {"index": i, "finish_reason": finish, "logprobs": None}
            if want_logprobs and entries is not None:
                if kind == "chat":
                    c["logprobs"] = {"content": entries}
                else:
                    c["logprobs"], offsets[i] = legacy_logprobs(entries, offsets[i])
            if kind == "chat" and delta is not None:  # a stream chunk
                c["delta"] = delta
            elif kind == "chat":
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text or ""
            return c

        if body.stream:
            def chunk(choices, usage=None):
                out = {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": now,
                       "model": reply_model, "choices": choices}
                if include_usage:
                    out["usage"] = usage  # as OpenAI: null on every chunk but the last
                return out

            async def events():
                if kind == "chat":
                    yield sse(chunk([choice(i, delta={"role": "assistant", "content": ""}) for i in range(n)]))
                usages = [None] * n
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
                            yield sse(chunk([choice(i, finish=event["finish_reason"], entries=event.get("logprobs"),
                                                    delta={} if kind == "chat" else None)]))
                        else:
                            text = part_as_openai_text(t, event["text"])
                            yield sse(chunk([choice(i, text=text, entries=event.get("logprobs"),
                                                    delta={"content": text} if kind == "chat" else None)]))
                if include_usage and all(usages):
                    yield sse(chunk([], sum_usage(usages)))
                yield format_sse_event(data_str="[DONE]")

            return EventStream(events())

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
        return {"id": cid, "object": obj, "created": now, "model": reply_model,
                "choices": [choice(i, "".join(pieces[i]), finishes[i], entries[i]) for i in range(n)],
                "usage": sum_usage(usages)}

    @app.post("/v1/chat/completions", responses={200: {"content": SSE}} | documented_errors(400, 401, 404, 413))
    async def openai_chat(body: OpenAIRequest, request: Request):
        n, stop = check_openai_options(body, limits)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise RequestError(f"top_logprobs must be between 0 and 20; got {body.top_logprobs}", "top_logprobs")
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": m.role, "content": openai_text_as_parts(text) if m.role == "assistant" else text})
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        jobs = make_jobs(chat_prompt(messages), body.temperature, body.top_k, max_tokens, body.seed, body.adapter,
                         body.model, n, body.adapter_weights, top_p=body.top_p, presence_penalty=body.presence_penalty,
                         frequency_penalty=body.frequency_penalty, stop=stop,
                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        return await respond(jobs, body, request, "chat")

    @app.post("/v1/completions", responses={200: {"content": SSE}} | documented_errors(400, 401, 404, 413))
    async def openai_text(body: CompletionRequest, request: Request):
        n, stop = check_openai_options(body, limits)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(f"one prompt per request; got {len(prompts)}", "prompt")
        if len(prompts[0]) > limits.max_total_chars:
            raise RequestError(f"the prompt is {len(prompts[0])} characters; the limit is {limits.max_total_chars} "
                               "(--max-total-chars)", "prompt")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise RequestError(f"logprobs must be between 0 and 5; got {body.logprobs}", "logprobs")
        prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode(prompts[0])
        jobs = make_jobs(prompt, body.temperature, body.top_k, body.max_tokens, body.seed, body.adapter, body.model,
                         n, body.adapter_weights, top_p=body.top_p, presence_penalty=body.presence_penalty,
                         frequency_penalty=body.frequency_penalty, stop=stop, logprobs=body.logprobs)
        return await respond(jobs, body, request, "text")

    app.include_router(live_router(live, tokenizer, context, limits))
    return app


# --------------------------------------------------------------------------------------------
# command line

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
    from nanochat.serve.live import LiveLearning
    trainer = copy.deepcopy(workers[0].model)  # taken before the workers get their LoRA hooks
    return lambda pool: LiveLearning(pool, trainer, workers[0].tokenizer, root, general_chats=general_chats)


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
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="serve and learn adapters on a weight-only quantized frozen base (int8: ~2x, int4: ~3.8x "
                        "less weight memory than bf16; adapters are bound to the base they were learned on)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests one replica decodes together")
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
        workers, meta = load_workers(args.source, device_type, args.num_gpus, args.model_tag, args.step,
                                     max_batch=args.max_batch, tools=tools, quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd%d' % workers[0].model.config.n_layer}"
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    defaults = Defaults(args.temperature, args.top_k, args.max_tokens)
    learn = None
    if not args.no_learn:
        from nanochat.lora.storage import adapters_dir
        learn = make_live_learning(workers, args.adapters_dir or adapters_dir())
    app = create_app(workers, model_id, limits, defaults, learn=learn, api_key=args.api_key or None,
                     admin_key=args.admin_key or None)
    devices = ", ".join(str(w.device) for w in workers)
    if args.quantize != "none":
        devices += f" ({args.quantize} weight-only base)"
    print(f"serving {model_id} (step {meta.get('step', '?')}) on {devices}: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    print(exposure, file=sys.stderr, flush=True)
    print(tools_line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=guarded_protocol(args.request_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
