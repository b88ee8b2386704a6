"""Task sequences for continual learning: reading a sequence file and turning its tasks into training rows
and scored held-out items; the strategies and the training loop live in nanochat/.

A sequence is a small JSON file; the shipped ones live in tasks/sequences/ and are named by file
stem (`lm-domains`, `chat-tasks`), any other path works too:

    {
      "name": "my-sequence",
      "description": "what it tests",
      "tasks": [
        {"name": "literature", "type": "lm", "sources": ["shakespeare"]},
        {"name": "systems",    "type": "lm", "kinds": ["systems_docs"]},
        {"name": "my-notes",   "type": "lm", "jsonl": "notes.jsonl", "eval_jsonl": "notes_eval.jsonl"},
        {"name": "arc",        "type": "chat", "task": "arc-easy"},
        {"name": "my-faq",     "type": "chat", "jsonl": "faq.jsonl", "eval_jsonl": "faq_eval.jsonl"}
      ]
    }

Language-modelling tasks ("lm") are text domains; the metric is bits per byte on held-out text
(lower is better). "sources"/"kinds" select documents of the pretraining shards by their `source`
column (kinds via nanochat.offline.sources.SOURCE_KIND): training text from the train shards, held-out text
from the validation shard, so the two never overlap. "jsonl" reads {"text": ...} lines; without
"eval_jsonl" every 10th document is held out.

Chat tasks ("chat") are conversations; the metric is accuracy (higher is better): multiple choice
from the answer-letter logits, generative by greedy decoding and the task's own check (as in
tasks/evaluate.py). Built-in: arc-easy, arc-challenge (train split / validation split),
gsm8k (synthetic GSM8K-style tool-use problems; training and held-out problems use different seeds),
spellingbee, simplespelling (word lists split into train/test words). "jsonl" reads conversations in
tasks/customjson.py's format; items with "letters" are multiple choice, the others are scored by
final number when they carry "answer", else by exact reply text. Without "eval_jsonl" every 5th
conversation is held out. "max_new_tokens" (optional) caps generated replies for that task.
Relative paths are relative to the JSON file.

One sequence has one metric: lm and chat tasks cannot be mixed.

Every task becomes a CLTask: `train_rows` (token ids + loss mask, at most seq_len + 1 tokens each),
`eval_items`, and score(model, items) -> (numerator, denominator) so that a metric over any subset
(e.g. the items a router sent to one adapter) can be summed.
"""
import json
import math
import os

import torch

from nanochat.common import sum_dtype
from nanochat.training import collate
from tasks.common import read_jsonl
from tasks.customjson import JSONLTask
from tasks.evaluate import run_eval

SEQUENCES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequences")
CHAT_TASKS = ("arc-easy", "arc-challenge", "gsm8k", "spellingbee", "simplespelling")
ROUTE_PREFIX = 64  # the tokens of an lm row the adapter router sees


def list_sequences():
    return sorted(f[:-5] for f in os.listdir(SEQUENCES_DIR) if f.endswith(".json"))


