"""Run chat Task objects on a model: multiple-choice accuracy from answer-letter logits, generative
accuracy by sampling with the Engine, and ChatCORE; it loads no checkpoints and writes no reports.

Two kinds of task:
- categorical (ARC, MMLU, JSONL items with "letters"): the question is rendered up to
  <|assistant_start|>, the model runs one forward pass, and only the logits of the answer-letter
  tokens (A, B, C, ...) are compared; the largest one is the model's answer. Several problems share a
  forward pass (right-padded: with causal attention, padding after a prompt cannot change the logits
  at its last position).
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples num_samples replies and the problem
  counts as solved if any of them passes task.evaluate (temperature 0 = greedy, one sample is enough).

ChatCORE = mean over the evaluated tasks of the chance-centred accuracy (acc - chance) / (1 - chance):
chance is the mean over items of 1 / (number of choices) for categorical tasks, 0 for generative ones.
Under torchrun every rank takes problems rank, rank + world, ... and the counts are summed over ranks.
"""
import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce


def rank_indices(n, max_problems, rank, world_size):
    """The problem indices this rank evaluates (at most max_problems in all; None or <= 0: every one)."""
    n = n if max_problems is None or max_problems <= 0 else min(n, max_problems)
    return list(range(rank, n, world_size))


def fit_prompt(ids, limit):
    """Keep the last `limit` tokens of a prompt that is too long for the model (the question's end and
    the <|assistant_start|> are what matter most)."""
    return ids if len(ids) <= limit else ids[-limit:]


def letter_token_ids(tokenizer, letters):
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token ({enc})")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def run_categorical_eval(task, model, tokenizer, batch_size=8, max_problems=None, rank=0, world_size=1, device=None):
    """Accuracy on a multiple-choice task from one forward pass per batch of problems; the answer is
    the letter whose token has the largest logit at the last prompt position (only the item's letters
    compete). -> {"accuracy", "correct", "total", "chance"}, summed over ranks when distributed."""
    device = device or next(model.parameters()).device
    limit = model.config.sequence_len
    pad = tokenizer.encode_special("<|assistant_end|>")
    indices = rank_indices(len(task), max_problems, rank, world_size)
    correct, total, chance = 0, 0, 0.0
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [fit_prompt(tokenizer.render_for_completion(c), limit) for c in convs]
        ids = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True, padding_value=pad)
        logits = model(ids.to(device))  # (B, T, V)
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            letter_logits = logits[r, len(p) - 1, letter_token_ids(tokenizer, letters)]
            predicted = letters[int(letter_logits.argmax())]
            correct += int(task.evaluate(conv, predicted))
            total += 1
            chance += 1.0 / len(letters)
    correct, total, chance = all_reduce([correct, total, chance], device)
    return {"accuracy": correct / total if total else 0.0, "correct": int(correct), "total": int(total),
            "chance": chance / total if total else 0.0}


def run_generative_eval(task, model, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=50, max_problems=None, rank=0, world_size=1, device=None, seed=42):
    """Fraction of problems for which at least one of num_samples sampled replies passes task.evaluate.
    -> {"accuracy", "correct", "total", "chance": 0.0}, summed over ranks when distributed."""
    device = device or next(model.parameters()).device
    context_len = model.config.sequence_len
    indices = rank_indices(len(task), max_problems, rank, world_size)
    correct, total = 0, 0
    for i in indices:
        conv = task[i]
        # leave room for the reply (at least half the context) if the prompt is too long
        prompt = fit_prompt(tokenizer.render_for_completion(conv), max(context_len // 2, context_len - max_new_tokens))
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + i)
        replies = [tokenizer.decode(r) for r in results]
        passed = any(task.evaluate(conv, reply) for reply in replies)
        correct += int(passed)
        total += 1
    correct, total = all_reduce([correct, total], device)
    return {"accuracy": correct / total if total else 0.0, "correct": int(correct), "total": int(total), "chance": 0.0}


def run_eval(task, model, tokenizer, engine=None, **kwargs):
    """run_categorical_eval or run_generative_eval, by task.eval_type (kwargs that the other runner does
    not take are dropped: batch_size is categorical only, the sampling settings generative only)."""
    common = {k: kwargs[k] for k in ("max_problems", "rank", "world_size", "device") if k in kwargs}
    if task.eval_type == "categorical":
        return run_categorical_eval(task, model, tokenizer, batch_size=kwargs.get("batch_size", 8), **common)
    if engine is None:
        from nanochat.engine import Engine
        from nanochat.tools.registry import ToolRegistry
        engine = Engine(model, tokenizer, tools=ToolRegistry())
    gen = {k: kwargs[k] for k in ("num_samples", "max_new_tokens", "temperature", "top_k", "seed") if k in kwargs}
    return run_generative_eval(task, model, tokenizer, engine, **gen, **common)


def centered(accuracy, chance):
    return (accuracy - chance) / (1.0 - chance)


def chatcore(results):
    """Mean over tasks of the chance-centred accuracy; results = {task: {"accuracy", "chance"}}."""
    vals = [centered(r["accuracy"], r["chance"]) for r in results.values()]
    return sum(vals) / len(vals) if vals else float("nan")
