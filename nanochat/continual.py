"""Continual learning: one training loop, five strategies, and the metrics.

A sequence of tasks (tasks/continual.py) is learned one task at a time. After task i every task j is
evaluated, giving R[i][j]; base[j] is the starting model's score on task j.

Strategies:
  naive   full fine-tuning on each task in turn: the forgetting baseline.
  replay  a fixed-size reservoir buffer of earlier tasks' training rows (uniform over everything seen)
          supplies `replay_ratio` of every batch.
  ewc     elastic weight consolidation: after each task the diagonal empirical Fisher (mean squared
          per-row gradient) is added up and the weights anchored; the loss gets
          (lambda / 2) * sum F (theta - theta*)^2.
  lora    a new LoRA adapter per task on the frozen base (nanochat/lora.py). With the task id known at
          evaluation, task j is scored with adapter j (the base model for tasks not learned yet), so
          earlier tasks cannot change: zero forgetting by construction. A second matrix, "lora-router",
          scores every item with the adapter a router picks without the task id: the nearest centroid
          (cosine) of base-model hidden states; centroids are the mean over each task's training rows
          (lm: the first `route_prefix` tokens of a row; chat: the prompt).
  ssr     self-synthesized rehearsal: before task i, the model (as it is then) continues short prompts
          of each earlier task (a few prompt tokens per task are all that is kept) by sampling, and
          these pseudo-samples supply `replay_ratio` of every batch instead of stored data.

All full fine-tuning strategies use the same AdamW settings and data order; lora trains only its
adapter (AdamW, its own learning rate).

Metrics and their signs. The metric is bits per byte for language-modelling sequences (lower is
better) and accuracy for chat sequences (higher is better). All numbers are in the metric's own
units, oriented so that the same sign means the same thing for both kinds (s = +1 for accuracy,
-1 for bpb; T tasks):
  ACC          mean_j R[T-1][j]                        final metric averaged over tasks (raw units:
                                                       for bpb, lower is better)
  LA           mean_i R[i][i]                          metric on each task right after learning it
                                                       (plasticity; "new-task performance")
  BWT          s * mean_{j<T-1} (R[T-1][j] - R[j][j])  < 0: earlier tasks got worse (forgetting)
  FWT          s * mean_{j>0} (R[j-1][j] - base[j])    > 0: earlier tasks helped a task not yet seen
  forgetting_j s * (best_{j<=l<T-1} R[l][j] - R[T-1][j])  > 0: task j lost that much from its best
                                                       (for bpb: the increase in bpb)
  forgetting   mean_{j<T-1} forgetting_j
Added parameters/bytes: what a strategy keeps beyond the model: lora adapters (parameters), the
replay buffer (token ids as int32), EWC's Fisher and anchor (fp32), SSR's prompts (int32).

Entry points: run_strategy (one strategy over a sequence, used by scripts/continual_train.py),
train_loop (the loop itself), continual_metrics, and train_adapter (live learning: one LoRA adapter
from a few conversations, with replay, a progress callback and cancellation).
"""
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from nanochat.common import autocast, format_eta, print0, resolve_dtype
from nanochat.training import collate

STRATEGIES = ("naive", "replay", "ewc", "lora", "ssr")


@dataclass
class ContinualConfig:
    steps: int = 40  # optimizer steps per task
    batch_size: int = 4  # rows per step (all strategies; rehearsal rows are part of it)
    lr: float = 3e-4  # AdamW, full fine-tuning
    warmup_steps: int = 5
    final_lr_frac: float = 0.1  # linear decay to this fraction at the end of each task
    grad_clip: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 1e-2
    replay_size: int = 128  # reservoir capacity, rows
    replay_ratio: float = 0.5  # fraction of each batch taken from the buffer / pseudo-samples
    ewc_lambda: float = 1e5
    ewc_samples: int = 32  # rows for the Fisher estimate
    ssr_samples: int = 128  # pseudo-samples generated before each task, split over earlier tasks
    ssr_prompts: int = 4  # prompts kept per task
    ssr_prompt_tokens: int = 8
    ssr_len: int = 128  # pseudo-sample length in tokens (prompt included); sampling cost grows with it
    ssr_temperature: float = 1.0
    ssr_top_k: int = 0  # 0: sample from the full distribution (rehearses what the model knows)
    router: bool = True  # lora: also score with the centroid router (task id unknown)
    router_rows: int = 64  # training rows per task for its centroid
    seed: int = 0
    log_every: int = 10


