"""The model card (README.md) of an export: metadata for the hub, how to load it, the architecture, and the
scores, data, recipe and commit read from report.md when there is one; it reads files and writes nothing.

report.md is markdown of our own making (nanochat/report.py): "## <section>" blocks of "- key: value"
lines, where a stage's flags are snake_case and its results are written as phrases ("Number of
parameters", "Mixture"), and a final "## Summary" table. The card keeps the summary table, the results of
each stage and the commit, and appends the whole report in a collapsed block, so nothing is lost.
"""
import json
import os
import re

STAGE_SECTIONS = ("Tokenizer training", "Base model training", "Midtraining", "Chat SFT", "Chat RL", "Chat DPO",
                  "Continual learning")
DATA_KEYS = ("Mixture", "Tasks", "Number of training tokens", "Training conversations")


def parse_report(text):
    """report.md -> {section title: [lines]} (the "# ..." title and preamble under "")."""
    sections, title = {"": []}, ""
    for line in text.splitlines():
        m = re.match(r"##\s+(.*\S)\s*$", line)
        if m and not line.startswith("###"):
            title = m.group(1)
            sections[title] = []
        else:
            sections[title].append(line)
    return sections


def _items(lines):
    """The "- key: value" lines of a section as (key, value) pairs."""
    return [(m.group(1), m.group(2)) for m in (re.match(r"-\s+([^:]+):\s*(.*)$", x) for x in lines) if m]


def _is_result(key):
    """A stage's results are phrases ("Number of parameters"); its flags are identifiers (num_iterations)."""
    return " " in key or key[:1].isupper()


def report_parts(text):
    """What the card shows from a report: summary table lines, {stage: [(key, value)]}, data lines, commit."""
    sections = parse_report(text)
    lines = sections.get("Summary", [])
    summary = [x for x in lines if x.startswith("|")] + ["\n" + x for x in lines if x.startswith("Total wall clock")]
    stages, data = {}, []
    for title, lines in sections.items():
        stage = next((s for s in STAGE_SECTIONS if title == s or title.startswith(s + " (")), None)
        if stage is None:
            continue
        results = [(k, v) for k, v in _items(lines) if _is_result(k)]
        stages[title] = results
        data += [f"{title}: {k}: {v}" for k, v in results if k in DATA_KEYS]
    header = "\n".join(sections.get("Environment", []) + sections.get("", []))
    m = re.search(r"-\s*commit:\s*(\S.*)", header)
    return summary, stages, data, m.group(1).strip() if m else None


def pretraining_data(base_dir):
    """A line on the pretraining shards: the offline builder's manifest names its sources."""
    path = os.path.join(base_dir, "base_data", "_SUCCESS")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        sources = manifest["sources"]
        return (f"offline corpus built from package registries: {', '.join(sorted(sources))} "
                f"({manifest.get('total_docs', '?')} documents, {manifest.get('total_bytes', 0) / 1e6:.1f} MB)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "not recorded in this base dir (the online profiles pretrain on FineWeb-Edu shards from the hub)"


def model_card(config, info, report_text=None, base_dir=None):
    """README.md text. info: repo_id (or None), license, layout, dtype, source, step, tag, adapter (or None),
    stack (merged adapters, or None), files. Valid with and without a report."""
    from huggingface_hub import ModelCardData
    repo = info.get("repo_id") or "path/to/this/folder"
    remote = info["layout"] == "remote"
    card = ModelCardData(license=info["license"], library_name="transformers", pipeline_tag="text-generation",
                         tags=["nanochat", "chat"] + (["peft", "lora"] if info.get("adapter") else []))
    load = f'AutoModelForCausalLM.from_pretrained("{repo}"{", trust_remote_code=True" if remote else ""})'
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# nanochat {info['tag']} ({info['source']}, step {info['step']})", "",
        "A chat model trained with [nanochat](https://github.com/karpathy/nanochat)'s pipeline (tokenizer, "
        "pretraining, midtraining, SFT, RL), exported for `transformers`"
        + (" with its own modeling file (the model uses something transformers' NanoChat lacks: load it with "
           "`trust_remote_code=True`)." if remote else " as a `NanoChatForCausalLM`."),
        "", "## Use it", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', f"model = {load}",
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=256, do_sample=False)",
        "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
        ("The chat template renders conversations exactly as nanochat does (a system message is folded into the "
         "first user message; an assistant message may be a list of parts `{\"type\": \"text\" | \"python\" | "
         "\"python_output\", \"text\": ...}` for calculator/python tool calls). `transformers` does not run tool "
         "calls: when the model writes `<|python_end|>`, run the code yourself and continue with its output as a "
         "`python_output` part. Text given to the template is tokenized by `transformers`, so special-token "
         "strings inside messages become special tokens there (nanochat encodes them as text)."), "",
    ]
    if info.get("adapter"):
        ad = info["adapter"]
        lines += ["## Adapter", "", (f"`{ad['path']}` holds the LoRA adapter `{ad['name']}` (rank {ad['rank']}, "
                                     f"alpha {ad['alpha']:g}) in PEFT's layout:"), "", "```python", "from peft import PeftModel",
                  f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="{ad["path"]}")', "```", ""]
    if info.get("stack"):
        lines += ["The weights have these adapters merged in: " + ", ".join(
            f"`{n}` x {w:g}" for n, w in info["stack"]) + ".", ""]
    lines += ["## Architecture", "", "| setting | value |", "|---|---|"] + [
        f"| {k} | {v} |" for k, v in (("layers", config.n_layer), ("width", config.n_embd), ("heads", config.n_head),
                                      ("key/value heads", config.n_kv_head), ("context", config.sequence_len),
                                      ("vocabulary", config.vocab_size), ("logit softcap", config.softcap or "none"),
                                      ("weights", info["dtype"]))] + [""]
    lines += _report_lines(report_text, base_dir)
    return "\n".join(lines) + "\n"


def _report_lines(report_text, base_dir):
    data_line = pretraining_data(base_dir) if base_dir else None
    if not report_text:
        return ["## Training", "", ("No report.md was found for this model, so its scores and recipe are not "
                                    "listed here.")] + ([f"Pretraining data: {data_line}."] if data_line else []) + [""]
    summary, stages, data, commit = report_parts(report_text)
    out = ["## Evaluation", ""] + (summary or ["(the report has no summary table)"]) + [""]
    out += ["## Training data", ""] + ([f"- pretraining: {data_line}"] if data_line else []) + [f"- {d}" for d in data] + [""]
    out += ["## Recipe", ""]
    for title, items in stages.items():
        out += [f"### {title}", ""] + [f"- {k}: {v}" for k, v in items] + [""]
    out += [f"Code: nanochat commit `{commit}`." if commit else "Code: commit not recorded.", "",
            "<details><summary>The full training report</summary>", "",
            re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"(figure: \1)", report_text.strip()), "", "</details>", ""]
    return out
