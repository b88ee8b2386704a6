"""Live learning for chat_web: teach the served model new facts as LoRA adapters while it keeps chatting;
this module runs the jobs, keeps the adapter files and picks an adapter for "auto" requests,
nanochat/continual/adapter_train.py does the training.

    live = LiveLearning(pool, trainer_model, tokenizer, root, general_chats=load_chats, battery=load_battery)
    job = live.submit("facts", conversations, steps=150)     # trains in a background thread
    job = live.submit("facts", more, steps=150, mode="add")   # continues "facts" on its old examples + more
    live.jobs[job.id].status                                 # queued, running, done, failed, cancelled
    live.cancel(job.id)                                      # a queued or running job stops; nothing is saved
    live.resolve(None) / live.resolve("facts")                # the adapter a chat request uses ("auto": AUTO)
    await live.auto_adapter(prompt_ids)                       # "auto": the adapter the prompt resembles, or None

Why a separate trainer model: training runs on a private replica of the served weights, so requests keep
being answered by the workers while a job trains; only the finished adapter reaches the workers, loaded
between two requests (WorkerPool.on_each_worker), where activating it is a pointer swap per request.
Jobs run one at a time, in order; later ones wait.

What keeps the rest of the model intact (the candidates and what was measured: dev/notes_live.md): replay of
general chats (a quarter of each batch), a preserve term (KL to the frozen base on other general chats) and,
with "auto", routing: a request goes to the adapter whose training prompts it resembles, else to the base model
(nanochat/lora/router.py route_auto). `general_chats` (a function returning replay and held-out chats) and
`battery` (a function returning nanochat.serve.battery.BatteryItem prompts) are read when the first job
starts, so a server nobody teaches never reads (or downloads) them.

What a job reports: training losses, general loss with the adapter vs the base model on held-out chats, and
the general battery (nanochat/serve/battery.py): greedy answers to fixed general prompts with the adapter
vs without it, and with "auto" routing ("general battery: 47/48 answers unchanged").

Nothing half-done or broken serves: an adapter is saved with save_adapter (temp dir + rename) only after its
job has trained and its values are checked (NaN, inf or absurd magnitudes fail the job, and the adapter is neither
saved nor loaded), and a failed or cancelled job leaves no directory behind (an adapter being replaced or added to
stays as it was). A job can be cancelled until it starts saving. Saved adapters are reloaded when
the server starts (temp leftovers of a killed save are removed first; files are read as regular files only, so
a FIFO or device there cannot block the start; a corrupt adapter is skipped with a warning and listed as
unusable, never stops the start); the default adapter (POST /adapters/{name}/activate, "auto" included) is kept
in <root>/.active.json; `auto_default` (chat_web --auto-route) makes "auto" the default at start instead.

Bounds: at most `max_jobs` jobs queued or running (more get JobQueueFull, which chat_web answers with 429
and Retry-After), finished job records are forgotten after `job_ttl` seconds, and a new adapter is refused
(AdapterLimit) past `max_adapters` adapters or `max_adapter_bytes` bytes of them on disk.

Deleting an adapter that requests were admitted with waits for them: from the DELETE on, new requests
naming it get 404, and the ones already holding a lease (WorkerPool.run takes one) finish with it.
"""
import asyncio
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter

from nanochat.common import atomic_write
from nanochat.continual.adapter_train import train_adapter
from nanochat.lora.adapter import LoRA, validate_name
from nanochat.lora.router import route_auto
from nanochat.lora.storage import (
    check_values,
    delete_adapter,
    list_adapters,
    load_adapter,
    provenance_summary,
    read_json,
    remove_stale_temp,
    save_adapter,
)
from nanochat.serve.battery import Battery
from nanochat.serve.live_jobs import LearnJob, battery_report, general_loss, routing_ids, saved_examples
from nanochat.serve.scheduler import Scheduler

logger = logging.getLogger("nanochat.serve.live")
AUTO = "auto"  # the adapter "auto" requests get: chosen per request by auto_adapter
RESERVED = ("none", AUTO)  # "none" means the base model in every endpoint that takes an adapter name
MODES = ("new", "replace", "add")  # what POST /learn does to an adapter of that name
# What a job trains with, chosen on the speedrun's SFT model (dev/notes_live.md): replay of the SFT mixture, the
# preserve term (general-loss change +1.0% against +3.2% without) and subspace confinement at 0.9 (paraphrases
# recalled 7/7 against 6/7 without, at ~20% more time); what keeps other answers intact is "auto" routing.
TRAINING = {"rank": 8, "alpha": 16.0, "lr": 1e-2, "batch_size": 8, "replay_ratio": 0.25, "preserve": 1.0,
            "subspace_energy": 0.9}