def autocast_for(device):
    """bf16 autocast on CUDA where supported (as the training stages do), plain fp32 elsewhere."""
    device_type = torch.device(device).type
    return lambda: autocast(resolve_dtype("auto", device_type), device_type)


# ---------------------------------------------------------------------------------------------
# metrics

def continual_metrics(R, base, higher_is_better):
    """ACC, LA, BWT, FWT, forgetting per task and their mean, from R[i][j] and base[j] (module docstring)."""
    T = len(R)
    s = 1.0 if higher_is_better else -1.0
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    forgetting = [max(s * R[l][j] for l in range(j, T - 1)) - s * R[T - 1][j] for j in range(T - 1)]
    return {
        "ACC": mean(R[T - 1]),
        "LA": mean([R[i][i] for i in range(T)]),
        "BWT": mean([s * (R[T - 1][j] - R[j][j]) for j in range(T - 1)]),
        "FWT": mean([s * (R[j - 1][j] - base[j]) for j in range(1, T)]),
        "forgetting_per_task": forgetting,
        "forgetting": mean(forgetting),
    }


# ---------------------------------------------------------------------------------------------
# rehearsal buffer

class ReservoirBuffer:
    """Keeps a uniform random sample of at most `capacity` of all items ever offered (Algorithm R)."""

    def __init__(self, capacity, seed=0):
        self.capacity = capacity
        self.items = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, item):
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            k = self.rng.randrange(self.seen)
            if k < self.capacity:
                self.items[k] = item

    def sample(self, k, rng):
        return [self.items[rng.randrange(len(self.items))] for _ in range(k)] if self.items else []

    def __len__(self):
        return len(self.items)

    def num_tokens(self):
        return sum(len(ids) for ids, _ in self.items)


# ---------------------------------------------------------------------------------------------
# the training loop

def train_loop(model, params, rows, steps, batch_size, lr, pad_id, *, rehearsal=None, rehearsal_ratio=0.0,
               penalty=None, warmup_steps=5, final_lr_frac=0.1, grad_clip=1.0, seed=0, autocast_ctx=nullcontext,
               progress=None, log_every=10, label="", should_stop=None, on_batch=None):
    """Train `params` on `rows` ((ids, mask) pairs) for `steps` AdamW steps of `batch_size` rows.

    rehearsal(k, rng) -> k extra rows (replay / pseudo-samples) that replace round(ratio * batch_size)
    rows of each batch once it returns any; penalty() -> a scalar added to the loss (EWC).
    progress(info) is called every log_every steps and at the end with step, steps, loss, tok_per_sec,
    elapsed_s, eta_s, label (default: a printed line). on_batch(rows) sees the task rows of each step.
    should_stop() -> True ends training early. Returns {"loss", "steps", "tokens", "seconds"}."""
    if not rows:
        raise ValueError(f"{label}nothing to train on (no rows)")
    device = model.get_device()
    rng = random.Random(seed)
    order = []
    n_extra = round(rehearsal_ratio * batch_size) if rehearsal else 0
    n_extra = min(n_extra, batch_size - 1)  # always some rows of the task being learned
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t_start = time.time()
    tokens, smooth, done = 0, None, 0
    for step in range(steps):
        if should_stop is not None and should_stop():
            break
        t0 = time.time()
        extra = rehearsal(n_extra, rng) if n_extra else []
        batch = []
        while len(batch) < batch_size - len(extra):
            if not order:  # a fresh shuffle per epoch over the task's rows
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch.append(rows[order.pop()])
        if on_batch is not None:
            on_batch(batch)
        x, y = collate(batch + extra, pad_id, device)
        with autocast_ctx():
            loss = model(x, y)
        total = loss + penalty() if penalty is not None else loss
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        # linear warmup, then linear decay to final_lr_frac
        lrm = min(1.0, (step + 1) / max(1, warmup_steps))
        lrm *= 1.0 - (1.0 - final_lr_frac) * step / max(1, steps - 1)
        for g in opt.param_groups:
            g["lr"] = lr * lrm
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        dt = time.time() - t0
        n_tok = int((y >= 0).sum().item())
        tokens += n_tok
        done = step + 1
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
        if done % log_every == 0 or done == steps:
            elapsed = time.time() - t_start
            info = {"label": label, "step": done, "steps": steps, "loss": smooth, "tok_per_sec": n_tok / dt,
                    "elapsed_s": elapsed, "eta_s": elapsed / done * (steps - done), "lrm": lrm}
            if progress is not None:
                progress(info)
            else:
                print0(f"{label}step {done:04d}/{steps:04d} | loss {smooth:.4f} | lrm {lrm:.2f} | "
                       f"tok/s {info['tok_per_sec']:,.0f} | eta {format_eta(info['eta_s'])}")
    return {"loss": smooth, "steps": done, "tokens": tokens, "seconds": time.time() - t_start}


