"""Continuous batching for one model replica: every active request decodes in one forward per step; it knows
token ids only (no HTTP, no chat template, no text: servers and the CLI render prompts and parse replies).

    sched = Scheduler(model, tokenizer, lora=lora)        # lora: optional, for per-request adapters
    handle = sched.submit(Request(prompt_ids, max_tokens=64, temperature=0.0), on_event)
    sched.run_until_idle()                                # synchronous; or sched.start() for a thread
    handle.cancel()                                       # leaves at the next step

How a step runs (Scheduler.step):
1. Functions queued with call() run (e.g. loading an adapter): between two steps no forward is in flight.
2. Waiting requests get a free slot of the ragged KV cache (kv_cache.RaggedKVCache), up to max_batch at once.
   Cancelled ones leave: waiting or running, their slot is freed at once.
3. Prefill: rows whose prompt is not fully in the cache feed their next chunk, several rows in one forward,
   at most `prefill_tokens` tokens (rows x padded length) per step, so a long prompt is spread over
   several steps and never freezes the others for more than one chunk. A row whose prompt is complete
   samples its first token from the prompt's last logits.
4. Decode: every row with a token to feed runs in one (rows, 1) forward; each row samples its next token.
   A row whose token closed a python or search call sits out until the call (on a small thread pool)
   has queued its output; calculator calls run inline. When only tool calls are in flight, step waits.

As in Engine.generate, <|output_start|> and <|output_end|> are never sampled (Engine.ban): a tool's output is
only ever what run_tool forces, whatever the model tries to write.

Each row has its own sampling settings and torch.Generator (seeded by its request), so its tokens do not
depend on what else is in the batch: sampled exactly as Engine.generate samples one sequence (a sample is
drawn every step, and the calculator's forced tokens replace it), greedy rows equal Engine's greedy rows.
Per row too: tool state (engine.RowState with its own nanochat.tools.registry session, dispatched by the call's
text exactly as Engine.generate does: calculator, python REPL started from the prompt's python calls,
search), stop tokens
(<|assistant_end|>, <|bos|>), max_tokens and the model's context; presence/frequency penalties over the
tokens it generated; logit_bias; and optionally logprobs (of the distribution it samples from, before penalties,
bias and temperature) with the top alternatives. With a nanochat.lora.adapter.LoRA, a request may name an Adapter object
or a stack of (Adapter, weight) pairs: each row's low-rank update applies to its own rows only
(LoRA.per_row), and because the row holds the objects, an adapter replaced while it runs keeps serving it;
requests that start later get the new one.

Events reach `on_event(Event)` on the scheduler's thread, one per token; the last one carries `finish`:
stop | length | cancelled | error (a cancel or error may come without a token).
"""
import heapq
import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.engine import Engine, sample_next_token
from nanochat.kv_cache import RaggedKVCache
from nanochat.tools.registry import ToolRegistry, parse_call

logger = logging.getLogger("nanochat.serve.scheduler")
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, ~1.2e-38
IMPOSSIBLE_LOGPROB = -9999.0


@dataclass
class Request:
    """What to generate: prompt ids and how to sample them."""
    prompt: list
    max_tokens: int | None = None  # None: until a stop token or the model's context
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42
    presence_penalty: float = 0.0  # subtracted from the logit of every token the row generated already
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    logit_bias: dict | None = None  # token id -> added to its logit before sampling (-100 bans, 100 forces)
    adapter: object = None  # a nanochat.lora.adapter.Adapter, ((Adapter, weight), ...) for a stack, or None: the base


@dataclass
class Event:
    """One appended token of a request (token None only on a cancel/error finish)."""
    token: int | None
    sampled: bool = True  # False: forced by the calculator tool
    logprob: float | None = None
    top_logprobs: list | None = None  # [(token, logprob)], most likely first
    finish: str | None = None  # on the request's last event: stop | length | cancelled | error
    error: str | None = None


class Handle:
    """A submitted request. cancel() is safe from any thread; the row leaves at the next step."""

    def __init__(self, request, on_event):
        self.request, self.on_event = request, on_event
        self.cancelled = False
        self.tokens = 0
        self.slot = None  # the KV-cache slot once admitted

    def cancel(self):
        self.cancelled = True


