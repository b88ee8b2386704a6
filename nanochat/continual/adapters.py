"""The adapter strategies of continual learning (lora, merge, olora): each task trains a new LoRA adapter on
the frozen base, and they differ in how the adapters are served and kept apart; the strategy contract and the
full fine-tuning strategies are in nanochat/continual/strategies.py, the adapters themselves in
nanochat/lora/adapter.py.

  lora    a new LoRA adapter per task on the frozen base (nanochat/lora/adapter.py). With the task id known at
          evaluation, task j is scored with adapter j (the base model for tasks not learned yet), so
          earlier tasks cannot change: zero forgetting by construction. A second matrix, "lora-router",
          scores every item with the adapter a router picks without the task id: the nearest centroid
          (cosine) of base-model hidden states; centroids are the mean over each task's training rows
          (lm: the first `route_prefix` tokens of a row; chat: the prompt).
  merge   one LoRA adapter per task, evaluated (served) as the merge of all adapters so far
          (nanochat/lora/merge.py, `merge_method`, `merge_density`, each adapter times `merge_weight`):
          no task id, no router, no stored data. By default (merge_subspace "inputs", merge_stacked)
          each adapter trains on top of the frozen earlier ones with its A confined as below, and they
          are summed; merge_subspace "none" and merge_stacked False give the plain merge of adapters
          trained on the bare base, by default their mean.
  olora   O-LoRA: task i's adapter trains on top of the frozen stack of adapters 0..i-1, kept out of
          their way; evaluated with the whole stack active (no task id, no router, no stored data).
          olora_subspace "inputs" (the default): its A is confined as below. "adapters" (the paper's
          rule): the loss + olora_lambda * sum_t<i sum_layers ||A_i A_t^T||_F^2 pushes it into input
          directions the earlier adapters' A's do not read.
  "inputs" (nanochat/lora/subspace.py): after each task, cfg.subspace_rows of its training rows go
          through the model and every target layer keeps an orthonormal basis of their inputs holding
          cfg.subspace_energy of their energy (statistics, like EWC's Fisher: no rows are kept); a new
          adapter's A is kept off every basis so far, and (subspace_own) inside the directions of its
          own task's inputs, at its start and after every optimizer step. Old tasks' inputs then pass
          the new adapter (nearly) unchanged, and it barely touches inputs it never trained on.
"""
import os
import random

from nanochat.common import print0
from nanochat.continual.strategies import Strategy
from nanochat.lora.adapter import LoRA
from nanochat.lora.merge import merge_adapters
from nanochat.lora.router import route, set_centroid
from nanochat.lora.storage import save_adapter
from nanochat.lora.subspace import InputSubspace
from nanochat.training import collate


class LoRAStrategy(Strategy):
    name = "lora"
    prefix = ""  # of adapter names: strategies that share an adapter_dir must not overwrite each other
    subspace_option = None  # (config field, its values): "inputs" confines each new adapter (merge, olora)

    def __init__(self, model, tokenizer, cfg, tasks):
        option = None
        if self.subspace_option:  # checked before a LoRA is attached to the model
            field, values = self.subspace_option
            option = getattr(cfg, field)
            if option not in values:
                raise ValueError(f"{field} must be {' or '.join(repr(v) for v in values)}, got {option!r}")
        super().__init__(model, tokenizer, cfg, tasks)
        self.lora = LoRA(model)
        self.names = []  # adapter of task i
        self.router_accuracy = []  # per evaluation: fraction of task j's items routed to adapter j
        self.subspace = None  # merge / olora with "inputs": the earlier tasks' input bases (lora_subspace.py)
        if option == "inputs":
            self.subspace = InputSubspace(self.lora, cfg.subspace_energy)
        self.subspace_dims = []  # after each task: mean basis size / input size per target

    def params(self, i):
        return list(self.lora.adapters[self.names[i]].parameters())

    def lr(self):
        return self.cfg.lora_lr

    def before_task(self, i, task):
        name = f"{self.prefix}task{i}-{task.name}"
        ad = self.lora.add(name, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, seed=self.cfg.seed + i,
                           info={"task": task.name})
        self.names.append(name)
        if self.subspace is not None:
            self.subspace.project(ad)  # it starts reading nothing the earlier tasks feed its layers
        self.lora.activate(name)
        print0(f"{self.name}: adapter {name}: {ad.num_params():,} trainable parameters, {ad.num_bytes():,} bytes")

    def after_step(self):
        if self.subspace is not None:  # the optimizer step moved A: back into the complement
            self.subspace.project(self.lora.adapters[self.names[-1]])

    def input_covariances(self, i, task):
        """{module key: sum x x^T} of every target layer's inputs for cfg.subspace_rows of task i's training
        rows through the model as it is now."""
        rng = random.Random(self.cfg.seed + 11 * i)
        rows = rng.sample(task.train_rows, min(self.cfg.subspace_rows, len(task.train_rows)))
        device = self.model.get_device()

        def forward():
            for b in range(0, len(rows), self.cfg.batch_size):
                x, _ = collate(rows[b:b + self.cfg.batch_size], self.pad_id, device)
                self.model(x)
        self.model.eval()
        covs = self.subspace.covariances(forward)
        self.model.train()
        return covs

    def confine_inputs(self, i, task):
        """subspace_own: keep the new adapter inside task i's own input directions (lora_subspace.confine),
        measured before it trains (it starts as a no-op: B = 0)."""
        if self.subspace is not None and self.cfg.subspace_own > 0:
            self.subspace.confine(self.input_covariances(i, task), self.cfg.subspace_own)
            self.subspace.project(self.lora.adapters[self.names[-1]])

    def keep_inputs(self, i, task):
        """Grow the input bases with task i's layer inputs, the adapters that will serve it active. Not
        after the last task: nothing would use it."""
        if self.subspace is None or i == len(self.tasks) - 1:
            return
        self.subspace.add(self.input_covariances(i, task))
        dims = {}
        for key, U in self.subspace.bases.items():
            dims.setdefault(key.split(".", 2)[2], []).append(U.size(1) / U.size(0))
        self.subspace_dims.append({t: round(sum(v) / len(v), 4) for t, v in dims.items()})
        print0(f"{self.name}: input bases after task {i} hold " + ", ".join(
            f"{t} {100 * v:.0f}%" for t, v in self.subspace_dims[-1].items()) + " of their layers' input dimensions")

    def after_task(self, i, task):
        if self.cfg.router:
            rows = task.train_rows[:self.cfg.router_rows]
            set_centroid(self.lora, self.names[i], [task.route_ids_of_row(r) for r in rows])
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
                picks = route(self.lora, [t.route_ids(item) for item in t.eval_items], candidates=self.names[:i + 1])
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
            task = self.tasks[i]
            save_adapter(self.lora, self.names[i], os.path.join(self.adapter_dir, self.names[i]), task=task.name,
                         metrics={task.metric: rows[self.name][i]})

    def added(self):
        ads = [self.lora.adapters[n] for n in self.names]
        kept = self.subspace.num_bytes() if self.subspace is not None else 0
        return sum(a.num_params() for a in ads), sum(a.num_bytes() for a in ads) + kept

    def extra(self):
        out = {"router_accuracy": self.router_accuracy} if self.router_accuracy else {}
        if self.subspace_dims:
            out["subspace_dims"] = self.subspace_dims
        return out

    def close(self):
        self.lora.close()


