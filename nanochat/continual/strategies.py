"""The continual-learning strategies: what each one trains, which rows it rehearses, what penalty it adds
and how it is evaluated; nanochat/continual/loop.py drives them through a sequence and scores them.

Strategies:
  naive   full fine-tuning on each task in turn: the forgetting baseline.
  replay  a fixed-size reservoir buffer of earlier tasks' training rows (uniform over everything seen)
          supplies `replay_ratio` of every batch.
  ewc     elastic weight consolidation: after each task the diagonal empirical Fisher (mean squared
          per-row gradient) is added up and the weights anchored; the loss gets
          (lambda / 2) * sum F (theta - theta*)^2.
  ssr     self-synthesized rehearsal: before task i, the model (as it is then) continues short prompts
          of each earlier task (a few prompt tokens per task are all that is kept) by sampling, and
          these pseudo-samples supply `replay_ratio` of every batch instead of stored data.
  lora, merge, olora: adapter strategies on the frozen base, in nanochat/continual/adapters.py.

All full fine-tuning strategies use the same AdamW settings and data order; lora, merge and olora train
only the new adapter (AdamW, lora_lr).

A strategy is what train_loop (nanochat/continual/loop.py) needs to know: params(i), lr(), rehearsal(),
penalty(), on_batch(rows), after_step(), cfg (a ContinualConfig) and pad_id (the model computes in its own
compute_dtype); plus hooks before and after each task, evaluate(), added() and extra() for the driver.
"""
import random
import time

import torch

from nanochat.common import print0
from nanochat.engine import sample_next_token
from nanochat.kv_cache import KVCache
from nanochat.training import collate

# ---------------------------------------------------------------------------------------------
# rehearsal: a reservoir of stored rows (replay), pseudo-samples from the model itself (ssr)

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


@torch.no_grad()
def sample_continuations(model, prompts, row_len, temperature=1.0, top_k=0, seed=0, stop_ids=(), batch_size=128):
    """Continue every prompt by sampling until it is row_len tokens long, a stop token appears (not
    included) or the model's context is full. Prompts of equal length are decoded together with one KV
    cache, which on a CPU is many times faster than one Engine call per prompt; there is no tool use
    (a pseudo-sample's tool outputs are masked out of the loss anyway). -> one token list per prompt."""
    device = model.get_device()
    c = model.config
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [[] for _ in prompts]  # a prompt with no room left in the context stays []
    by_len = {}
    for n, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(n)
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    for L, members in sorted(by_len.items()):
        budget = min(row_len, c.sequence_len) - L
        if budget <= 0:
            continue
        for b in range(0, len(members), batch_size):
            idx = members[b:b + batch_size]
            cache = KVCache(len(idx), c.n_kv_head, L + budget, c.n_embd // c.n_head, c.n_layer)
            batch = torch.tensor([prompts[n] for n in idx], dtype=torch.long, device=device)
            logits = model(batch, kv_cache=cache)[:, -1]
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


def evaluate_tasks(model, tasks):
    """The model's score on every task (as it is: no adapters switched)."""
    model.eval()
    row = [t.evaluate(model) for t in tasks]
    model.train()
    return row


# ---------------------------------------------------------------------------------------------
# strategies

class Strategy:
    """naive: full fine-tuning. Subclasses change what is trained, add rehearsal rows or a penalty,
    and hook in before/after each task."""
    name = "naive"

    def __init__(self, model, tokenizer, cfg, tasks):
        self.model, self.tokenizer, self.cfg, self.tasks = model, tokenizer, cfg, tasks
        self.pad_id = tokenizer.get_bos_token_id()
        self.adapter_dir = None  # where lora keeps each task's adapter (run_strategy sets it)

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

    def after_step(self):
        pass

    def task_done(self, i, rows):
        """Called after task i was learned and evaluated (rows: its R rows)."""

    def evaluate(self, tasks, i):
        """{matrix name: row of scores} after learning task i."""
        return {self.name: evaluate_tasks(self.model, tasks)}

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
        device = self.model.get_device()
        for row in rows:  # one row at a time: the empirical Fisher is a mean of squared per-example gradients
            x, y = collate([row], self.pad_id, device)
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
            return 0.5 * lam * sum((f * (p - a).float() ** 2).sum()
                                   for f, p, a in zip(self.fisher, params, self.anchor))
        return fn

    def added(self):
        if self.fisher is None:
            return 0, 0
        return 0, sum(f.numel() * 4 + a.numel() * 4 for f, a in zip(self.fisher, self.anchor))


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
