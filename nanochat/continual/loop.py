"""Continual learning's driver: learn a sequence of tasks with one strategy, score every task after each,
and turn the scores into metrics; the strategies themselves are in nanochat/continual/strategies.py.

A sequence of tasks (tasks/continual.py) is learned one task at a time. After task i every task j is
evaluated, giving R[i][j]; base[j] is the starting model's score on task j.

The strategies (naive, replay, ewc, lora, ssr, merge, olora) are described in nanochat/continual/strategies.py.

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
replay buffer (token ids as int32), EWC's Fisher and anchor (fp32), SSR's prompts (int32), the input
bases of merge / olora "inputs" (fp32).

Entry points: run_strategy (one strategy over a sequence, used by scripts/continual_train.py),
train_loop (the loop itself, also used by nanochat/continual/adapter_train.py for live adapters), continual_metrics.
"""
import random
import time
from dataclasses import asdict, dataclass

import torch

from nanochat.common import format_eta, print0
from nanochat.continual.adapters import LoRAStrategy, MergeStrategy, OLoRA
from nanochat.continual.strategies import EWC, SSR, Replay, Strategy, evaluate_tasks
from nanochat.training import collate

STRATEGY_CLASSES = {"naive": Strategy, "replay": Replay, "ewc": EWC, "lora": LoRAStrategy, "ssr": SSR,
                    "merge": MergeStrategy, "olora": OLoRA}
STRATEGIES = tuple(STRATEGY_CLASSES)


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
    merge_method: str = "linear"  # merge: linear, ties or dare (nanochat/lora/merge.py)
    merge_density: float = 0.5  # merge: fraction of each delta ties/dare keep
    merge_weight: float = 0.0  # merge: every task's adapter enters the merge times this; 0: 1 / #adapters (their
                               # mean), or 1 (their sum) when stacked or confined to separate inputs
    merge_subspace: str = "inputs"  # merge: "none" or "inputs" (each A confined off earlier tasks' inputs)
    merge_stacked: bool = True  # merge: train each adapter on top of the frozen earlier ones, not on the bare base
    olora_subspace: str = "inputs"  # olora: "inputs" (A confined off earlier tasks' inputs) or "adapters" (a penalty
                                    # on overlapping the earlier adapters' A's, weight olora_lambda)
    olora_lambda: float = 1e6  # olora "adapters": smaller barely constrains (see the notes)
    subspace_energy: float = 0.99  # "inputs": fraction of each task's input energy its kept basis holds
    subspace_own: float = 0.98  # "inputs": keep each new A inside its task's own input directions holding this
                                # fraction of their energy off the kept bases (0: anywhere off the bases)
    subspace_rows: int = 32  # "inputs": training rows whose layer inputs make a task's basis
    router: bool = True  # lora: also score with the centroid router (task id unknown)
    router_rows: int = 64  # training rows per task for its centroid
    seed: int = 0
    log_every: int = 10


# ---------------------------------------------------------------------------------------------
# metrics

def continual_metrics(R, base, higher_is_better):
    """ACC, LA, BWT, FWT, forgetting per task and their mean, from R[i][j] and base[j] (module docstring)."""
    T = len(R)
    s = 1.0 if higher_is_better else -1.0
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    forgetting = [max(s * R[i][j] for i in range(j, T - 1)) - s * R[T - 1][j] for j in range(T - 1)]
    return {
        "ACC": mean(R[T - 1]),
        "LA": mean([R[i][i] for i in range(T)]),
        "BWT": mean([s * (R[T - 1][j] - R[j][j]) for j in range(T - 1)]),
        "FWT": mean([s * (R[j - 1][j] - base[j]) for j in range(1, T)]),
        "forgetting_per_task": forgetting,
        "forgetting": mean(forgetting),
    }


# ---------------------------------------------------------------------------------------------
# the training loop

def train_loop(model, rows, strategy, task_index=0, *, seed=0, label="", progress=None, should_stop=None):
    """Train strategy.params(task_index) on `rows` ((ids, mask) pairs): strategy.cfg.steps AdamW steps of
    cfg.batch_size rows at strategy.lr(), linear warmup then linear decay to cfg.final_lr_frac.

    The strategy also supplies rehearsal() -> None or a function (k, rng) -> k extra rows (replay /
    pseudo-samples) that replace round(cfg.replay_ratio * batch_size) rows of each batch; penalty() ->
    None or a function returning a scalar added to the loss (EWC); on_batch(rows), which sees the task
    rows of each step; after_step(), called after every optimizer step; and pad_id. The model computes in its
    compute_dtype; under fp16 the loss is scaled (torch.amp.GradScaler) so small gradients survive. progress(info)
    is called every cfg.log_every steps and at the end with step, steps, loss, tok_per_sec, elapsed_s,
    eta_s, label (default: a printed line).
    should_stop() -> True ends training early. Returns {"loss", "steps", "tokens", "seconds"}."""
    if not rows:
        raise ValueError(f"{label}nothing to train on (no rows)")
    cfg = strategy.cfg
    steps, batch_size, lr = cfg.steps, cfg.batch_size, strategy.lr()
    params = strategy.params(task_index)
    rehearsal, penalty = strategy.rehearsal(), strategy.penalty()
    device = model.get_device()
    rng = random.Random(seed)
    order = []
    n_extra = round(cfg.replay_ratio * batch_size) if rehearsal else 0
    n_extra = min(n_extra, batch_size - 1)  # always some rows of the task being learned
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type) if model.compute_dtype == torch.float16 else None
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
        strategy.on_batch(batch)
        x, y = collate(batch + extra, strategy.pad_id, device)
        loss = model(x, y)
        total = loss + penalty() if penalty is not None else loss
        (total if scaler is None else scaler.scale(total)).backward()
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        # linear warmup, then linear decay to final_lr_frac
        lrm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        lrm *= 1.0 - (1.0 - cfg.final_lr_frac) * step / max(1, steps - 1)
        for g in opt.param_groups:
            g["lr"] = lr * lrm
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)  # skipped when the gradients overflowed
            scaler.update()
        opt.zero_grad(set_to_none=True)
        strategy.after_step()
        loss_value = loss.item()
        dt = time.time() - t0
        n_tok = int((y >= 0).sum().item())
        tokens += n_tok
        done = step + 1
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
        if done % cfg.log_every == 0 or done == steps:
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
# running a sequence

def run_strategy(model, tokenizer, tasks, strategy, cfg, base=None, progress=None, adapter_dir=None):
    """Learn `tasks` in order with `strategy`; the model is modified in place (reload it before the next
    strategy). base: the starting model's scores (evaluated here when None); adapter_dir: lora saves
    each task's adapter there. The model computes in its compute_dtype. Returns a JSON-able dict: "matrices"
    ({"<strategy>": {"R", ACC, ...}}, plus "lora-router" for lora), added params/bytes, timings, the config."""
    if strategy not in STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    eval_seconds = 0.0
    if base is None:
        t0 = time.time()
        base = evaluate_tasks(model, tasks)
        eval_seconds += time.time() - t0
    strat = STRATEGY_CLASSES[strategy](model, tokenizer, cfg, tasks)
    if adapter_dir:
        strat.adapter_dir = adapter_dir
    matrices = {}
    train_log = []
    model.train()
    try:
        for i, task in enumerate(tasks):
            strat.before_task(i, task)
            stats = train_loop(model, task.train_rows, strat, i, seed=cfg.seed + i, progress=progress,
                               label=f"[{strategy} {i + 1}/{len(tasks)} {task.name}] ")
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