class MergeStrategy(LoRAStrategy):
    """One adapter per task on the frozen base (as lora), served as the merge of all adapters so far.
    merge_subspace "inputs" confines each adapter's A off the earlier tasks' inputs; merge_stacked trains
    each adapter on top of the frozen earlier ones (at the weights they are served with)."""
    name = "merge"
    prefix = "merge-"

    subspace_option = ("merge_subspace", ("none", "inputs"))

    def weight(self, i):
        """Each adapter's weight in the merge after task i. By default their mean: a sum of adapters that read
        the same inputs interferes; adapters confined to separate inputs, or trained on top of each other,
        add up at full strength."""
        c = self.cfg
        return c.merge_weight or (1.0 if self.subspace is not None or c.merge_stacked else 1.0 / (i + 1))

    def before_task(self, i, task):
        super().before_task(i, task)
        if self.cfg.merge_stacked:  # only meaningful on top of the earlier ones: adapter.json says so
            for n in self.names[:-1]:
                self.lora.freeze(n)
            w = self.weight(i)
            self.lora.adapters[self.names[-1]].info["provenance"] = {
                "stacked_on": [{"name": n, "weight": w} for n in self.names[:-1]]}
            self.lora.activate(self.names, weights=[w] * (i + 1))
        self.confine_inputs(i, task)

    def after_task(self, i, task):
        self.keep_inputs(i, task)
        self.lora.activate(None)

    def evaluate(self, tasks, i):
        c = self.cfg
        merge_adapters(self.lora, self.names[:i + 1], "merged", method=c.merge_method, density=c.merge_density,
                       weights=[self.weight(i)] * (i + 1), seed=c.seed)
        self.lora.activate("merged")
        out = Strategy.evaluate(self, tasks, i)
        self.lora.remove("merged")
        return out


class OLoRA(LoRAStrategy):
    """O-LoRA: each task's adapter trains on top of the earlier (frozen) ones, kept out of their subspaces:
    penalised for overlapping the earlier adapters' A's (olora_subspace "adapters") or confined off the
    earlier tasks' layer inputs ("inputs"); all adapters stay active together, so there is no task id, no
    router, no data kept."""
    name = "olora"
    prefix = "olora-"

    subspace_option = ("olora_subspace", ("adapters", "inputs"))

    def before_task(self, i, task):
        super().before_task(i, task)
        for n in self.names[:-1]:
            self.lora.freeze(n)
        self.lora.adapters[self.names[-1]].info["provenance"] = {
            "stacked_on": [{"name": n, "weight": 1.0} for n in self.names[:-1]]}
        self.lora.activate(self.names)
        self.confine_inputs(i, task)

    def after_task(self, i, task):
        self.keep_inputs(i, task)  # the stack of every adapter so far stays active

    def penalty(self):
        """lambda * sum over layers and earlier adapters t of ||A_new A_t^T||_F^2: zero exactly when the
        new adapter reads directions of the input that no earlier adapter reads. None with "inputs"."""
        if len(self.names) < 2 or self.subspace is not None:
            return None
        new = self.lora.adapters[self.names[-1]]
        olds = [self.lora.adapters[n] for n in self.names[:-1]]
        lam = self.cfg.olora_lambda

        def fn():
            total = 0.0
            for old in olds:
                for k, i in new.index.items():
                    j = old.index.get(k)
                    if j is not None:
                        total = total + (new.A[i] @ old.A[j].detach().T).pow(2).sum()
            return lam * total
        return fn

    evaluate = Strategy.evaluate  # the stack stays active: one row, no task id to pick an adapter by
