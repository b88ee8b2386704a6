"""Task: a dataset of conversations, with slicing, an eval type and a reward.

A conversation is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], ...extra}.
User and system content is a string; assistant content is a string or a list of parts
{"type": "text"|"python"|"python_output", "text": str} (python = a tool call the model writes,
python_output = what the tool answered). Multiple-choice examples carry "letters" (the valid answers)
and their assistant message is the single correct letter.
"""
import json
import random
import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def read_jsonl(path):
    """Yield (line number, parsed object) for every non-blank line of a JSONL file; a line that is not
    JSON raises ValueError naming the file, line and column."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def check_split(split, splits, what="split"):
    """The split (or subset), or a ValueError naming the ones the task has."""
    if split not in splits:
        raise ValueError(f"{what} must be one of {splits}, got {split!r}")
    return split


class Task:
    """Subclasses implement get_example(index) and num_examples() unless they hold ready conversations in self.rows;
    for evaluation, eval_type and evaluate(). start/stop/step select a slice of the examples (like range())."""

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    eval_type = None  # 'categorical' (the answer is one of conversation['letters']) or 'generative' (free text)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError(f"{type(self).__name__} is a training task: it has no evaluate()")

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, i):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """All examples of all tasks, interleaved in one fixed shuffled order (seeded), so a training
    loop sees a balanced mix. List a task twice to see it twice as often."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


# ---------------------------------------------------------------------------------------------
# multiple choice

def render_mc(question, letters, choices):
    """The user prompt of a multiple-choice question. The expected reply is one letter."""
    assert len(letters) == len(choices) >= 2, (letters, choices)
    lines = [question.strip(), ""]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)})."]
    return "\n".join(lines)


def mc_conversation(question, choices, answer_index, **extra):
    """A categorical example: the rendered question, the answer letter, and the valid letters."""
    letters = list(LETTERS[: len(choices)])
    if not 0 <= answer_index < len(choices):
        raise ValueError(f"answer index {answer_index} out of range for {len(choices)} choices")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": letters[answer_index]},
        ],
        "letters": letters,
        **extra,
    }


def parse_letter(response, letters):
    """The letter a reply picks: the reply itself ('B'), or its leading letter ('B.', 'B) ...')."""
    text = response_text(response).strip()
    m = re.match(r"[(\[]?([A-Za-z])(?![A-Za-z0-9])", text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


class MultipleChoiceTask(Task):
    """Base for categorical tasks whose examples come from mc_conversation()."""

    eval_type = "categorical"

    def evaluate(self, conversation, assistant_response):
        answer = conversation["messages"][-1]["content"]
        return int(parse_letter(assistant_response, conversation["letters"]) == answer)


# ---------------------------------------------------------------------------------------------
# helpers shared by generative tasks

def response_text(response):
    """An assistant response as plain text (a list of parts is joined)."""
    if isinstance(response, str):
        return response
    if isinstance(response, dict):  # a whole message
        return response_text(response.get("content", ""))
    return "".join(p.get("text", "") for p in response)


_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def normalize_number(s):
    """'1,234.50' -> '1234.5'; None if s is not a number."""
    from decimal import Decimal, InvalidOperation
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    d = d.normalize()
    return format(d, "f") if d != d.to_integral() else str(int(d))


def extract_final_number(text):
    """The final answer of a worked solution: the number after the last '####' if there is one,
    else the last number in the text. Commas are stripped. None if there is no number."""
    text = response_text(text)
    if "####" in text:
        m = re.search(_NUM, text.rsplit("####", 1)[1])
        return normalize_number(m.group(0)) if m else None
    nums = re.findall(_NUM, text)
    return normalize_number(nums[-1]) if nums else None
