"""Model replicas behind a server: one continuously batching Scheduler per device, requests spread over
them, and each request's tokens turned into reply events on the asyncio loop. No HTTP in here.

    pool = WorkerPool([Worker(0, model, tokenizer)])
    async for event in pool.run(Job(prompt_ids, max_tokens=64, temperature=0.0, top_k=50)):
        ...  # queued {position} | text {text} | python {text, (open)} | python_output {text, (open)}
             # | special {text} | done {finish_reason, usage, (logprobs)} | error {message}
             # (the text and tool events are engine.ReplyParser's)

A Worker owns a model replica and its Scheduler thread (on CUDA the thread sets its GPU). WorkerPool gives
each new request to the replica with the fewest requests in it (active + waiting); there it joins the
running batch at the next step. A request waits only when its replica's batch is full (max_batch rows),
and is then told its place every QUEUE_NOTICE_S. Closing a request's event stream (the client left)
cancels it: its row leaves the batch at the next step.
"""
import asyncio
import logging
import random
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanochat.checkpoint_manager import load_model
from nanochat.engine import ReplyParser, token_bytes
from nanochat.lora.quant import quantize_base
from nanochat.serve.scheduler import Request, Scheduler

logger = logging.getLogger("nanochat.serve.replicas")
QUEUE_NOTICE_S = 1.0  # while a request waits for a row, tell its client its place this often


@dataclass
class Job:
    """One reply to generate: the prompt's token ids and how to sample."""
    prompt: list
    max_tokens: int
    temperature: float
    top_k: int
    seed: int = field(default_factory=lambda: random.randrange(2 ** 31))
    adapter: str | tuple | None = None  # LoRA adapter to generate with: None (the base weights), a name, or
    # ((name, weight), ...): a stack, applied together
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    stop: list = field(default_factory=list)  # strings: the reply's text ends before the first one
    logit_bias: dict | None = None  # token id -> added to its logit before sampling


class StopStrings:
    """Cuts a text stream at the first of some stop strings. push(text) -> (text safe to send, stopped);
    text that could still begin a stop string is held back until it can't (or flush() at the end)."""

    def __init__(self, stops):
        self.stops, self.held = list(stops), ""

    def push(self, text):
        if not self.stops:
            return text, False
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = 0  # the longest tail of text that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


def stack_names(adapter):
    """The adapter names a Job's `adapter` uses: [] for the base, [name], or the names of a stack."""
    if adapter is None:
        return []
    return [adapter] if isinstance(adapter, str) else [n for n, _ in adapter]


def adapter_objects(adapter, lora):
    """A Job's `adapter` (None, a name, or ((name, weight), ...)) -> what a scheduler Request takes: None, the
    Adapter object, or ((Adapter, weight), ...). Taken now, these versions serve the whole request even if one
    is replaced meanwhile. Raises KeyError naming the first adapter that is not loaded."""
    missing = [n for n in stack_names(adapter) if lora is None or n not in lora.adapters]
    if missing:
        raise KeyError(missing[0])
    if adapter is None:
        return None
    if isinstance(adapter, str):
        return lora.adapters[adapter]
    return tuple((lora.adapters[n], w) for n, w in adapter)


def logprob_entry(tokenizer, event):
    """A token's logprob in OpenAI's chat shape: {token, logprob, bytes, top_logprobs: [...]}."""
    def one(tok, lp):
        b = token_bytes(tokenizer, tok)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
    return {**one(event.token, event.logprob), "top_logprobs": [one(t, lp) for t, lp in (event.top_logprobs or [])]}


