"""The server's composition: create_app puts the replicas, live learning, the guards and the routes together
into one FastAPI app, and serve_in_thread runs an app on a loopback port for tests and benchmarks. What each
route does is routes.py's and live_routes.py's; the command line is scripts/chat_web.py's."""
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.serve.live_routes import live_router
from nanochat.serve.openai_api import (BodySizeLimit, Defaults, Limits, RequestError, describe_validation_errors,
                                       error_response)
from nanochat.serve.replicas import PoolMetrics, Worker, WorkerPool
from nanochat.serve.routes import Served, completion_router, info_router
from nanochat.serve.security import ApiKeyAuth, BrowserGuard, guarded_protocol, without_422


def create_app(workers, model_id="nanochat", limits=None, defaults=None, warm_up=True, learn=None,
               api_key=None, admin_key=None, allowed_hosts=()):
    """The FastAPI app serving `workers` (a list of Worker over replicas of one model and tokenizer).
    learn: None (no live learning) or a function pool -> nanochat.serve.live.LiveLearning.
    api_key / admin_key: see security.ApiKeyAuth (None: open). Without an API key, security.BrowserGuard
    checks the Host header (loopback names and `allowed_hosts`; "*": any) and that POSTs are JSON."""
    limits = limits or Limits()
    metrics = PoolMetrics()
    pool = WorkerPool(workers, observer=metrics)
    metrics.attach(pool)
    live = learn(pool) if learn else None
    if live:
        live.max_jobs, live.job_ttl = limits.max_learn_jobs, limits.job_ttl
        live.max_adapters, live.max_adapter_bytes = limits.max_adapters, limits.max_adapter_bytes
    served = Served(pool, metrics, live, model_id, limits, defaults or Defaults())

    # no trailing-slash redirects: their Location would be built from the client's Host header
    app = FastAPI(title="nanochat", lifespan=lifespan(pool, live, warm_up), redirect_slashes=False)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=api_key, admin_key=admin_key)
    if not api_key:  # added last: runs first
        app.add_middleware(BrowserGuard, allowed_hosts=tuple(allowed_hosts))
    without_422(app)
    add_error_handlers(app)
    app.state.pool = pool
    app.state.live = live
    app.include_router(info_router(served))
    app.include_router(completion_router(served))
    app.include_router(live_router(live, served.tokenizer, served.context, limits))
    return app


def lifespan(pool, live, warm_up):
    """Startup: saved adapters loaded (before any request, while the schedulers are idle), the replicas'
    threads started and warmed up; shutdown: jobs and threads stopped."""
    @asynccontextmanager
    async def run(app):
        if live:
            live.load_saved()
        pool.start()
        if warm_up:
            await pool.on_each_worker(Worker.warm_up)
        yield
        if live:
            live.shutdown()
        pool.shutdown()
    return run


def add_error_handlers(app):
    """Every error answer in OpenAI's shape: refused requests, bodies that don't validate (400, never FastAPI's
    422), and Starlette's own errors (404, 405 with its Allow header, 413)."""
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


@contextmanager
def serve_in_thread(app, startup_timeout=60, request_timeout=Limits.request_timeout):
    """Serve `app` with uvicorn on a free loopback port in a background thread and yield its URL; the
    server stops on exit. For tests and benchmarks that talk HTTP to a server in their own process."""
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
