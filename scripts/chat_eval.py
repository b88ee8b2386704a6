"""Evaluate a chat model on the chat tasks and compute ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Two kinds of task:
- categorical (ARC-Easy, ARC-Challenge, MMLU): the question is rendered up to <|assistant_start|>,
  the model runs one forward pass, and only the logits of the answer-letter tokens (A, B, C, ...) are
  compared; the largest one is the model's answer. Several problems share a forward pass (right-padded:
  with causal attention padding after a prompt cannot change the logits at its last position).
- generative (GSM8K, HumanEval, SpellingBee): the Engine samples --num-samples replies and the problem
  counts as solved if any of them passes task.evaluate (temperature 0 = greedy, one sample is enough).

ChatCORE = mean over the evaluated tasks of the chance-centred accuracy (acc - chance) / (1 - chance):
chance is the mean over items of 1 / (number of choices) for categorical tasks, 0 for generative ones.
0 means chance level, 1 means perfect.

Under torchrun every rank takes problems rank, rank + world, ... and the counts are summed over ranks.
--task-file PATH[,PATH...] evaluates JSONL files of conversations instead (CustomJSON format; items with
"letters" are categorical, the others generative: exact final number if the item has "answer", else
exact reply text). It is offline and tiny, which is what the tests use.
"""
import argparse
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.common import autocast, resolve_dtype, script_argv, compute_cleanup, compute_init, print0
from tasks.common import Task, extract_final_number, normalize_number, parse_letter, response_text

STAGES = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL", "dpo": "DPO"}


# ---------------------------------------------------------------------------------------------
# tasks

def _task_factories():
    """name -> a function building the evaluation split of the task (imports are lazy: building a
    task may read or fetch its data)."""
    def arc(subset):
        def make():
            from tasks.arc import ARC
            return ARC(subset=subset, split="test")
        return make

    def mmlu():
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")

    def gsm8k():
        from tasks.gsm8k import GSM8K
        return GSM8K(split="test")

    def humaneval():
        from tasks.humaneval import HumanEval
        return HumanEval()

    def spellingbee():
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")

    return {"ARC-Easy": arc("ARC-Easy"), "ARC-Challenge": arc("ARC-Challenge"), "MMLU": mmlu,
            "GSM8K": gsm8k, "HumanEval": humaneval, "SpellingBee": spellingbee}


ALL_TASKS = list(_task_factories())