# ---------------------------------------------------------------------------------------------
# sampling pseudo-samples

@torch.no_grad()
def sample_continuations(model, prompts, row_len, temperature=1.0, top_k=0, seed=0, stop_ids=(), batch_size=128):
    """Continue every prompt by sampling until it is row_len tokens long, a stop token appears (not
    included) or the model's context is full. Prompts of equal length are decoded together with one KV
    cache, which on a CPU is many times faster than one Engine call per prompt; there is no tool use
    (a pseudo-sample's tool outputs are masked out of the loss anyway). -> one token list per prompt."""
    from nanochat.engine import sample_next_token
    from nanochat.gpt import KVCache
    device = model.get_device()
    c = model.config
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [None] * len(prompts)
    by_len = {}
    for n, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(n)
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    for L, members in sorted(by_len.items()):
        budget = min(row_len, c.sequence_len) - L
        for b in range(0, len(members), batch_size):
            idx = members[b:b + batch_size]
            if budget <= 0:
                for n in idx:
                    out[n] = []
                continue
            cache = KVCache(len(idx), c.n_kv_head, L + budget, c.n_embd // c.n_head, c.n_layer)
            logits = model(torch.tensor([prompts[n] for n in idx], dtype=torch.long, device=device), kv_cache=cache)[:, -1]
            cols, done = [], torch.zeros(len(idx), dtype=torch.bool, device=device)
            for step in range(budget):
                nxt = sample_next_token(logits, gen, temperature, top_k or None)
                cols.append(nxt)
                done |= torch.isin(nxt, stop)
                if bool(done.all()) or step == budget - 1:
                    break
                logits = model(nxt[:, None], kv_cache=cache)[:, -1]
            toks = torch.stack(cols, 1).tolist()
            for n, row in zip(idx, toks):
                cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
                out[n] = row[:cut]
    return out


# ---------------------------------------------------------------------------------------------
# strategies

class Strategy:
    """naive: full fine-tuning. Subclasses change what is trained, add rehearsal rows or a penalty,
    and hook in before/after each task."""
    name = "naive"

    def __init__(self, model, tokenizer, cfg, tasks):
        self.model, self.tokenizer, self.cfg, self.tasks = model, tokenizer, cfg, tasks
        self.autocast_ctx = nullcontext  # run_strategy sets the device's

    def params(self, i):
        return [p for p in self.model.parameters() if p.requires_grad]

    def lr(self):
        return self.cfg.lr

    def before_task(self, i, task):
        pass

    def after_task(self, i, task):
        pass

    def rehearsal(self):
        """A function (k, rng) -> k rows, or None."""
        return None

    def penalty(self):
        return None

    def on_batch(self, rows):
        pass

    def task_done(self, i, rows):
        """Called after task i was learned and evaluated (rows: its R rows)."""

    def evaluate(self, tasks, i):
        """{matrix name: row of scores} after learning task i."""
        self.model.eval()
        row = [t.evaluate(self.model) for t in tasks]
        self.model.train()
        return {self.name: row}

    def added(self):
        """(added parameters, added bytes) kept beyond the model."""
        return 0, 0

    def extra(self):
        """Strategy-specific results to keep (JSON-able)."""
        return {}

    def close(self):
        pass


class Replay(Strategy):
    name = "replay"

    def __init__(self, model, tokenizer, cfg, tasks):
        super().__init__(model, tokenizer, cfg, tasks)
        self.buffer = ReservoirBuffer(cfg.replay_size, seed=cfg.seed)
        self.seen_rows = []

    def on_batch(self, rows):
        self.seen_rows.extend(rows)

    def after_task(self, i, task):
        # the rows this task was trained on stream through the reservoir once the task is done,
        # so the buffer only ever holds earlier tasks (uniformly over everything seen)
        for row in self.seen_rows:
            self.buffer.add(row)
        self.seen_rows = []

    def rehearsal(self):
        return self.buffer.sample if len(self.buffer) else None

    def added(self):
        return 0, 4 * self.buffer.num_tokens()


class EWC(Strategy):
    name = "ewc"

    def __init__(self, model, tokenizer, cfg, tasks):
        super().__init__(model, tokenizer, cfg, tasks)
        self.fisher = None
        self.anchor = None

    def after_task(self, i, task):
        if i == len(self.tasks) - 1:
            return  # nothing follows the last task: its Fisher would never be used
        params = [p for p in self.model.parameters() if p.requires_grad]
        rng = random.Random(self.cfg.seed + 7 * i)
        rows = rng.sample(task.train_rows, min(self.cfg.ewc_samples, len(task.train_rows)))
        fisher = [torch.zeros_like(p) for p in params]
        device, pad = self.model.get_device(), self.tokenizer.get_bos_token_id()
        for row in rows:  # one row at a time: the empirical Fisher is a mean of squared per-example gradients
            x, y = collate([row], pad, device)
            with self.autocast_ctx():
                loss = self.model(x, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float() ** 2
        for f in fisher:
            f /= len(rows)
        # online EWC with no decay: one penalty on the summed Fisher, anchored at the latest weights
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p in params]

    def penalty(self):
        if self.fisher is None:
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        lam = self.cfg.ewc_lambda

        def fn():
            return 0.5 * lam * sum((f * (p - a).float() ** 2).sum() for f, p, a in zip(self.fisher, params, self.anchor))
        return fn

    def added(self):
        if self.fisher is None:
            return 0, 0
        return 0, sum(f.numel() * 4 + a.numel() * 4 for f, a in zip(self.fisher, self.anchor))


class LoRAStrategy(Strategy):
    name = "lora"

    def __init__(self, model, tokenizer, cfg, tasks):
        super().__init__(model, tokenizer, cfg, tasks)
        from nanochat.lora import LoRA
        self.lora = LoRA(model)
        self.names = []  # adapter of task i
        self.adapter_dir = None
        self.router_accuracy = []  # per evaluation: fraction of task j's items routed to adapter j

    def params(self, i):
        return self.lora.trainable_parameters(self.names[i])

    def lr(self):
        return self.cfg.lora_lr

    def before_task(self, i, task):
        name = f"task{i}-{task.name}"
        ad = self.lora.add(name, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, seed=self.cfg.seed + i,
                           info={"task": task.name})
        self.names.append(name)
        self.lora.activate(name)
        print0(f"lora: adapter {name}: {ad.num_params():,} trainable parameters, {ad.num_bytes():,} bytes")

    def after_task(self, i, task):
        if self.cfg.router:
            rows = task.train_rows[:self.cfg.router_rows]
            self.lora.set_centroid(self.names[i], [task.route_ids_of_row(r) for r in rows])
        self.lora.activate(None)

    def evaluate(self, tasks, i):
        self.model.eval()
        by_id = []
        for j, t in enumerate(tasks):  # task id known: adapter j, or the base model for tasks not seen yet
            self.lora.activate(self.names[j] if j <= i else None)
            by_id.append(t.evaluate(self.model))
        out = {"lora": by_id}
        if self.cfg.router:
            routed, hits = [], []
            for j, t in enumerate(tasks):
                picks = self.lora.route([t.route_ids(item) for item in t.eval_items], candidates=self.names[:i + 1])
                hits.append(sum(p == self.names[j] for p in picks) / len(picks) if j <= i else None)
                num = den = 0
                for name in sorted(set(picks)):
                    self.lora.activate(name)
                    n, d = t.score(self.model, [it for it, p in zip(t.eval_items, picks) if p == name])
                    num, den = num + n, den + d
                routed.append(num / den if den else float("nan"))
            out["lora-router"] = routed
            self.router_accuracy.append(hits)
        self.lora.activate(None)
        self.model.train()
        return out

    def task_done(self, i, rows):
        if self.adapter_dir:  # keep each task's adapter, with what it scored, in the standard format
            from nanochat.lora import save_adapter
            task = self.tasks[i]
            save_adapter(self.lora, self.names[i], os.path.join(self.adapter_dir, self.names[i]), task=task.name,
                         metrics={task.metric: rows["lora"][i]})

    def added(self):
        ads = [self.lora.adapters[n] for n in self.names]
        return sum(a.num_params() for a in ads), sum(a.num_bytes() for a in ads)

    def extra(self):
        return {"router_accuracy": self.router_accuracy} if self.router_accuracy else {}

    def close(self):
        self.lora.close()


class SSR(Strategy):
    name = "ssr"

    def __init__(self, model, tokenizer, cfg, tasks):
        super().__init__(model, tokenizer, cfg, tasks)
        self.prompts = {}  # task index -> short prompts (all that is kept of a task's data)
        self.pool = []
        # never longer than the tasks' own rows (nor than the model's context: see sample_continuations)
        self.row_len = min(cfg.ssr_len, max(len(ids) for t in tasks for ids, _ in t.train_rows))

    def before_task(self, i, task):
        self.pool = []
        if i == 0:
            return
        t0 = time.time()
        per_task = max(1, self.cfg.ssr_samples // i)
        prompts, owners = [], []
        for j in range(i):  # every earlier task gets an equal share, spread over its prompts
            ps = self.prompts[j]
            for k in range(per_task):
                prompts.append(ps[k % len(ps)])
                owners.append(j)
        stops = {self.tokenizer.get_bos_token_id(), self.tokenizer.encode_special("<|assistant_end|>")}
        self.model.eval()
        with self.autocast_ctx():
            generated = sample_continuations(self.model, prompts, self.row_len, self.cfg.ssr_temperature,
                                             self.cfg.ssr_top_k, seed=self.cfg.seed + 1000 * i, stop_ids=stops)
        self.model.train()
        for j, prompt, gen in zip(owners, prompts, generated):
            row = self.tasks[j].pseudo_row(prompt, gen)
            if row is not None:
                self.pool.append(row)
        print0(f"ssr: {len(self.pool)} pseudo-samples of {i} earlier task(s) "
               f"({sum(len(r[0]) for r in self.pool):,} tokens) in {time.time() - t0:.1f}s")

    def after_task(self, i, task):
        self.prompts[i] = task.prompts(self.cfg.ssr_prompts, self.cfg.ssr_prompt_tokens)

    def rehearsal(self):
        if not self.pool:
            return None
        return lambda k, rng: [self.pool[rng.randrange(len(self.pool))] for _ in range(k)]

    def added(self):
        return 0, 4 * sum(len(p) for ps in self.prompts.values() for p in ps)


STRATEGY_CLASSES = {"naive": Strategy, "replay": Replay, "ewc": EWC, "lora": LoRAStrategy, "ssr": SSR}


# ---------------------------------------------------------------------------------------------
# running a sequence

def evaluate_tasks(model, tasks):
    """The model's score on every task (as it is: no adapters switched)."""
    model.eval()
    row = [t.evaluate(model) for t in tasks]
    model.train()
    return row


def run_strategy(model, tokenizer, tasks, strategy, cfg, base=None, autocast_ctx=None, progress=None,
                 adapter_dir=None):
    """Learn `tasks` in order with `strategy`; the model is modified in place (reload it before the next
    strategy). base: the starting model's scores (evaluated here when None); adapter_dir: lora saves
    each task's adapter there. Returns a JSON-able dict: "matrices" ({"<strategy>": {"R", ACC, ...}},
    plus "lora-router" for lora), added params/bytes, timings, the config."""
    if strategy not in STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    autocast_ctx = autocast_ctx or autocast_for(model.get_device())
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    eval_seconds = 0.0
    if base is None:
        t0 = time.time()
        base = evaluate_tasks(model, tasks)
        eval_seconds += time.time() - t0
    strat = STRATEGY_CLASSES[strategy](model, tokenizer, cfg, tasks)
    strat.autocast_ctx = autocast_ctx
    if adapter_dir:
        strat.adapter_dir = adapter_dir
    matrices = {}
    train_log = []
    pad = tokenizer.get_bos_token_id()
    model.train()
    try:
        for i, task in enumerate(tasks):
            strat.before_task(i, task)
            params = strat.params(i)
            stats = train_loop(model, params, task.train_rows, cfg.steps, cfg.batch_size, strat.lr(), pad,
                               rehearsal=strat.rehearsal(), rehearsal_ratio=cfg.replay_ratio, penalty=strat.penalty(),
                               warmup_steps=cfg.warmup_steps, final_lr_frac=cfg.final_lr_frac, grad_clip=cfg.grad_clip,
                               seed=cfg.seed + i, autocast_ctx=autocast_ctx, progress=progress,
                               log_every=cfg.log_every, label=f"[{strategy} {i + 1}/{len(tasks)} {task.name}] ",
                               on_batch=strat.on_batch)
            strat.after_task(i, task)
            t0 = time.time()
            rows = strat.evaluate(tasks, i)
            eval_seconds += time.time() - t0
            for k, row in rows.items():
                matrices.setdefault(k, []).append(row)
            strat.task_done(i, rows)
            train_log.append({"task": task.name, **stats})
            print0(f"[{strategy}] after {task.name}: " + " | ".join(
                f"{k}: " + " ".join(f"{v:.4f}" for v in row) for k, row in rows.items()))
        added_params, added_bytes = strat.added()
        extra = strat.extra()
    finally:
        strat.close()
    t = tasks[0]
    result = {
        "strategy": strategy, "tasks": [x.name for x in tasks], "metric": t.metric,
        "higher_is_better": t.higher_is_better, "base": base, "matrices": {}, "added_params": added_params,
        "added_bytes": added_bytes, "train_seconds": sum(s["seconds"] for s in train_log),
        "eval_seconds": eval_seconds, "wall_seconds": time.time() - t_start, "train_log": train_log,
        "config": asdict(cfg), **extra,
    }
    for k, R in matrices.items():
        result["matrices"][k] = {"R": R, **continual_metrics(R, base, t.higher_is_better)}
    return result


# ---------------------------------------------------------------------------------------------
# live learning: one adapter from a handful of conversations

def train_adapter(model, tokenizer, conversations, replay_conversations=None, steps=50, name="adapter", lora=None,
                  rank=8, alpha=16.0, lr=1e-2, batch_size=4, replay_ratio=0.25, max_seq_len=None, seed=0,
                  progress=None, should_stop=None, replace=False, task=None):
    """Train a new LoRA adapter `name` on `conversations` (tokenizer chat format), mixing in
    `replay_conversations` (e.g. general chat data) at `replay_ratio` of each batch so that the
    adapter does not drift away from everything else. Uses model._lora (attaching one when there is
    none: the base is then frozen). The model is trained in place: callers that serve requests from
    the same model must not run inference meanwhile. The previously active adapter is active again
    afterwards. progress(info) gets step, steps, loss, tok_per_sec, elapsed_s, eta_s; should_stop()
    -> True cancels (the adapter is then removed and None returned).
    Returns the Adapter (resident in the LoRA; persist it with nanochat.lora.save_adapter)."""
    from nanochat.lora import LoRA
    lora = lora or getattr(model, "_lora", None) or LoRA(model)
    if not conversations:
        raise ValueError("train_adapter needs at least one conversation")
    T = min(max_seq_len or model.config.sequence_len, model.config.sequence_len)
    rows = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in conversations]
    replay = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in (replay_conversations or [])]
    if replace and name in lora.adapters:
        lora.remove(name)
    previous = lora.active if lora.active != name else None
    ad = lora.add(name, rank=rank, alpha=alpha, seed=seed, info={"task": task or name})
    autocast_ctx = autocast_for(model.get_device())
    pad = tokenizer.get_bos_token_id()
    try:
        lora.activate(name)
        loss_before = mean_loss(model, rows, pad, autocast_ctx)
        rehearsal = (lambda k, rng: [replay[rng.randrange(len(replay))] for _ in range(k)]) if replay else None
        with torch.enable_grad():
            stats = train_loop(model, list(ad.parameters()), rows, steps, batch_size, lr, pad, rehearsal=rehearsal,
                               rehearsal_ratio=replay_ratio, warmup_steps=max(1, steps // 10), seed=seed,
                               autocast_ctx=autocast_ctx, progress=progress, log_every=max(1, steps // 20),
                               label=f"[adapter {name}] ", should_stop=should_stop)
        if should_stop is not None and should_stop():
            lora.remove(name)
            return None
        loss_after = mean_loss(model, rows, pad, autocast_ctx)
        lora.set_centroid(name, [r[0][:_prompt_end(tokenizer, r[0])] for r in rows])
    except BaseException:
        if name in lora.adapters:
            lora.remove(name)
        raise
    finally:
        lora.activate(previous if previous in lora.adapters else None)
    ad.info["metrics"] = {"loss_before": loss_before, "loss_after": loss_after, "steps": stats["steps"],
                          "seconds": stats["seconds"], "conversations": len(rows), "replay_conversations": len(replay)}
    return ad


def _prompt_end(tokenizer, ids):
    a = tokenizer.encode_special("<|assistant_start|>")
    return ids.index(a) + 1 if a in ids else len(ids)


@torch.no_grad()
def mean_loss(model, rows, pad, autocast_ctx, batch_size=8):
    """Mean loss per supervised token over rows."""
    device = model.get_device()
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        x, y = collate(rows[b:b + batch_size], pad, device)
        with autocast_ctx():
            total += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum().item())
    return total / count if count else float("nan")