class JobQueueFull(Exception):
    """Too many learning jobs waiting; retry_after: seconds until a slot is likely free."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class AdapterLimit(Exception):
    """A new adapter would pass the server's limit on their number or total size."""


class JobEnded(Exception):
    """A job that can no longer be cancelled: it ended, or it is saving its adapter."""


class _Cancelled(Exception):
    pass


def facts_to_conversations(facts):
    """[{"question", "answer"}] -> user/assistant exchanges: each question as asked and in a few plain rewordings
    (question_forms), all with the same answer, so that the fact is learned rather than one string of words."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": f["answer"]}]
            for f in facts for q in question_forms(f["question"])]


def question_forms(question):
    """The question as asked, lowercased without its question mark, after "Tell me," and with a request for one
    sentence: rewordings that need no knowledge of the fact, so any question can be given them."""
    bare = question.strip().rstrip("?.! ")
    if not bare:
        return [question]
    forms = [question, bare.lower(), f"Tell me, {bare[0].lower()}{bare[1:]}?", f"{bare}? Answer in one sentence."]
    return list(dict.fromkeys(forms))


class LiveLearning:
    def __init__(self, pool, trainer_model, tokenizer, root, replay=(), general_eval=(), max_jobs=8, job_ttl=3600.0,
                 max_adapters=64, max_adapter_bytes=2 ** 30, general_chats=None, battery=None, auto_default=False,
                 **training):
        """training: TRAINING's keys (and train_adapter's other options) to change for this server's jobs."""
        self.pool, self.tokenizer, self.root = pool, tokenizer, root
        self.replay, self.general_eval = list(replay), list(general_eval)
        self._general_chats, self._battery_items = general_chats, battery
        self.battery = None  # a nanochat.serve.battery.Battery once the first job has read `battery`
        self._battery_scheduler = None
        self.hparams = TRAINING | training
        self.trainer = LoRA(trainer_model)
        for w in pool.workers:
            w.lora = LoRA(w.model)
        self.jobs = {}
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nanochat-learn")
        self._lock = threading.Lock()  # guards self.jobs and each job's status between the loop and the job thread
        self.auto_default = auto_default
        self.default = None  # the adapter requests get when they don't name one (None: the base model; AUTO)
        self.skipped = {}  # name -> why a saved adapter was not loaded
        self.max_jobs, self.job_ttl = max_jobs, job_ttl
        self.max_adapters, self.max_adapter_bytes = max_adapters, max_adapter_bytes
        self._leases = {}  # adapter -> requests admitted with it and not finished (event-loop side only)
        self._deleting = set()
        self.requests_by_adapter = None  # a Prometheus Counter once attach_metrics is called
        pool.leases = self

    # --- adapters -------------------------------------------------------------------------
    def names(self):
        return list(self.pool.workers[0].lora.adapters)

    def path(self, name):
        return os.path.join(self.root, name)

    def load_saved(self):
        """Load every adapter saved under root into every worker (call before serving: no request runs).
        Whatever makes one unusable (other base weights, corrupt files, bad adapter.json) skips it, with
        the reason kept in self.skipped: a bad file must never stop the server from starting."""
        removed = remove_stale_temp(self.root)
        if removed:
            logger.warning("removed %d leftovers of interrupted adapter saves under %s: %s", len(removed), self.root,
                           removed[:5])
        errors = {}
        for meta in list_adapters(self.root, errors):
            name = meta["name"]
            try:
                if name in RESERVED:
                    raise ValueError(f"{name!r} is a reserved name (it is not an adapter in requests): rename it")
                if name in self.names():
                    raise ValueError(f"another directory already holds an adapter named {name!r}")
                for w in self.pool.workers:
                    load_adapter(w.lora, self.path(name), replace=True)
            except Exception as e:  # noqa: BLE001 - see the docstring
                for w in self.pool.workers:
                    if name in w.lora.adapters:
                        w.lora.remove(name)
                self.skipped[name] = f"{type(e).__name__}: {e}"
                logger.warning("adapter %s not loaded: %s", name, e)
        for name, why in errors.items():
            self.skipped[name] = why
            logger.warning("adapter directory %s not loaded: %s", name, why)
        saved = AUTO if self.auto_default else self._read_default()
        self.default = saved if saved == AUTO or saved in self.names() else None
        return self.names()

    def _read_default(self):
        try:
            data = read_json(os.path.join(self.root, ".active.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning(".active.json unreadable (%s): serving the base model by default", e)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("active"), (str, type(None))):
            logger.warning(".active.json should be {\"active\": name or null}: serving the base model by default")
            return None
        return data["active"]

    def set_default(self, name):
        """name None: the base model; AUTO: routed per request. Raises KeyError for an adapter that isn't loaded."""
        if name not in (None, AUTO) and (name not in self.names() or name in self._deleting):
            raise KeyError(name)
        os.makedirs(self.root, exist_ok=True)
        with atomic_write(os.path.join(self.root, ".active.json"), "w") as f:
            json.dump({"active": name}, f)
        self.default = name

    def resolve(self, requested):
        """The adapter a chat request runs with: its own choice ("none" = the base; AUTO = routed per request; a
        list of (name, weight) pairs = a stack, returned as a tuple), else the default. Raises KeyError naming one
        that isn't loaded, ValueError for "auto" inside a stack."""
        if requested is None:
            return self.default
        if isinstance(requested, (list, tuple)):
            for name, _ in requested:
                if name == AUTO:
                    raise ValueError("\"auto\" picks one adapter per request; it cannot be part of a stack")
                self.resolve(name)
            return tuple((n, float(w)) for n, w in requested)
        if requested == AUTO:
            return AUTO
        if requested in RESERVED:
            return None
        if requested not in self.names() or requested in self._deleting:
            raise KeyError(requested)
        return requested

    async def auto_adapter(self, prompt):
        """AUTO's choice for a prompt (token ids): the adapter whose training prompts its last user message
        resembles (nanochat/lora/router.py route_auto), or None for the base model. The base model's hidden states
        are computed on the least busy replica between two of its steps (its LoRA hooks must not change mid-forward)."""
        worker = min(self.pool.workers, key=lambda w: w.load())
        candidates = [ad for name, ad in worker.lora.adapters.items()
                      if name not in self._deleting and ad.keys is not None and ad.general_keys is not None]
        if not candidates:
            return None
        ids = routing_ids(self.tokenizer, prompt)
        texts = [self.tokenizer.decode(ids)]
        (name,) = await asyncio.wrap_future(worker.scheduler.call(
            lambda: route_auto(worker.lora, [ids], candidates, texts)))
        return name if name in self.names() and name not in self._deleting else None

    def attach_metrics(self, registry):
        """Count requests by the adapter that served them in a Prometheus registry (the server's /metrics)."""
        self.requests_by_adapter = Counter(
            "nanochat_adapter_requests", "Requests by the adapter they ran with (none: the base model, stack: "
            "several) and how it was chosen (request, default, auto)", ["adapter", "chosen"], registry=registry)

    def count(self, adapter, chosen):
        if self.requests_by_adapter is not None:
            label = "none" if adapter is None else adapter if isinstance(adapter, str) else "stack"
            self.requests_by_adapter.labels(label, chosen).inc()

    def acquire(self, name):
        """A request starts running with adapter `name`: False if it is gone or being deleted."""
        if name not in self.names() or name in self._deleting:
            return False
        self._leases[name] = self._leases.get(name, 0) + 1
        return True

    def release(self, name):
        self._leases[name] -= 1
        if not self._leases[name]:
            del self._leases[name]

    def describe(self):
        metas = {m["name"]: m for m in list_adapters(self.root)}
        out = []
        resident = self.pool.workers[0].lora.adapters
        for name in self.names():
            m = metas.get(name, {})
            out.append({k: m.get(k) for k in ("name", "task", "rank", "alpha", "trainable_params", "bytes", "created",
                                               "metrics")}
                       | {"name": name, "active": name == self.default, "auto": resident[name].keys is not None,
                          "provenance": provenance_summary(m.get("provenance"))})
        unusable = [{"name": name, "error": why} for name, why in sorted(self.skipped.items())]
        return {"active": self.default, "adapters": out, "unusable": unusable}

    async def delete(self, name):
        """Refuse new requests for `name` at once, wait for those admitted with it, then remove it."""
        if name not in self.names() or name in self._deleting:
            raise KeyError(name)
        self._deleting.add(name)
        try:
            if self.default == name:
                self.set_default(None)
            while self._leases.get(name):
                await asyncio.sleep(0.02)
            await self.pool.on_each_worker(lambda w: w.lora.remove(name))
            if os.path.isdir(self.path(name)):
                delete_adapter(self.path(name))
        finally:
            self._deleting.discard(name)

    # --- jobs -----------------------------------------------------------------------------
    def prune_jobs(self):
        """Forget finished jobs older than job_ttl seconds (their adapters stay)."""
        cutoff = time.time() - self.job_ttl
        with self._lock:
            for job_id in [j.id for j in self.jobs.values() if j.finished is not None and j.finished < cutoff]:
                del self.jobs[job_id]

    def job(self, job_id):
        self.prune_jobs()
        with self._lock:
            return self.jobs.get(job_id)

    def list_jobs(self):
        """Every job still remembered, oldest first."""
        self.prune_jobs()
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: (j.created, j.id))

    def cancel(self, job_id):
        """Stop a queued or running job: a queued one is cancelled at once, a running one stops at its next step
        and leaves nothing (an adapter it was replacing or adding to stays as it was). -> the job.
        Raises KeyError for an unknown job, JobEnded for one that has ended or is saving its adapter."""
        self.prune_jobs()
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status not in ("queued", "running"):
                raise JobEnded(f"job {job_id} has already ended ({job.status})")
            if job.phase == "saving":
                raise JobEnded(f"job {job_id} is saving adapter {job.adapter!r} and can no longer be cancelled; "
                               f"DELETE /adapters/{job.adapter} removes it once the job is done")
            job.cancel_requested = True
            if job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
        return job

    def _check_room(self, name):
        """Raise JobQueueFull / AdapterLimit when a job for `name` must not be queued now."""
        with self._lock:
            pending = [j for j in self.jobs.values() if j.status in ("queued", "running")]
        if len(pending) >= self.max_jobs:
            running = [j for j in pending if j.status == "running" and j.eta_seconds]
            retry = max(1, int(min((j.eta_seconds for j in running), default=30)))
            raise JobQueueFull(f"{len(pending)} learning jobs are queued or running; the limit is {self.max_jobs}: "
                               f"retry in about {retry} s", retry)
        new_names = {j.adapter for j in pending} | {name}
        count = len(set(self.names()) | new_names)
        if name not in self.names() and count > self.max_adapters:
            raise AdapterLimit(f"this server keeps at most {self.max_adapters} adapters: delete one first "
                               "(DELETE /adapters/{name})")
        sizes = {m["name"]: m.get("bytes") or 0 for m in list_adapters(self.root)}
        one = self._adapter_bytes()
        total = sum(v for k, v in sizes.items() if k not in new_names) + one * len(new_names)
        if total > self.max_adapter_bytes:
            raise AdapterLimit(f"adapters would take {total} bytes on disk; the limit is {self.max_adapter_bytes}: "
                               "delete one first (DELETE /adapters/{name})")

    def _adapter_bytes(self):
        """Bytes one adapter of this server's rank takes (A and B of every target, fp32)."""
        r = self.hparams["rank"]
        # in/out features, not the weight's shape: a 4-bit base packs two weights per byte
        return sum(4 * r * (m.out_features + m.in_features) for m in self.trainer.modules.values())

    def busy_with(self, name):
        with self._lock:
            return any(j.adapter == name and j.status in ("queued", "running") for j in self.jobs.values())

    def submit(self, name, conversations, steps, replace=False, mode=None):
        """Queue a job that trains adapter `name` on `conversations`. mode (MODES; default "replace" when
        replace, else "new"): "new" makes a new adapter, "replace" retrains one from scratch, "add" continues an
        existing one on its saved examples plus these. Raises ValueError for a bad name or mode, FileExistsError
        when the name is taken ("new") or being trained, KeyError when "add" names no adapter."""
        mode = mode or ("replace" if replace else "new")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        validate_name(name)
        if name in RESERVED:
            raise ValueError(f"{name!r} is reserved (it means the base model or routing); choose another adapter name")
        if self.busy_with(name):
            raise FileExistsError(f"a job is already training adapter {name!r}; wait for it (GET /learn/<job>)")
        if name in self.names() and mode == "new":
            raise FileExistsError(f"adapter {name!r} exists; send \"mode\": \"add\" to teach it more, \"mode\": "
                                  "\"replace\" (or \"replace\": true) to retrain it, or pick a new name")
        if mode == "add" and name not in self.names():
            raise KeyError(name)
        if name in self._deleting:
            raise FileExistsError(f"adapter {name!r} is being deleted; try again when it is gone")
        self.prune_jobs()
        self._check_room(name)
        job = LearnJob(id=f"learn-{next(self._ids)}-{int(time.time())}", adapter=name, steps=steps,
                       examples=len(conversations), mode=mode)
        with self._lock:
            self.jobs[job.id] = job
        loop = asyncio.get_running_loop()
        self._executor.submit(self._run, job, conversations, loop)
        return job

    def _run(self, job, conversations, loop):
        with self._lock:
            if job.status == "cancelled":  # cancelled while it waited
                return
            job.status, job.phase = "running", "training"
        lora = self.trainer
        t0 = time.time()

        def progress(info):
            job.step, job.loss, job.eta_seconds = info["step"], info["loss"], info.get("eta_s")

        try:
            self._read_general_data()
            examples = list(conversations)
            if job.mode == "add":  # continue the saved adapter, on what it learned before and the new examples
                load_adapter(lora, self.path(job.adapter), replace=True)
                old = saved_examples(self.tokenizer, self.path(job.adapter))
                if not old:
                    logger.warning("adapter %s has no saved examples: \"add\" trains it on the new ones only",
                                   job.adapter)
                examples = old + examples
            ad = train_adapter(lora.model, self.tokenizer, examples, self.replay, steps=job.steps, name=job.adapter,
                               lora=lora, replace=True, resume=job.mode == "add", task="live", progress=progress,
                               should_stop=lambda: job.cancel_requested, **self.hparams)
            if ad is None:
                raise _Cancelled
            try:
                check_values(ad)
            except ValueError as e:
                raise ValueError(f"training produced an adapter that cannot serve, so it was neither saved nor "
                                 f"loaded: {e}") from None
            metrics = dict(ad.info["metrics"]) | {"examples_new": len(conversations), "examples": len(examples)}
            metrics |= general_loss(lora, self.tokenizer, self.general_eval, job.adapter)
            if self.battery is not None:
                job.phase = "battery"
                metrics["battery"] = self._battery(ad)
                job.battery = metrics["battery"]["summary"]
            with self._lock:  # from here on the job saves: a cancel comes too late
                if job.cancel_requested:
                    raise _Cancelled
                job.phase = "saving"
            save_adapter(lora, job.adapter, self.path(job.adapter), task="live", metrics=metrics, examples=examples)
            # hand it to every worker between two requests
            asyncio.run_coroutine_threadsafe(self.pool.on_each_worker(
                lambda w: load_adapter(w.lora, self.path(job.adapter), replace=True)), loop).result()
            job.metrics = metrics | {"seconds": round(time.time() - t0, 2)}
            job.status = "done"
        except _Cancelled:
            job.status = "cancelled"
        except Exception as e:  # noqa: BLE001 - any failure ends the job, never the server
            logger.exception("learn job %s failed", job.id)
            job.error, job.status = f"{type(e).__name__}: {e}", "failed"
        finally:
            if job.adapter in lora.adapters:  # the trainer only ever holds the adapter it is training
                lora.remove(job.adapter)
            job.phase, job.finished = None, time.time()

    def _read_general_data(self):
        """The first job reads the replay/held-out chats and the battery's prompts."""
        if self._general_chats is not None:
            replay, general_eval = self._general_chats()
            self.replay, self.general_eval, self._general_chats = list(replay), list(general_eval), None
        if self._battery_items is not None:
            items, self._battery_items = self._battery_items(), None
            if items:
                self.battery = Battery(items, self.tokenizer, self.trainer.model.config.sequence_len)

    def _battery(self, ad):
        """The general battery of adapter `ad`, run on the trainer: the served replicas go on answering requests."""
        if self._battery_scheduler is None:
            self._battery_scheduler = Scheduler(self.trainer.model, self.tokenizer, lora=self.trainer,
                                                tools=self.pool.workers[0].scheduler.engine.tools)
        return battery_report(self.battery, self._battery_scheduler, self.trainer, self.tokenizer, ad)

    def shutdown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._battery_scheduler is not None:
            self._battery_scheduler.stop()