def load_sequence_spec(name_or_path):
    """The parsed JSON of a sequence (a shipped name or a path), checked, with `_dir` set to its folder."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(SEQUENCES_DIR, f"{name_or_path}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no sequence {name_or_path!r}: not a file, and not one of {list_sequences()}")
    with open(path) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or len(tasks) < 2:
        raise ValueError(f"{path}: 'tasks' must be a list of at least 2 tasks")
    names = set()
    for k, t in enumerate(tasks):
        where = f"{path}: task {k}"
        if not isinstance(t, dict) or t.get("type") not in ("lm", "chat") or not t.get("name"):
            raise ValueError(f"{where}: needs a 'name' and a 'type' of 'lm' or 'chat'")
        if t["name"] in names:
            raise ValueError(f"{where}: duplicate task name {t['name']!r}")
        names.add(t["name"])
        if t["type"] == "lm" and not any(k in t for k in ("sources", "kinds", "jsonl")):
            raise ValueError(f"{where}: an lm task needs 'sources', 'kinds' or 'jsonl'")
        if t["type"] == "chat" and not ("jsonl" in t or t.get("task") in CHAT_TASKS):
            raise ValueError(f"{where}: a chat task needs 'jsonl' or 'task' in {CHAT_TASKS}")
    if len({t["type"] for t in tasks}) > 1:
        raise ValueError(f"{path}: mixes lm and chat tasks; a sequence has one metric (bpb or accuracy)")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    spec["_dir"] = os.path.dirname(os.path.abspath(path))
    return spec


# ---------------------------------------------------------------------------------------------
# language-modelling domains

def read_domain_docs(split, sources, data_dir=None, max_chars=None):
    """Documents of the pretraining shards whose `source` is in `sources`, in shard order; stops
    once max_chars characters are collected. split: "train" (all shards but the last) or "val"."""
    import pyarrow.parquet as pq

    from nanochat.dataset import split_files
    wanted, docs, chars = set(sources), [], 0
    for path in split_files(split, data_dir):
        pf = pq.ParquetFile(path)
        if "source" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'source' column (downloaded FineWeb shards have one domain); "
                             "use the offline shards or an lm task with 'jsonl'")
        table = pf.read(columns=["text", "source"])
        for text, src in zip(table.column("text").to_pylist(), table.column("source").to_pylist()):
            if src in wanted:
                docs.append(text)
                chars += len(text)
                if max_chars and chars >= max_chars:
                    return docs
    return docs


def chunk_docs(tokenizer, docs, T, limit, min_tokens=16):
    """Rows of <|bos|> + up to T tokens cut from the documents, taken round-robin across documents
    (row 0 of every document, then row 1, ...) so a few long documents do not fill the set.
    Loss on every token but the <|bos|>. -> at most `limit` (ids, mask) rows."""
    bos = tokenizer.get_bos_token_id()
    per_doc = []
    for ids in tokenizer.encode(list(docs)):
        pieces = [ids[s:s + T] for s in range(0, len(ids), T)]
        per_doc.append([p for p in pieces if len(p) >= min_tokens])
    rows = []
    for k in range(max((len(p) for p in per_doc), default=0)):
        for pieces in per_doc:
            if k < len(pieces):
                rows.append(([bos] + pieces[k], [0] + [1] * len(pieces[k])))
                if len(rows) >= limit:
                    return rows
    return rows


class CLTask:
    """One task of a sequence. Subclasses set train_rows and eval_items and implement score()."""
    name = ""
    kind = ""  # "lm" or "chat"
    metric = ""  # "bpb" or "accuracy"
    higher_is_better = False

    def score(self, model, items):
        """-> (numerator, denominator): the metric over `items` is numerator / denominator."""
        raise NotImplementedError

    def evaluate(self, model, items=None):
        num, den = self.score(model, self.eval_items if items is None else items)
        return num / den if den else float("nan")

    def prompts(self, n, k):
        """n short prompts (k content tokens) for self-synthesized rehearsal."""
        raise NotImplementedError

    def pseudo_row(self, prompt, generated):
        """A generated continuation of a prompt as a training row (ids, mask), or None to drop it."""
        raise NotImplementedError

    def route_ids(self, item):
        """What a router sees of an eval item (never its answer)."""
        raise NotImplementedError

    def route_ids_of_row(self, row):
        """What a router sees of a training row (for the adapter centroids)."""
        raise NotImplementedError


class LMTask(CLTask):
    kind, metric, higher_is_better = "lm", "bpb", False

    def __init__(self, name, tokenizer, train_docs, eval_docs, T, n_train, n_eval, batch_size=8,
                 route_prefix=ROUTE_PREFIX):
        self.name, self.tokenizer = name, tokenizer
        self.train_rows = chunk_docs(tokenizer, train_docs, T, n_train)
        self.eval_items = chunk_docs(tokenizer, eval_docs, T, n_eval)
        if not self.train_rows or not self.eval_items:
            raise ValueError(f"lm task {name!r}: no text ({len(self.train_rows)} training rows, "
                             f"{len(self.eval_items)} held-out rows)")
        self.batch_size, self.route_prefix = batch_size, route_prefix
        self._token_bytes = {}

    def token_bytes(self, device):
        if device not in self._token_bytes:
            self._token_bytes[device] = self.tokenizer.token_bytes().to(device)
        return self._token_bytes[device]

    @torch.no_grad()
    def score(self, model, items):
        """(total bits, total bytes) of the items' targets: bits per byte summed the way
        nanochat.loss_eval.evaluate_bpb does (special tokens carry no bytes and are skipped)."""
        device = model.get_device()
        tb = self.token_bytes(device)
        pad = self.tokenizer.get_bos_token_id()
        nats, nbytes = 0.0, 0
        for b in range(0, len(items), self.batch_size):
            x, y = collate(items[b:b + self.batch_size], pad, device)
            losses = model(x, y, loss_reduction="none").reshape(-1).to(sum_dtype(device))
            y = y.reshape(-1)
            valid = y >= 0
            n = torch.where(valid, tb[torch.where(valid, y, 0)], 0)
            nats += (losses * (n > 0)).sum().item()
            nbytes += int(n.sum().item())
        return nats / math.log(2), nbytes

    def prompts(self, n, k):
        # the first rows come from different documents (chunk_docs is round-robin)
        return [ids[:k + 1] for ids, _ in self.train_rows[:n]]

    def pseudo_row(self, prompt, generated):
        ids = list(prompt) + list(generated)
        if len(generated) < 8:
            return None
        return ids, [0] + [1] * (len(ids) - 1)

    def route_ids(self, item):
        return item[0][:self.route_prefix]

    route_ids_of_row = route_ids


class ChatTask(CLTask):
    kind, metric, higher_is_better = "chat", "accuracy", True

    def __init__(self, name, tokenizer, train_convs, eval_task, T, n_eval, batch_size=8, max_new_tokens=64):
        self.name, self.tokenizer, self.T = name, tokenizer, T
        self.train_convs = list(train_convs)
        self.train_rows = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in self.train_convs]
        self.eval_task = eval_task  # a tasks.common.Task: evaluate() and eval_type
        self.eval_items = list(range(min(n_eval, len(eval_task))))
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        S = tokenizer.encode_special
        self.user_start, self.user_end = S("<|user_start|>"), S("<|user_end|>")
        self.assistant_start, self.assistant_end = S("<|assistant_start|>"), S("<|assistant_end|>")
        self.output_start, self.output_end = S("<|output_start|>"), S("<|output_end|>")

    def score(self, model, items):
        """(correct, total) over the eval conversations with these indices."""
        task = _Subset(self.eval_task, items)
        if not len(task):
            return 0, 0
        r = run_eval(task, model, self.tokenizer, batch_size=self.batch_size, num_samples=1,
                     max_new_tokens=self.max_new_tokens, temperature=0.0)
        return r["correct"], r["total"]

    def prompts(self, n, k):
        bos = self.tokenizer.get_bos_token_id()
        out = []
        for c in self.train_convs[:n]:
            user = next(m["content"] for m in c["messages"] if m["role"] == "user")
            out.append([bos, self.user_start] + self.tokenizer.encode(user)[:k])
        return out

    def pseudo_row(self, prompt, generated):
        """A whole generated conversation: kept only if the model closed the user turn and answered.
        Loss on the assistant's tokens, as in render_conversation (tool outputs excluded)."""
        ids = list(prompt) + list(generated)
        if self.assistant_start not in ids or self.user_end not in ids:
            return None
        start = ids.index(self.assistant_start)
        if start + 1 >= len(ids):
            return None
        ids = ids[:self.T] + [self.assistant_end]
        mask, in_output = [], False
        for i, t in enumerate(ids):
            if i <= start:
                mask.append(0)
                continue
            if t == self.output_start:
                in_output = True
            mask.append(0 if in_output else 1)
            if t == self.output_end:
                in_output = False
        return ids, mask

    def route_ids(self, item):
        return self.tokenizer.render_for_completion(self.eval_task[item])

    def route_ids_of_row(self, row):
        ids = row[0]
        return ids[:ids.index(self.assistant_start) + 1] if self.assistant_start in ids else ids