class _Row:
    """A request holding a slot of the KV cache."""

    def __init__(self, handle, slot, budget, device, state):
        req = handle.request
        self.handle, self.req, self.slot, self.budget = handle, req, slot, budget
        self.prefilled = 0  # prompt tokens already in the cache
        self.last = None  # the token to feed at the next decode step
        self.state = state  # engine.RowState: tool session, forced output, stop
        self.tool = None  # a Future while a slow tool call runs off the scheduler's thread: the row sits out
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed)
        self.penalized = bool(req.presence_penalty or req.frequency_penalty)
        self.counts = None  # per-token counts of generated tokens (penalties only), allocated on first use
        self.bias = None  # (V,) logit_bias as a dense vector, made at admission


class Scheduler:
    def __init__(self, model, tokenizer, max_batch=64, prefill_tokens=512, lora=None, tools=None, tool_threads=4):
        """tools: a nanochat.tools.registry.ToolRegistry, as Engine takes it (default: calculator + python REPL).
        tool_threads: python/search calls running at once, off the scheduler's thread."""
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"need max_batch >= 1 and prefill_tokens >= 1, got {max_batch} and {prefill_tokens}")
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        tools = ToolRegistry() if tools is None else tools
        self.engine = Engine(model, tokenizer, tools=tools)  # validation, stop tokens, tool use
        self._tools = ThreadPoolExecutor(tool_threads, thread_name_prefix="nanochat-tools")
        self.device = self.engine.device()
        if self.device.type == "cpu":
            # a CPU serves in fp32 even where bf16 is native: neither packed bf16 Linears nor bf16 autocast measured
            # a clear win under continuous batching there (dev/notes_decode.md); elsewhere the model's dtype holds
            model.compute_dtype = torch.float32
        c = model.config
        self.context = c.sequence_len
        self.prefill_tokens = prefill_tokens
        self.cache = RaggedKVCache(max_batch, c.n_kv_head, c.n_embd // c.n_head, c.n_layer,
                                   seq_len=min(256, c.sequence_len))
        self._free = list(range(max_batch))  # a heap: the lowest free slot first keeps rows contiguous
        self.rows = []  # _Row, in admission order; touched only by the scheduler's thread
        self._waiting = deque()  # handles without a slot yet
        self._calls = deque()  # (fn, Future) to run between steps
        self._lock = threading.Condition()
        self._thread, self._stopping = None, False
        self.steps = 0
        self.last_batch = self.peak_batch = 0  # rows in the last / the largest decode forward
        self.busy_seconds = 0.0  # time spent in steps that ran a forward

    # --- submitting -------------------------------------------------------------------------
    def submit(self, request, on_event):
        """Queue a request; its events go to on_event (called on the scheduler's thread). Bad arguments
        raise ValueError here, before anything runs."""
        prompt, temperature = self.engine.validate(request.prompt, 1, request.max_tokens, request.temperature,
                                                   request.top_k)
        if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {request.top_p!r}")
        if request.top_p is not None:
            # sampling compares top_p with float32 probabilities, where one below ~7e-46 rounds to 0 and keeps no
            # token; any top_p below the best token's probability (>= 1/vocab) keeps just that one, as this does
            request.top_p = max(request.top_p, FLOAT32_TINY)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(request, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(request, name)!r}")
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise ValueError("logprobs (the number of alternatives) must be between 0 and 20, "
                             f"got {request.logprobs!r}")
        vocab = self.model.config.vocab_size
        for tok, bias in (request.logit_bias or {}).items():
            if not (isinstance(tok, int) and 0 <= tok < vocab and -100.0 <= bias <= 100.0):
                raise ValueError(f"logit_bias maps token ids in [0, {vocab}) to numbers in [-100, 100], "
                                 f"got {tok!r}: {bias!r}")
        if request.adapter is not None and self.lora is None:
            raise ValueError("this scheduler has no LoRA attached, so a request cannot use an adapter")
        request.prompt, request.temperature = prompt, temperature
        handle = Handle(request, on_event)
        with self._lock:
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def call(self, fn):
        """Run fn() on the scheduler's thread between two steps (no forward in flight); -> a Future of its
        result. The way to change weights or adapters of a running replica."""
        fut = Future()
        with self._lock:
            self._calls.append((fn, fut))
            self._lock.notify()
        if self._thread is None:  # synchronous use: run it now
            self._run_calls()
        return fut

    def queue_length(self):
        return len(self._waiting)

    def position(self, handle):
        """1-based place of a waiting request among those that cannot get a slot at the next step; 0 when
        it will be (or was) admitted."""
        with self._lock:
            for i, h in enumerate(self._waiting):
                if h is handle:
                    return max(0, i + 1 - len(self._free))
        return 0

    def active(self):
        return len(self.rows)

    def pending(self):
        return bool(self.rows or self._waiting or self._calls)

    # --- running ------------------------------------------------------------------------------
    def run_until_idle(self):
        while self.pending():
            self.step()

    def start(self, name="nanochat-scheduler"):
        """Run steps on a background thread whenever there is work (on CUDA the thread sets its device)."""
        assert self._thread is None, "already started"

        def loop():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while True:
                with self._lock:
                    while not self._stopping and not self.pending():
                        self._lock.wait()
                    if self._stopping:
                        return
                self.step()

        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout=10):
        """Stop the thread; requests still running or waiting finish as cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for row in list(self.rows):
            self._emit(row.handle, Event(None, finish="cancelled"))
        self.rows = []
        self._tools.shutdown(wait=False, cancel_futures=True)
        while self._waiting:
            self._emit(self._waiting.popleft(), Event(None, finish="cancelled"))

    @torch.no_grad()
    def step(self):
        """One round: queued calls, admissions, one prefill forward, one decode forward. -> pending()."""
        t0 = time.perf_counter()
        self._run_calls()
        self._admit()
        self._collect_tools()
        prefilling = [r for r in self.rows if r.prefilled < len(r.req.prompt)]
        if prefilling:
            self._prefill(prefilling)
        decoding = sorted((r for r in self.rows if r.last is not None and r.tool is None), key=lambda r: r.slot)
        self.last_batch = len(decoding)
        if decoding:
            self.peak_batch = max(self.peak_batch, self.last_batch)
            logits = self._forward(decoding, [[r.last] for r in decoding])
            if logits is not None:
                self._sample(decoding, logits)
        self.steps += 1
        if prefilling or decoding:
            self.busy_seconds += time.perf_counter() - t0
        else:  # only tool calls in flight: wait for one instead of spinning (new requests wait at most this)
            running = [r.tool for r in self.rows if r.tool is not None]
            if running:
                wait(running, timeout=0.05, return_when=FIRST_COMPLETED)
        return self.pending()

    def _collect_tools(self):
        """Rows whose tool call has finished rejoin the batch (their output is in row.state.forced)."""
        for r in [r for r in self.rows if r.tool is not None and r.tool.done()]:
            error = r.tool.exception()
            r.tool = None
            if error is not None:
                logger.error("a tool call failed: %r", error)
                self._release(r, Event(None, finish="error", error=f"{type(error).__name__}: {error}"))

    def _run_calls(self):
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    fut.set_exception(e)

    def _admit(self):
        for row in [r for r in self.rows if r.handle.cancelled]:
            self._release(row, Event(None, finish="cancelled"))
        with self._lock:
            admitted = []
            while self._waiting and (self._free or self._waiting[0].cancelled):
                handle = self._waiting.popleft()
                admitted.append((handle, None if handle.cancelled else heapq.heappop(self._free)))
        for handle, slot in admitted:
            if slot is None:
                self._emit(handle, Event(None, finish="cancelled"))
                continue
            req = handle.request
            budget = self.context - len(req.prompt)
            if req.max_tokens is not None:
                budget = min(budget, req.max_tokens)
            row = _Row(handle, slot, budget, self.device, self.engine.new_row(req.prompt))
            if req.logit_bias:
                row.bias = torch.zeros(self.model.config.vocab_size, device=self.device)
                row.bias[list(req.logit_bias)] = torch.tensor(list(req.logit_bias.values()), device=self.device)
            handle.slot = slot
            self.cache.reset(slot)
            if budget == 0:
                heapq.heappush(self._free, slot)
                self._emit(handle, Event(None, finish="length"))
                continue
            self.rows.append(row)

    def _prefill(self, rows):
        """One forward of prompt chunks: the first row's next chunk sets the padded length T; later rows
        join while rows x T stays within prefill_tokens."""
        T = min(self.prefill_tokens, len(rows[0].req.prompt) - rows[0].prefilled)
        batch = rows[:self.prefill_tokens // T]  # at least the first row: T <= prefill_tokens
        chunks = [r.req.prompt[r.prefilled: r.prefilled + T] for r in batch]
        logits = self._forward(batch, chunks)
        if logits is None:
            return
        done, last = [], []
        for i, (r, c) in enumerate(zip(batch, chunks)):
            r.prefilled += len(c)
            if r.prefilled == len(r.req.prompt):
                done.append(r)
                last.append(logits[i])
        if done:
            self._sample(done, torch.stack(last))

    def _forward(self, rows, inputs):
        """Run the model over rows (each continuing its slot with its list of input ids, right-padded).
        -> logits (n, V) at each row's last input, or None after failing every row (the error goes to each
        request)."""
        T = max(len(x) for x in inputs)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        view = self.cache.rows([r.slot for r in rows], [len(x) for x in inputs])
        adapters = [r.req.adapter for r in rows]
        per_row = self.lora.per_row(adapters) if self.lora is not None else nullcontext()
        try:
            with per_row:
                last = torch.tensor([len(x) - 1 for x in inputs], device=self.device)
                return self.model(ids.to(self.device), kv_cache=view, logits_at=last)
        except Exception as e:  # noqa: BLE001 - one bad forward fails its rows, never the scheduler
            logger.exception("forward failed for %d rows", len(rows))
            for r in rows:
                self._release(r, Event(None, finish="error", error=f"{type(e).__name__}: {e}"))
            return None

    def _sample(self, rows, logits):
        """logits (n, V) fp32, row i's next-token logits -> each row's next token, events, finishes."""
        allowed = self.engine.ban(logits)  # tool output markers are only ever forced
        greedy = allowed.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            try:
                self._sample_row(r, allowed[i], greedy[i])
            except Exception as e:  # noqa: BLE001 - e.g. a tool failing on what the model wrote: this row only
                logger.exception("sampling failed for a row")
                if r in self.rows:
                    self._release(r, Event(None, finish="error", error=f"{type(e).__name__}: {e}"))

    def _sample_row(self, r, logits, greedy):
        """One row's next token from its logits (V,), the tool output markers banned: sampling, forced tool
        output, logprobs (before penalties, bias and temperature), finish."""
        req = r.req
        lg = logits[None]
        if r.penalized and r.counts is not None:
            lg = lg - req.presence_penalty * (r.counts > 0) - req.frequency_penalty * r.counts
        if r.bias is not None:
            lg = lg + r.bias
        if req.temperature == 0.0 and not r.penalized and r.bias is None:
            tok = greedy
        else:
            tok = int(sample_next_token(lg, r.generator, req.temperature, req.top_k or None, req.top_p)[0])
        sampled = not r.state.forced
        if not sampled:
            tok = r.state.forced.popleft()
        event = Event(tok, sampled)
        if req.logprobs is not None:
            # OpenAI writes an impossible token's logprob as -9999 (JSON has no -inf): a forced output marker's
            lp = F.log_softmax(logits.float(), dim=-1).clamp(min=IMPOSSIBLE_LOGPROB)
            event.logprob = float(lp[tok])
            if req.logprobs:
                values, ids = lp.topk(min(req.logprobs, lp.size(0)))
                event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
        if r.penalized:
            if r.counts is None:
                r.counts = torch.zeros(logits.size(-1), device=logits.device)
            r.counts[tok] += 1
        r.handle.tokens += 1
        call = self.engine.advance(r.state, tok)
        if r.state.done:
            event.finish = "stop"
        elif r.handle.tokens >= r.budget:
            event.finish = "length"
        if event.finish:
            self._release(r, event)
            return
        r.last = tok
        if call is not None:
            if parse_call(call)[0] == "calculator":  # pure and fast: inline
                self.engine.run_tool(r.state, call)
            else:  # python runs a sandboxed process, search reads an index: the row sits out meanwhile
                r.tool = self._tools.submit(self.engine.run_tool, r.state, call)
        self._emit(r.handle, event)

    def _emit(self, handle, event):
        try:
            handle.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer loses its request, not the batch
            logger.exception("on_event failed; cancelling its request")
            handle.cancel()

    def _release(self, row, event):
        """The row leaves: its slot is free for the next request, its last event is sent."""
        self.rows.remove(row)
        self.cache.reset(row.slot)
        heapq.heappush(self._free, row.slot)
        self._emit(row.handle, event)