class ReplyEvents:
    """One reply's tokens -> its events: text and tool parts (ReplyParser) cut at the first stop string, each
    event carrying the logprob entries of the tokens since the previous one (when the job asks for them)."""

    def __init__(self, job, tokenizer):
        self.tokenizer, self.logprobs = tokenizer, job.logprobs is not None
        self.parser, self.stops = ReplyParser(tokenizer), StopStrings(job.stop)
        self.pending = []  # logprob entries not yet attached to an event

    def attach(self, e):
        if self.logprobs:
            e["logprobs"] = self.pending[:]
            self.pending.clear()
        return e

    def filtered(self, parts):
        """Parser events through the stop strings -> (events, stopped)."""
        out = []
        for e in parts:
            if e["type"] == "text":
                text, hit = self.stops.push(e["text"])
                if text:
                    out.append({"type": "text", "text": text})
                if hit:
                    return out, True
            else:
                held = self.stops.flush()
                if held:
                    out.append({"type": "text", "text": held})
                out.append(e)
        return out, False

    def token(self, event):
        """A scheduler Event with a (non-stop) token -> (events to send, whether a stop string ended the reply)."""
        if self.logprobs:
            self.pending.append(logprob_entry(self.tokenizer, event))
        out, hit = self.filtered(self.parser.push(event.token))
        return [self.attach(e) for e in out], hit

    def finish(self, reason, usage, cut):
        """The last events of a reply that ended with `reason`: what the parser and the stop strings still
        held (nothing when a stop string cut it: the text ends where that begins), then done."""
        out = []
        if not cut:
            parts, _ = self.filtered(self.parser.finish())
            out = [self.attach(e) for e in parts + [{"type": "text", "text": self.stops.flush()}]
                   if e["text"] or e["type"] != "text"]
        return out + [self.attach({"type": "done", "finish_reason": reason, "usage": usage})]


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Worker:
    """One model replica and the scheduler that batches every request given to it."""

    def __init__(self, index, model, tokenizer, max_batch=64, prefill_tokens=512, tools=None):
        """max_batch: most requests decoded together (more wait); prefill_tokens: most prompt tokens
        prefilled per step (a longer prompt is spread over several steps); tools: a nanochat.tools.registry.ToolRegistry
        (default: calculator + python REPL)."""
        self.index = index
        self.model, self.tokenizer = model, tokenizer
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, prefill_tokens=prefill_tokens, tools=tools)
        self.engine = self.scheduler.engine
        # a fully quantized GPT has no parameters left (its weights are buffers): ask it for its device
        get_device = getattr(model, "get_device", None)
        self.device = get_device() if callable(get_device) else next(model.parameters()).device
        self.requests = 0
        self.tokens = 0

    @property
    def lora(self):
        """A nanochat.lora.adapter.LoRA when live learning is on (set by LiveLearning), else None."""
        return self.scheduler.lora

    @lora.setter
    def lora(self, lora):
        self.scheduler.lora = lora

    @property
    def busy(self):
        return self.scheduler.active() > 0

    def load(self):
        return self.scheduler.active() + self.scheduler.queue_length()

    def warm_up(self):
        """One short generation, so the first real request doesn't pay for lazy initialisation."""
        prompt = self.tokenizer.render_for_completion([{"role": "user", "content": "Hello"}])
        for _ in self.engine.generate(prompt, max_tokens=2, temperature=0.0):
            pass

    def stats(self):
        busy = self.scheduler.busy_seconds
        return {"id": self.index, "device": str(self.device), "busy": self.busy, "requests": self.requests,
                "active": self.scheduler.active(), "queue_depth": self.scheduler.queue_length(),
                "batch_size": self.scheduler.last_batch,
                "peak_batch_size": self.scheduler.peak_batch, "tokens": self.tokens, "busy_seconds": round(busy, 3),
                "tokens_per_second": round(self.tokens / busy, 2) if busy else None}


class WorkerPool:
    """Spreads requests over workers. Lives on the server's event loop; schedulers reach it only through
    call_soon_threadsafe. `observer(kind, **values)`, if given, hears about requests and tokens (metrics)."""

    def __init__(self, workers, observer=None):
        self.workers = list(workers)
        self.active = 0
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.started_at = time.time()
        self.observer = observer or (lambda kind, **values: None)
        self.leases = None  # nanochat.serve.live.LiveLearning when adapters exist: held while a request uses one
        self._started = False

    def start(self):
        if not self._started:
            for w in self.workers:
                w.scheduler.start(name=f"nanochat-worker{w.index}")
            self._started = True

    def _pick(self):
        return min(self.workers, key=lambda w: (w.load(), w.requests))

    def queue_depth(self):
        return sum(w.scheduler.queue_length() for w in self.workers)

    async def run(self, job, worker=None):
        """Async generator of one job's events (see the module docstring). Closing it early cancels the job.
        worker: the replica to use (default: the least loaded)."""
        loop = asyncio.get_running_loop()
        # a lease on each adapter from admission to the end: deleting one waits for this request
        leased = []
        try:
            for name in stack_names(job.adapter) if self.leases is not None else []:
                if not self.leases.acquire(name):  # deleted between admission and now
                    yield {"type": "error", "status": 404,
                           "message": f"adapter {name!r} was deleted; GET /adapters lists them"}
                    return
                leased.append(name)
            async with aclosing(self._run(job, worker or self._pick(), loop)) as stream:
                async for event in stream:
                    yield event
        finally:
            for name in leased:
                self.leases.release(name)

    async def _run(self, job, worker, loop):
        try:
            adapter = adapter_objects(job.adapter, worker.lora)
        except KeyError as e:
            yield {"type": "error", "status": 404, "message": f"adapter {e.args[0]!r} is not loaded"}
            return
        events = asyncio.Queue()
        request = Request(job.prompt, max_tokens=job.max_tokens, temperature=job.temperature, top_k=job.top_k or None,
                          top_p=job.top_p, seed=job.seed, presence_penalty=job.presence_penalty,
                          frequency_penalty=job.frequency_penalty, logprobs=job.logprobs, adapter=adapter,
                          logit_bias=job.logit_bias)

        def on_event(event):  # the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                handle.cancel()

        handle = worker.scheduler.submit(request, on_event)
        worker.requests += 1
        self.active += 1
        self.observer("request")
        reply, stop_tokens = ReplyEvents(job, worker.tokenizer), worker.engine.stop_tokens
        n, finish, cut = 0, None, False
        t_start = t_last = time.perf_counter()
        try:
            while True:
                position = worker.scheduler.position(handle) if n == 0 else 0
                if position:
                    yield {"type": "queued", "position": position}
                    try:
                        event = await asyncio.wait_for(events.get(), QUEUE_NOTICE_S)
                    except asyncio.TimeoutError:
                        continue
                else:
                    event = await events.get()
                if event.token is not None:
                    now = time.perf_counter()
                    self.observer("token", first=n == 0, seconds=now - (t_start if n == 0 else t_last))
                    t_last, n = now, n + 1
                    worker.tokens += 1
                    if event.token in stop_tokens:
                        finish = event.finish
                        break
                    out, cut = reply.token(event)
                    for e in out:
                        yield e
                    if cut:
                        handle.cancel()  # the reply is complete: its row leaves at the next step
                        finish = "stop"
                        break
                if event.finish is not None:
                    finish = event.finish
                    break
            if finish == "error":
                yield {"type": "error", "message": f"generation failed: {event.error}"}
            elif finish != "cancelled":
                for e in reply.finish(finish, usage(len(job.prompt), n), cut):
                    yield e
        finally:
            handle.cancel()
            self.active -= 1
            self.finished[finish if finish in self.finished else "cancelled"] += 1
            self.observer("finish", reason=finish or "cancelled")

    async def run_many(self, jobs):
        """The events of several jobs (the n choices of one request) as (index, event), as they come; closing
        it cancels every job. All choices go to one replica, so they are rows of one batch."""
        worker = self._pick()
        queue = asyncio.Queue()

        async def pump(i, job):
            try:
                async with aclosing(self.run(job, worker)) as stream:
                    async for event in stream:
                        await queue.put((i, event))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, event = await queue.get()
                if event is None:
                    remaining -= 1
                else:
                    yield i, event
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def on_each_worker(self, fn):
        """Run fn(worker) on every worker's scheduler thread between two steps (no forward in flight);
        used for the warm-up and to load or remove adapters on every replica while requests go on."""
        futures = [asyncio.wrap_future(w.scheduler.call(lambda w=w: fn(w))) for w in self.workers]
        return await asyncio.gather(*futures)

    def stats(self):
        tokens = sum(w.tokens for w in self.workers)
        busy = sum(w.scheduler.busy_seconds for w in self.workers)
        return {
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "workers": [w.stats() for w in self.workers],
            "queue_depth": self.queue_depth(),
            "requests_active": self.active,
            "requests_served": self.finished["stop"] + self.finished["length"],
            "requests_cancelled": self.finished["cancelled"],
            "requests_failed": self.finished["error"],
            "tokens_generated": tokens,
            # tokens per second of stepping, all requests of a replica together (its batch throughput)
            "tokens_per_second": round(tokens / busy, 2) if busy else None,
        }

    def shutdown(self):
        for w in self.workers:
            w.scheduler.stop()