class _Subset:
    """Some items of a Task, with its evaluate() and eval_type (what tasks/evaluate.py's runners need)."""

    def __init__(self, task, indices):
        self.task, self.indices = task, list(indices)
        self.eval_type = task.eval_type

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.task[self.indices[i]]

    def evaluate(self, conversation, response):
        return self.task.evaluate(conversation, response)


# ---------------------------------------------------------------------------------------------
# building a sequence

def _read_jsonl_texts(path):
    texts = []
    for lineno, obj in read_jsonl(path):
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected {{\"text\": ...}} or a JSON string")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


def _chat_split(name, n_train, n_eval):
    """(training conversations, evaluation Task) of a built-in chat task."""
    if name in ("arc-easy", "arc-challenge"):
        from tasks.arc import ARC
        subset = "ARC-Easy" if name == "arc-easy" else "ARC-Challenge"
        train = ARC(subset, "train")
        return [train[i] for i in range(min(n_train, len(train)))], ARC(subset, "validation")
    if name == "gsm8k":
        from tasks.gsm8k import GSM8KSynthetic
        # seeds 0 and 1 are what mid_train/chat_sft train on; these problems are new to the model
        return list(GSM8KSynthetic(size=n_train, seed=1000)), GSM8KSynthetic(size=n_eval, seed=1001)
    if name in ("spellingbee", "simplespelling"):
        from tasks.spellingbee import SimpleSpelling, SpellingBee
        cls = SpellingBee if name == "spellingbee" else SimpleSpelling
        return list(cls(size=n_train, split="train", seed=1000)), cls(size=n_eval, split="test", seed=1000)
    raise ValueError(f"unknown chat task {name!r}; expected one of {CHAT_TASKS}")


def build_sequence(spec, tokenizer, seq_len, n_train, n_eval_rows=32, n_eval_examples=100, batch_size=8,
                   max_new_tokens=64, route_prefix=ROUTE_PREFIX, data_dir=None):
    """CLTasks for a sequence spec (load_sequence_spec). n_train: training rows (lm) or conversations
    (chat) per task; n_eval_rows: held-out rows per lm task; n_eval_examples: held-out chat items; route_prefix:
    the tokens of an lm row the adapter router sees."""
    from nanochat.offline.sources import SOURCE_KIND
    if isinstance(spec, str):
        spec = load_sequence_spec(spec)
    base = spec.get("_dir", ".")  # the spec's paths are relative to its folder (os.path.join keeps absolute ones)
    tasks = []
    for t in spec["tasks"]:
        if t["type"] == "lm":
            if "jsonl" in t:
                docs = _read_jsonl_texts(os.path.join(base, t["jsonl"]))
                if "eval_jsonl" in t:
                    train_docs, eval_docs = docs, _read_jsonl_texts(os.path.join(base, t["eval_jsonl"]))
                else:
                    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
                    eval_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
            else:
                sources = list(t.get("sources", []))
                unknown_kinds = [k for k in t.get("kinds", []) if k not in SOURCE_KIND.values()]
                if unknown_kinds:
                    raise ValueError(f"task {t['name']!r}: unknown kinds {unknown_kinds}; "
                                     f"known: {sorted(set(SOURCE_KIND.values()))}")
                sources += [s for s, k in SOURCE_KIND.items() if k in t.get("kinds", [])]
                # ~8 characters per row token is plenty for any tokenizer (BPE averages ~4, bytes 1)
                budget = 8 * seq_len
                train_docs = read_domain_docs("train", sources, data_dir, max_chars=budget * n_train)
                eval_docs = read_domain_docs("val", sources, data_dir, max_chars=budget * n_eval_rows)
                if not train_docs or not eval_docs:
                    raise ValueError(f"task {t['name']!r}: no documents with source in {sources} in the "
                                     f"{'train' if not train_docs else 'validation'} shards")
            tasks.append(LMTask(t["name"], tokenizer, train_docs, eval_docs, seq_len, n_train, n_eval_rows,
                                batch_size=batch_size, route_prefix=route_prefix))
        else:
            if "jsonl" in t:
                full = JSONLTask(os.path.join(base, t["jsonl"]))
                if "eval_jsonl" in t:
                    train_convs, eval_task = list(full)[:n_train], JSONLTask(os.path.join(base, t["eval_jsonl"]))
                else:
                    n = len(full)
                    train_convs = [full[i] for i in range(n) if i % 5 != 4][:n_train]
                    eval_task = _Subset(full, [i for i in range(n) if i % 5 == 4])
            else:
                train_convs, eval_task = _chat_split(t["task"], n_train, n_eval_examples)
            tasks.append(ChatTask(t["name"], tokenizer, train_convs, eval_task, seq_len, n_eval_examples,
                                  batch_size=batch_size, max_new_tokens=t.get("max_new_tokens", max_new_tokens)))
    return tasks
