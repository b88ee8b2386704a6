"""CustomJSON and JSONLTask: your own conversations from a JSONL file, to train on or to evaluate;
this module reads and checks the file, it does not tokenize.

Each non-empty line is either a list of messages or an object {"messages": [...], ...}. A message is
{"role": "system"|"user"|"assistant", "content": ...}: an optional system message first, then user
and assistant alternating, starting with the user and ending with the assistant. Content is a string;
the assistant's may also be a list of parts {"type": "text"|"python"|"python_output", "text": str}.
Every error names the file and line.
"""
from nanochat.tokenizer import validate_messages as validate_chat
from tasks.common import Task, extract_final_number, normalize_number, parse_letter, read_jsonl, response_text


def validate_messages(messages):
    """Raise ValueError (without location) if `messages` is not a conversation to train on: a valid chat
    (nanochat.tokenizer.validate_messages) that ends with the assistant's reply."""
    if not isinstance(messages, list):
        raise ValueError("expected a non-empty list of messages")
    validate_chat(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be from the assistant")


def load_jsonl(path):
    conversations = []
    for lineno, obj in read_jsonl(path):
        conv = obj if isinstance(obj, dict) else {"messages": obj}
        try:
            if isinstance(obj, dict) and "messages" not in obj:
                raise ValueError("object has no 'messages' key")
            validate_messages(conv["messages"])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        conversations.append(conv)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.rows = load_jsonl(filepath)

    eval_type = "generative"


class JSONLTask(Task):
    """Conversations from a JSONL file (the format above), with an evaluate(): items carrying
    "letters" are multiple choice (answer = the last assistant message's letter); the others are
    generative, scored by exact final number when the item has "answer", else by exact reply text."""

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.rows = load_jsonl(filepath)
        kinds = {"letters" in c for c in self.rows}
        if len(kinds) > 1:
            raise ValueError(f"{filepath}: mixes multiple-choice items (with 'letters') and generative ones")
        self._categorical = kinds.pop()

    @property
    def eval_type(self):
        return "categorical" if self._categorical else "generative"

    def evaluate(self, conversation, assistant_response):
        reference = conversation["messages"][-1]["content"]
        if self._categorical:
            return int(parse_letter(assistant_response, conversation["letters"]) == reference)
        if "answer" in conversation:
            pred = extract_final_number(assistant_response)
            return int(pred is not None and pred == normalize_number(str(conversation["answer"])))
        return int(response_text(assistant_response).strip() == response_text(reference).strip())

    reward = evaluate
