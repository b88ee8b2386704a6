"""Live learning for chat_web: teach the served model new facts as LoRA adapters while it keeps chatting;
this module runs the jobs and keeps the adapter files, nanochat/continual/adapter_train.py does the training.

    live = LiveLearning(pool, trainer_model, tokenizer, root, general_chats=load_chats)
    job = live.submit("facts", conversations, steps=150)     # trains in a background thread
    live.jobs[job.id].status                                 # queued, running, done, failed
    live.resolve(None) / live.resolve("facts")                # the adapter a chat request uses

Why a separate trainer model: training runs on a private replica of the served weights, so requests keep
being answered by the workers while a job trains; only the finished adapter reaches the workers, loaded
between two requests (WorkerPool.on_each_worker), where activating it is a pointer swap per request.
Jobs run one at a time, in order; later ones wait.

Why replay: a LoRA trained on five facts alone also learns "every answer is one of these five facts".
Each batch mixes in general chat conversations (`replay`, a quarter of the rows), and a few held-out
ones (`general_eval`) measure what the adapter costs: general loss with the adapter vs the base model is
in the job's metrics and in adapter.json. Given as `general_chats` (a function returning both lists), they
are read when the first job starts, so a server nobody teaches never reads (or downloads) them.

Nothing half-done or broken serves: an adapter is saved with save_adapter (temp dir + rename) only after its
job has trained and its values are checked (NaN, inf or absurd magnitudes fail the job, and the adapter is neither
saved nor loaded), and a failed or cancelled job leaves no directory behind. Saved adapters are reloaded when
the server starts (temp leftovers of a killed save are removed first; files are read as regular files only, so
a FIFO or device there cannot block the start; a corrupt adapter is skipped with a warning and listed as
unusable, never stops the start); the default adapter (POST /adapters/{name}/activate) is kept in
<root>/.active.json.

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
from dataclasses import asdict, dataclass, field

from nanochat.common import atomic_write
from nanochat.lora.adapter import LoRA, validate_name
from nanochat.lora.storage import (check_values, delete_adapter, list_adapters, load_adapter, provenance_summary,
                                   read_json, remove_stale_temp, save_adapter)
from nanochat.continual.adapter_train import mean_loss, train_adapter

logger = logging.getLogger("nanochat.serve.live")
RESERVED = ("none",)  # "none" means the base model in every endpoint that takes an adapter name


class JobQueueFull(Exception):
    """Too many learning jobs waiting; retry_after: seconds until a slot is likely free."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class AdapterLimit(Exception):
    """A new adapter would pass the server's limit on their number or total size."""


def facts_to_conversations(facts):
    """[{"question", "answer"}] -> one user/assistant exchange each."""
    return [[{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["answer"]}] for f in facts]


@dataclass
class LearnJob:
    id: str
    adapter: str
    steps: int
    examples: int
    status: str = "queued"  # queued -> running -> done | failed
    step: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self):
        return asdict(self)