QUANTIZE = {"none": None, "int8": 8, "int4": 4}  # --quantize -> nanochat.lora.quant bits


def load_workers(source, device_type, num_gpus=1, model_tag=None, step=None, max_batch=64, tools=None,
                 quantize="none"):
    """One Worker per device: cuda:0..num_gpus-1, or a single one on cpu/mps. -> (workers, meta).
    quantize "int8" / "int4": every weight matrix of each replica becomes weight-only quantized
    (nanochat/lora/quant.py, a frozen base ~2x / ~3.8x smaller than bf16) before it serves, so adapters
    learned and served on it are bound to that quantized base."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize {quantize!r}: choose one of {sorted(QUANTIZE)}")
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
        if QUANTIZE[quantize]:
            quantize_base(model, bits=QUANTIZE[quantize])
        workers.append(Worker(i, model, tokenizer, max_batch=max_batch, tools=tools))
    return workers, meta


class PoolMetrics:
    """Prometheus metrics of a WorkerPool (its `observer`): requests by finish reason, generated tokens,
    time to first token and between tokens, and at scrape time the queue length, running requests and
    the last decode batch size. Its own registry, so several servers in one process don't collide."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "Requests by how they finished", ["finish_reason"], registry=r)
        self.started = Counter("nanochat_requests_started", "Requests given to a replica", registry=r)
        self.tokens = Counter("nanochat_generated_tokens", "Tokens appended to replies", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "From a request reaching a replica to its "
                              "first token", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("nanochat_inter_token_seconds", "Between two tokens of one reply",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)
        self.queue = Gauge("nanochat_queue_length", "Requests waiting for a row of a batch", registry=r)
        self.running = Gauge("nanochat_requests_running", "Requests being generated", registry=r)
        self.batch = Gauge("nanochat_batch_size", "Rows in the last decode step, all replicas", registry=r)

    def attach(self, pool):
        self.queue.set_function(pool.queue_depth)
        self.running.set_function(lambda: pool.active)
        self.batch.set_function(lambda: sum(w.scheduler.last_batch for w in pool.workers))

    def __call__(self, kind, **values):
        if kind == "request":
            self.started.inc()
        elif kind == "token":
            self.tokens.inc()
            (self.ttft if values["first"] else self.itl).observe(values["seconds"])
        elif kind == "finish":
            self.requests.labels(values["reason"]).inc()

    def render(self):
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

