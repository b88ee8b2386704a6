"""Preference pairs for DPO: made without a human from problems with checkable answers, or read from a
user's JSONL file. Scoring and training on pairs is nanochat/dpo.py's job.

Pairs file (JSONL, one pair per line):
    {"prompt": [{"role": "user", "content": "..."}],        # messages, ending with a user message
     "chosen": "a good reply",                              # assistant content: a string or a list of
     "rejected": [{"type": "text", "text": "..."}]}         #   parts, or [{"role": "assistant", ...}]
Extra keys are kept. "ref_chosen"/"ref_rejected" are the reference model's log-probs of the two replies;
the DPO stage writes them into the copy of the pairs it keeps in the base dir.

Sampled pairs: for each problem, sample k replies with the engine (calculator tool on), reward each with
task.reward; chosen = a correct reply, rejected = an incorrect one. Problems whose replies are all correct
or all wrong teach nothing about preference and are dropped.
"""
import json

from nanochat.common import atomic_write
from nanochat.dpo import tokens_to_parts
from tasks.common import TaskMixture, read_jsonl
from tasks.customjson import validate_messages

PROBLEM_SETS = ("gsm8k-synthetic", "spellingbee", "gsm8k")


def problem_tasks(names, size=10000, seed=0):
    """Training problems with a reward: gsm8k-synthetic (template word problems, offline), spellingbee
    (letter counting over the train words, offline), gsm8k (the GSM8K train split, from the hub).
    Several names are interleaved in one seeded order."""
    tasks = []
    for name in names:
        if name == "gsm8k-synthetic":
            from tasks.gsm8k import GSM8KSynthetic
            tasks.append(GSM8KSynthetic(size=size, seed=seed))
        elif name == "spellingbee":
            from tasks.spellingbee import SpellingBee
            tasks.append(SpellingBee(size=size // 4, split="train", seed=seed))
        elif name == "gsm8k":
            from tasks.gsm8k import GSM8K
            tasks.append(GSM8K(split="train"))
        else:
            raise ValueError(f"unknown problem set {name!r}; expected some of {PROBLEM_SETS}")
    if not tasks:
        raise ValueError(f"no problem sets given; expected some of {PROBLEM_SETS}")
    return tasks[0] if len(tasks) == 1 else TaskMixture(tasks, seed=seed)


def pairs_from_samples(prompt, replies, rewards, max_pairs):
    """Pair correct with incorrect replies of one problem. replies: assistant contents; duplicates count
    once. -> up to max_pairs pairs, each reply used at most once; [] when all or none are correct."""
    correct, wrong, seen = [], [], set()
    for reply, reward in zip(replies, rewards):
        key = json.dumps(reply, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        (correct if reward > 0 else wrong).append(reply)
    n = min(len(correct), len(wrong), max_pairs)
    return [{"prompt": list(prompt), "chosen": c, "rejected": r} for c, r in zip(correct[:n], wrong[:n])]


def sample_pairs(task, indices, engine, tokenizer, num_samples, max_new_tokens, temperature, top_k, seed,
                 max_pairs=1):
    """Sample num_samples replies to each problem task[i], i in indices, and pair them up.
    -> (pairs, stats) with stats = {problems, samples, reward_sum, all_correct, none_correct, too_long}."""
    ctx = engine.model.config.sequence_len
    pairs = []
    stats = {"problems": 0, "samples": 0, "reward_sum": 0.0, "all_correct": 0, "none_correct": 0, "too_long": 0}
    for idx in indices:
        conv = task[idx]
        messages = conv["messages"]
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else list(messages)  # drop the reference reply
        ids = tokenizer.render_for_completion({"messages": prompt})
        budget = min(max_new_tokens, ctx - len(ids))
        stats["problems"] += 1
        if budget < 1 or len(ids) > ctx // 2:  # no room for an answer worth pairing
            stats["too_long"] += 1
            continue
        tokens, _ = engine.generate_batch(ids, num_samples=num_samples, max_tokens=budget, temperature=temperature,
                                          top_k=top_k, seed=seed + idx)
        rewards = [float(task.reward(conv, tokenizer.decode(t))) for t in tokens]
        stats["samples"] += len(tokens)
        stats["reward_sum"] += sum(rewards)
        if min(rewards) > 0:
            stats["all_correct"] += 1
        elif max(rewards) <= 0:
            stats["none_correct"] += 1
        else:
            for p in pairs_from_samples(prompt, [tokens_to_parts(tokenizer, t) for t in tokens], rewards, max_pairs):
                pairs.append({**p, "problem": idx})
    return pairs, stats


# ---------------------------------------------------------------------------------------------
# pairs files

def _reply(value, where, side):
    """A reply given as content, or as [one assistant message] (the conversational form) -> content."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "role" in value[0]:
        if value[0]["role"] != "assistant":
            raise ValueError(f"{where}: '{side}' must be an assistant reply, got a {value[0]['role']!r} message")
        value = value[0].get("content")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, dict) for p in value)):
        return value
    raise ValueError(f"{where}: '{side}' must be a string, a list of parts or [an assistant message], "
                     f"got {type(value).__name__}")


def validate_pair(obj, where="pair"):
    """Check one pair and return it normalized (replies as content). Errors say what is wrong and where."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected', "
                         f"got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)} "
                         "(each line is {\"prompt\": [messages], \"chosen\": reply, \"rejected\": reply})")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty list of messages (or a user message string)")
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") != "user":
        raise ValueError(f"{where}: 'prompt' must end with a user message, not {prompt[-1].get('role')!r}")
    out = dict(obj, prompt=prompt)
    for side in ("chosen", "rejected"):
        out[side] = _reply(obj[side], where, side)
        try:
            validate_messages(prompt + [{"role": "assistant", "content": out[side]}])
        except ValueError as e:
            raise ValueError(f"{where}: prompt + {side}: {e}") from None
    if json.dumps(out["chosen"], sort_keys=True) == json.dumps(out["rejected"], sort_keys=True):
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same reply: such a pair teaches nothing")
    refs = [k for k in ("ref_chosen", "ref_rejected") if k in obj]
    if refs and (len(refs) != 2 or not all(isinstance(obj[k], (int, float)) for k in refs)):
        raise ValueError(f"{where}: 'ref_chosen' and 'ref_rejected' must both be numbers (or both be absent)")
    return out


def read_pairs(path):
    """All pairs of a JSONL file, validated; every error names the file and line."""
    try:
        pairs = [validate_pair(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    except FileNotFoundError:
        raise FileNotFoundError(f"no pairs file {path}") from None
    if not pairs:
        raise ValueError(f"{path}: no pairs (expected one JSON object per line)")
    return pairs


def write_pairs(path, pairs):
    """Write pairs as JSONL atomically (a kill never leaves half a file)."""
    with atomic_write(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
