"""Evaluate a chat model on the chat tasks and compute ChatCORE (the CLI, the task table and the report;
the runners themselves are in tasks/evaluate.py).

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are scored from the answer-letter logits of one
forward pass; generative ones (GSM8K, HumanEval, SpellingBee) by sampling --num-samples replies
(pass@n). ChatCORE is the mean chance-centred accuracy: 0 is chance level, 1 is perfect.
Under torchrun every rank takes problems rank, rank + world, ... and the counts are summed over ranks.
-a tools runs tasks.tools.ToolsEval (math / python / facts, exact answers) twice, with the tools on
(calculator, python REPL, search over --index) and off, and measures RAG: bits per byte of held-out
documents (the validation shard) with and without the top retrieved passages in the context (a tools
reply may run TOOL_OUTPUT_ROOM tokens past -m: the tools' output counts as generated tokens). It needs
the index (`python -m scripts.build_index --shards --facts`); `all` includes it only when the index
exists. Its numbers are reported beside ChatCORE, not in it.
--task-file PATH[,PATH...] evaluates JSONL files of conversations instead (tasks.customjson.JSONLTask:
items with "letters" are categorical, the others generative: exact final number if the item has
"answer", else exact reply text). It is offline and tiny, which is what the tests use.
"""
import argparse
import functools
import importlib
import os
import time

from nanochat.checkpoint_manager import add_model_args, load_model
from nanochat.common import compute_cleanup, compute_init, get_base_dir, print0, script_argv
from nanochat.report import get_report
from tasks.customjson import JSONLTask
from tasks.evaluate import centered, chatcore, run_eval

STAGES = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL", "dpo": "DPO"}


# ---------------------------------------------------------------------------------------------
# tasks

# name -> (module, class, arguments) of the evaluation split; imported when run: building a task may fetch its data
EVAL_TASKS = {
    "ARC-Easy": ("tasks.arc", "ARC", dict(subset="ARC-Easy", split="test")),
    "ARC-Challenge": ("tasks.arc", "ARC", dict(subset="ARC-Challenge", split="test")),
    "MMLU": ("tasks.mmlu", "MMLU", dict(subset="all", split="test")),
    "GSM8K": ("tasks.gsm8k", "GSM8K", dict(split="test")),
    "HumanEval": ("tasks.humaneval", "HumanEval", {}),
    "SpellingBee": ("tasks.spellingbee", "SpellingBee", dict(size=256, split="test")),
}


def make_task(name):
    module, cls, kwargs = EVAL_TASKS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)


ALL_TASKS = list(EVAL_TASKS)
TOOLS = "tools"
TOOL_OUTPUT_ROOM = 256  # tokens of tool output a tools reply may hold beyond --max-new-tokens


def format_table(results):
    rows = [f"{'task':<16} {'accuracy':>9} {'correct':>9} {'chance':>7} {'centred':>8}"]
    for name, r in results.items():
        rows.append(f"{name:<16} {r['accuracy']:>9.4f} {r['correct']:>4}/{r['total']:<4} {r['chance']:>7.3f} "
                    f"{centered(r['accuracy'], r['chance']):>8.4f}")
    rows.append(f"{'ChatCORE':<16} {chatcore(results):>9.4f}  (mean centred accuracy over {len(results)} tasks)")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, sources=list(STAGES))
    p.add_argument("-a", "--task-name", default="all",
                   help=f"'all' or names joined by '|': {'|'.join(ALL_TASKS + [TOOLS])}")
    p.add_argument("--task-file", default="",
                   help="evaluate these JSONL files of conversations (comma-separated) instead of -a")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="generative: samples per problem (pass@n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical: problems per forward pass")
    p.add_argument("--index", default="", help="tools: the search index (default <base>/search_index)")
    p.add_argument("--rag-docs", type=int, default=32, help="tools: held-out documents for the RAG bpb (0: skip)")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="run HumanEval's and the python tool's generated code even without the bubblewrap sandbox "
                        "(Python-level guards only)")
    return p.parse_args(script_argv(argv))