class LiveLearning:
    def __init__(self, pool, trainer_model, tokenizer, root, replay=(), general_eval=(), rank=8, alpha=16.0,
                 lr=1e-2, batch_size=8, max_jobs=8, job_ttl=3600.0, max_adapters=64, max_adapter_bytes=2 ** 30,
                 general_chats=None):
        self.pool, self.tokenizer, self.root = pool, tokenizer, root
        self.replay, self.general_eval = list(replay), list(general_eval)
        self._general_chats = general_chats
        self.hparams = {"rank": rank, "alpha": alpha, "lr": lr, "batch_size": batch_size}
        self.trainer = LoRA(trainer_model)
        for w in pool.workers:
            w.lora = LoRA(w.model)
        self.base_hash = self.trainer.base_hash
        self.jobs = {}
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nanochat-learn")
        self._lock = threading.Lock()  # guards self.jobs between the loop and the job thread
        self.default = None  # the adapter requests get when they don't name one (None: the base model)
        self.skipped = {}  # name -> why a saved adapter was not loaded
        self.max_jobs, self.job_ttl = max_jobs, job_ttl
        self.max_adapters, self.max_adapter_bytes = max_adapters, max_adapter_bytes
        self._leases = {}  # adapter -> requests admitted with it and not finished (event-loop side only)
        self._deleting = set()
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
        saved = self._read_default()
        self.default = saved if saved in self.names() else None
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
        """name None: the base model. Raises KeyError for an adapter that isn't loaded."""
        if name is not None and (name not in self.names() or name in self._deleting):
            raise KeyError(name)
        os.makedirs(self.root, exist_ok=True)
        with atomic_write(os.path.join(self.root, ".active.json"), "w") as f:
            json.dump({"active": name}, f)
        self.default = name

    def resolve(self, requested):
        """The adapter a chat request runs with: its own choice ("none" = the base; a list of (name, weight)
        pairs = a stack, returned as a tuple), else the default. Raises KeyError naming one that isn't loaded."""
        if requested is None:
            return self.default
        if isinstance(requested, (list, tuple)):
            for name, _ in requested:
                self.resolve(name)
            return tuple((n, float(w)) for n, w in requested)
        if requested in RESERVED:
            return None
        if requested not in self.names() or requested in self._deleting:
            raise KeyError(requested)
        return requested

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
        for name in self.names():
            m = metas.get(name, {})
            out.append({k: m.get(k) for k in ("name", "task", "rank", "alpha", "trainable_params", "bytes", "created",
                                               "metrics")}
                       | {"name": name, "active": name == self.default,
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

    def submit(self, name, conversations, steps, replace=False):
        """Queue a job that trains adapter `name` on `conversations`. Raises ValueError for a bad name and
        FileExistsError when the name is taken (without replace) or being trained."""
        validate_name(name)
        if name in RESERVED:
            raise ValueError(f"{name!r} is reserved (it means the base model); choose another adapter name")
        if self.busy_with(name):
            raise FileExistsError(f"a job is already training adapter {name!r}; wait for it (GET /learn/<job>)")
        if name in self.names() and not replace:
            raise FileExistsError(f"adapter {name!r} exists; send \"replace\": true to retrain it, or pick a new name")
        if name in self._deleting:
            raise FileExistsError(f"adapter {name!r} is being deleted; try again when it is gone")
        self.prune_jobs()
        self._check_room(name)
        job = LearnJob(id=f"learn-{next(self._ids)}-{int(time.time())}", adapter=name, steps=steps,
                       examples=len(conversations))
        with self._lock:
            self.jobs[job.id] = job
        loop = asyncio.get_running_loop()
        self._executor.submit(self._run, job, conversations, loop)
        return job

    def _run(self, job, conversations, loop):
        job.status = "running"
        lora = self.trainer
        t0 = time.time()

        def progress(info):
            job.step, job.loss, job.eta_seconds = info["step"], info["loss"], info.get("eta_s")

        try:
            if self._general_chats is not None:  # first job: read the replay/held-out chats now
                replay, general_eval = self._general_chats()
                self.replay, self.general_eval, self._general_chats = list(replay), list(general_eval), None
            ad = train_adapter(lora.model, self.tokenizer, conversations, self.replay, steps=job.steps, name=job.adapter,
                               lora=lora, replace=True, task="live", progress=progress, **self.hparams)
            try:
                check_values(ad)
            except ValueError as e:
                raise ValueError(f"training produced an adapter that cannot serve, so it was neither saved nor "
                                 f"loaded: {e}") from None
            metrics = dict(ad.info["metrics"])
            if self.general_eval:
                model = lora.model
                rows = [self.tokenizer.render_conversation(c, max_tokens=model.config.sequence_len + 1)
                        for c in self.general_eval]
                pad = self.tokenizer.get_bos_token_id()
                base = mean_loss(model, rows, pad)  # nothing is active on the trainer between jobs
                lora.activate(job.adapter)
                try:
                    adapted = mean_loss(model, rows, pad)
                finally:
                    lora.activate(None)
                metrics |= {"general_loss_base": base, "general_loss_adapter": adapted,
                            "general_loss_change": (adapted - base) / base}
            save_adapter(lora, job.adapter, self.path(job.adapter), task="live", metrics=metrics)
            lora.remove(job.adapter)  # the trainer only ever holds the adapter it is training
            # hand it to every worker between two requests
            asyncio.run_coroutine_threadsafe(self.pool.on_each_worker(
                lambda w: load_adapter(w.lora, self.path(job.adapter), replace=True)), loop).result()
            job.metrics = metrics | {"seconds": round(time.time() - t0, 2)}
            job.status = "done"
        except Exception as e:  # noqa: BLE001 - any failure ends the job, never the server
            logger.exception("learn job %s failed", job.id)
            if job.adapter in lora.adapters:
                lora.remove(job.adapter)
            job.error, job.status = f"{type(e).__name__}: {e}", "failed"
        finally:
            job.finished = time.time()

    def shutdown(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