class JSONLTask(Task):
    """Conversations from a JSONL file (tasks.customjson format), with an evaluate(): items carrying
    "letters" are multiple choice (answer = the last assistant message's letter); the others are
    generative, scored by exact final number when the item has "answer", else by exact reply text."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        from tasks.customjson import load_jsonl
        self.filepath = filepath
        self.conversations = load_jsonl(filepath)
        kinds = {"letters" in c for c in self.conversations}
        if len(kinds) > 1:
            raise ValueError(f"{filepath}: mixes multiple-choice items (with 'letters') and generative ones")
        self._categorical = kinds.pop()

    @property
    def eval_type(self):
        return "categorical" if self._categorical else "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]

    def evaluate(self, conversation, assistant_response):
        reference = conversation["messages"][-1]["content"]
        if self._categorical:
            return int(parse_letter(assistant_response, conversation["letters"]) == reference)
        if "answer" in conversation:
            pred = extract_final_number(assistant_response)
            return int(pred is not None and pred == normalize_number(str(conversation["answer"])))
        return int(response_text(assistant_response).strip() == response_text(reference).strip())

    reward = evaluate


# ---------------------------------------------------------------------------------------------
# evaluators

def _rank_indices(n, max_problems, rank, world_size):
    n = n if max_problems is None or max_problems <= 0 else min(n, max_problems)
    return list(range(rank, n, world_size))


def _all_reduce(values, device):
    """Sum a list of numbers over ranks (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _fit_prompt(ids, limit):
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
def run_categorical_eval(task, model, tokenizer, batch_size=8, max_problems=None, rank=0, world_size=1,
                         autocast_ctx=None, device=None):
    """Accuracy on a multiple-choice task from one forward pass per batch of problems; the answer is
    the letter whose token has the largest logit at the last prompt position (only the item's letters
    compete). -> {"accuracy", "correct", "total", "chance"}, summed over ranks when distributed."""
    autocast_ctx = autocast_ctx or nullcontext()
    device = device or next(model.parameters()).device
    limit = model.config.sequence_len
    pad = tokenizer.encode_special("<|assistant_end|>")
    indices = _rank_indices(len(task), max_problems, rank, world_size)
    correct, total, chance = 0, 0, 0.0
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [_fit_prompt(tokenizer.render_for_completion(c), limit) for c in convs]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        with autocast_ctx:
            logits = model(ids.to(device))  # (B, T, V)
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            letter_logits = logits[r, len(p) - 1, letter_token_ids(tokenizer, letters)]
            predicted = letters[int(letter_logits.argmax())]
            correct += int(task.evaluate(conv, predicted))
            total += 1
            chance += 1.0 / len(letters)
    correct, total, chance = _all_reduce([correct, total, chance], device)
    return {"accuracy": correct / total if total else 0.0, "correct": int(correct), "total": int(total),
            "chance": chance / total if total else 0.0}


def run_generative_eval(task, model, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=50, max_problems=None, rank=0, world_size=1, autocast_ctx=None, device=None,
                        seed=42, verbose=False):
    """Fraction of problems for which at least one of num_samples sampled replies passes task.evaluate.
    -> {"accuracy", "correct", "total", "chance": 0.0}, summed over ranks when distributed."""
    autocast_ctx = autocast_ctx or nullcontext()
    device = device or next(model.parameters()).device
    ctx = model.config.sequence_len
    indices = _rank_indices(len(task), max_problems, rank, world_size)
    correct, total = 0, 0
    for i in indices:
        conv = task[i]
        # leave room for the reply (at least half the context) if the prompt is too long
        prompt = _fit_prompt(tokenizer.render_for_completion(conv), max(ctx // 2, ctx - max_new_tokens))
        with autocast_ctx:
            results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                               temperature=temperature, top_k=top_k, seed=seed + i)
        replies = [tokenizer.decode(r) for r in results]
        passed = any(task.evaluate(conv, reply) for reply in replies)
        correct += int(passed)
        total += 1
        if verbose:
            print(f"\r[rank {rank}] {correct}/{total} ({100 * correct / total:.1f}%)", end="", flush=True)
    if verbose and indices:
        print()
    correct, total = _all_reduce([correct, total], device)
    return {"accuracy": correct / total if total else 0.0, "correct": int(correct), "total": int(total), "chance": 0.0}


def centered(accuracy, chance):
    return (accuracy - chance) / (1.0 - chance)


def chatcore(results):
    """Mean over tasks of the chance-centred accuracy; results = {task: {"accuracy", "chance"}}."""
    vals = [centered(r["accuracy"], r["chance"]) for r in results.values()]
    return sum(vals) / len(vals) if vals else float("nan")


def format_table(results):
    rows = [f"{'task':<16} {'accuracy':>9} {'correct':>9} {'chance':>7} {'centred':>8}"]
    for name, r in results.items():
        rows.append(f"{name:<16} {r['accuracy']:>9.4f} {r['correct']:>4}/{r['total']:<4} {r['chance']:>7.3f} "
                    f"{centered(r['accuracy'], r['chance']):>8.4f}")
    rows.append(f"{'ChatCORE':<16} {chatcore(results):>9.4f}  (mean centred accuracy over {len(results)} tasks)")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, choices=list(STAGES), help="which stage's model to load")
    p.add_argument("-a", "--task-name", default="all", help=f"'all' or names joined by '|': {'|'.join(ALL_TASKS)}")
    p.add_argument("--task-file", default="", help="evaluate these JSONL files of conversations (comma-separated) instead of -a")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="generative: samples per problem (pass@n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical: problems per forward pass")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None)
    dtype = resolve_dtype(args.dtype, device.type)
    autocast_ctx = autocast(dtype, device.type)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    if args.task_file:
        paths = args.task_file.split(",")
        tasks = {os.path.splitext(os.path.basename(p))[0]: (lambda p=p: JSONLTask(p)) for p in paths}
    else:
        factories = _task_factories()
        names = ALL_TASKS if args.task_name == "all" else args.task_name.split("|")
        unknown = [n for n in names if n not in factories]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; choose from {ALL_TASKS} or 'all'")
        tasks = {n: factories[n] for n in names}

    results = {}
    for name, make in tasks.items():
        t0 = time.time()
        task = make()
        if task.eval_type == "categorical":
            r = run_categorical_eval(task, model, tokenizer, batch_size=args.batch_size, max_problems=args.max_problems,
                                     rank=rank, world_size=world_size, autocast_ctx=autocast_ctx, device=device)
        else:
            r = run_generative_eval(task, model, tokenizer, engine, num_samples=args.num_samples,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    max_problems=args.max_problems, rank=rank, world_size=world_size,
                                    autocast_ctx=autocast_ctx, device=device)
        results[name] = r
        print0(f"{name}: {r['correct']}/{r['total']} = {100 * r['accuracy']:.2f}% ({time.time() - t0:.1f}s)")

    table = format_table(results)
    print0(table)
    score = chatcore(results)
    if rank == 0:
        from nanochat.report import get_report
        summary = {name: r["accuracy"] for name, r in results.items()}
        summary["ChatCORE"] = score
        get_report().log(section=f"Chat evaluation {args.source}", stage=STAGES[args.source], summary=summary, data=[
            vars(args),
            {name: f"{r['accuracy']:.4f} ({r['correct']}/{r['total']}, chance {r['chance']:.3f})" for name, r in results.items()},
            {"ChatCORE": score},
            "```\n" + table + "\n```",
        ])
    if ddp:
        dist.barrier()  # nobody tears gloo down while another rank still works (it can abort at exit)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