def check_code_execution(unsafe_exec, what="HumanEval"):
    """HumanEval and the python tool run the model's code: say once how it is contained, and stop before
    any work when it can't be."""
    from nanochat.sandbox import boundary as sandbox
    if unsafe_exec:
        sandbox.allow_unsafe_exec()
    policy, message = sandbox.exec_policy()
    print0(f"{what}: {message}")
    if policy == "refuse":
        raise SystemExit(f"{what}: {message}")


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None)
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step,
                                        dtype=args.dtype)
    engine = Engine(model, tokenizer, tools=ToolRegistry())

    tools_index = None
    if args.task_file:
        paths = args.task_file.split(",")
        tasks = {os.path.splitext(os.path.basename(p))[0]: (lambda p=p: JSONLTask(p)) for p in paths}
    else:
        names = ALL_TASKS + [TOOLS] if args.task_name == "all" else args.task_name.split("|")
        unknown = [n for n in names if n not in EVAL_TASKS and n != TOOLS]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; choose from {ALL_TASKS + [TOOLS]} or 'all'")
        tasks = {n: functools.partial(make_task, n) for n in names if n != TOOLS}
        if TOOLS in names:
            tools_index = args.index or os.path.join(get_base_dir(), "search_index")
            if not os.path.exists(tools_index) and args.task_name == "all":
                print0(f"tools: skipped, no search index at {tools_index} "
                       "(python -m scripts.build_index --shards --facts)")
                tools_index = None
            if tools_index is not None:
                check_code_execution(args.unsafe_exec, "tools (python)")
        if "HumanEval" in tasks:
            check_code_execution(args.unsafe_exec)

    results = {}
    for name, make in tasks.items():
        t0 = time.time()
        task = make()
        r = run_eval(task, model, tokenizer, engine, batch_size=args.batch_size, num_samples=args.num_samples,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     max_problems=args.max_problems, rank=rank, world_size=world_size, device=device)
        results[name] = r
        print0(f"{name}: {r['correct']}/{r['total']} = {100 * r['accuracy']:.2f}% ({time.time() - t0:.1f}s)")
    tools = None if tools_index is None else run_tools(args, model, tokenizer, tools_index, rank, world_size, device)

    data, summary = [vars(args)], {}
    if results:
        table = format_table(results)
        print0(table)
        score = chatcore(results)
        summary = {name: r["accuracy"] for name, r in results.items()}
        summary["ChatCORE"] = score
        data += [{name: f"{r['accuracy']:.4f} ({r['correct']}/{r['total']}, chance {r['chance']:.3f})"
                  for name, r in results.items()},
                 {"ChatCORE": score}, "```\n" + table + "\n```"]
    if tools is not None:
        table = format_tools_table(tools)
        print0(table)
        for mode in ("on", "off"):
            rs = [r for (g, m), r in tools["groups"].items() if m == mode]
            summary[f"Tools ({mode})"] = sum(r["correct"] for r in rs) / max(1, sum(r["total"] for r in rs))
        data += ["Tools (tasks.tools.ToolsEval, exact answer; on = calculator + python + search):",
                 "```\n" + table + "\n```"]
        results["tools"] = tools
    if rank == 0:
        get_report().log(section=f"Chat evaluation {args.source}", stage=STAGES[args.source],
                         summary=summary, data=data)
    compute_cleanup()
    return results


def run_tools(args, model, tokenizer, index, rank, world_size, device):
    """ToolsEval per group with the tools on and off, and the RAG bpb (rank 0). -> {"groups": {(group,
    "on"|"off"): run_eval result}, "rag": rag_bpb result or None}."""
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    from nanochat.tools.search import Searcher
    from tasks.tools import GROUPS, ToolsEval
    try:
        searcher = Searcher(index)
    except FileNotFoundError as e:
        raise SystemExit(f"chat_eval -a tools: {e}") from None
    engines = {"on": Engine(model, tokenizer, tools=ToolRegistry(searcher=searcher)),
               "off": Engine(model, tokenizer)}
    # The engine counts the tool's output (forced tokens) against max_tokens, and two search passages are
    # ~150 tokens: without this room a reply cut at -m 128 ended inside the passage, before any answer.
    # Both modes get it, so the comparison stays fair.
    max_tokens = args.max_new_tokens + TOOL_OUTPUT_ROOM
    groups = {}
    for group in GROUPS:
        task = ToolsEval(group=group)
        for mode, engine in engines.items():
            t0 = time.time()
            r = run_eval(task, model, tokenizer, engine, num_samples=args.num_samples, max_new_tokens=max_tokens,
                         temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems, rank=rank,
                         world_size=world_size, device=device)
            groups[(group, mode)] = r
            print0(f"tools/{group} ({mode}): {r['correct']}/{r['total']} = {100 * r['accuracy']:.2f}% "
                   f"({time.time() - t0:.1f}s)")
    rag = None
    if args.rag_docs > 0 and rank == 0:
        rag = run_rag(model, tokenizer, searcher, args.rag_docs, device)
    return {"groups": groups, "rag": rag}


def run_rag(model, tokenizer, searcher, n_docs, device):
    """rag_bpb over the first n_docs documents of the validation shard (which build_index --shards leaves
    out of the index); None, with a line saying why, when there are no shards."""
    from nanochat.dataset import parquets_iter_batched
    from nanochat.loss_eval import rag_bpb
    from nanochat.tokenizer import get_token_bytes
    try:
        docs = []
        for batch in parquets_iter_batched("val"):
            docs.extend(batch)
            if len(docs) >= n_docs:
                break
    except FileNotFoundError as e:
        print0(f"RAG bpb: skipped ({e})")
        return None
    retrieve = lambda q: "\n".join(text for _, _, text in searcher.search(q, k=2))  # noqa: E731
    return rag_bpb(model, tokenizer, docs[:n_docs], retrieve, get_token_bytes(device))


def format_tools_table(tools):
    from tasks.tools import GROUPS
    rows = [f"{'group':<8} {'tools on':>9} {'tools off':>10} {'gain':>7} {'problems':>9}"]
    for g in GROUPS:
        on, off = tools["groups"][(g, "on")], tools["groups"][(g, "off")]
        rows.append(f"{g:<8} {on['accuracy']:>9.4f} {off['accuracy']:>10.4f} "
                    f"{on['accuracy'] - off['accuracy']:>+7.4f} {on['total']:>9}")
    rag = tools.get("rag")
    if rag:
        rows.append(f"RAG bpb on {rag['documents']} held-out documents: {rag['bpb_without']:.4f} without retrieval, "
                    f"{rag['bpb_with']:.4f} with the top-2 passages ({rag['bpb_with'] - rag['bpb_without']:+.4f})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
