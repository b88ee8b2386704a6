"""Evaluate a chat model on the chat tasks and compute ChatCORE (the CLI, the task table and the report;
the runners themselves are in tasks/evaluate.py).

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are scored from the answer-letter logits of one
forward pass; generative ones (GSM8K, HumanEval, SpellingBee) by sampling --num-samples replies
(pass@n). ChatCORE is the mean chance-centred accuracy: 0 is chance level, 1 is perfect.
Under torchrun every rank takes problems rank, rank + world, ... and the counts are summed over ranks.
--task-file PATH[,PATH...] evaluates JSONL files of conversations instead (tasks.customjson.JSONLTask:
items with "letters" are categorical, the others generative: exact final number if the item has
"answer", else exact reply text). It is offline and tiny, which is what the tests use.
"""
import argparse
import os
import time

import torch.distributed as dist

from nanochat.common import resolve_dtype, script_argv, compute_cleanup, compute_init, print0
from tasks.customjson import JSONLTask
from tasks.evaluate import centered, chatcore, run_eval

STAGES = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL", "dpo": "DPO"}


# ---------------------------------------------------------------------------------------------
# tasks

def _task_factories():
    """name -> a function building the evaluation split of the task (imports are lazy: building a
    task may read or fetch its data)."""
    def arc(subset):
        def make():
            from tasks.arc import ARC
            return ARC(subset=subset, split="test")
        return make

    def mmlu():
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")

    def gsm8k():
        from tasks.gsm8k import GSM8K
        return GSM8K(split="test")

    def humaneval():
        from tasks.humaneval import HumanEval
        return HumanEval()

    def spellingbee():
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")

    return {"ARC-Easy": arc("ARC-Easy"), "ARC-Challenge": arc("ARC-Challenge"), "MMLU": mmlu,
            "GSM8K": gsm8k, "HumanEval": humaneval, "SpellingBee": spellingbee}


ALL_TASKS = list(_task_factories())


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
    p.add_argument("-i", "--source", required=True, choices=list(STAGES), help="which stage's model to load")
    p.add_argument("-a", "--task-name", default="all", help=f"'all' or names joined by '|': {'|'.join(ALL_TASKS)}")
    p.add_argument("--task-file", default="", help="evaluate these JSONL files of conversations (comma-separated) instead of -a")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="generative: samples per problem (pass@n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical: problems per forward pass")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--unsafe-exec", action="store_true",
                   help="run HumanEval's generated code even without the bubblewrap sandbox (Python-level guards only)")
    return p.parse_args(script_argv(argv))


def check_code_execution(unsafe_exec):
    """HumanEval runs the model's code: say once how it is contained, and stop before any work when it can't be."""
    from nanochat import sandbox
    if unsafe_exec:
        sandbox.allow_unsafe_exec()
    policy, message = sandbox.exec_policy()
    print0(f"HumanEval: {message}")
    if policy == "refuse":
        raise SystemExit(f"HumanEval: {message}")


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None)
    dtype = resolve_dtype(args.dtype, device.type)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    if args.task_file:
        paths = args.task_file.split(",")
        tasks = {os.path.splitext(os.path.basename(p))[0]: (lambda p=p: JSONLTask(p)) for p in paths}
    else:
        factories = _task_factories()
        names = ALL_TASKS if args.task_name == "all" else args.task_name.split("|")
        unknown = [n for n in names if n not in factories]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; choose from {ALL_TASKS} or 'all'")
        tasks = {n: factories[n] for n in names}
        if "HumanEval" in tasks:
            check_code_execution(args.unsafe_exec)

    results = {}
    for name, make in tasks.items():
        t0 = time.time()
        task = make()
        r = run_eval(task, model, tokenizer, engine, batch_size=args.batch_size, num_samples=args.num_samples,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     max_problems=args.max_problems, rank=rank, world_size=world_size, dtype=dtype, device=device)
        results[name] = r
        print0(f"{name}: {r['correct']}/{r['total']} = {100 * r['accuracy']:.2f}% ({time.time() - t0:.1f}s)")

    table = format_table(results)
    print0(table)
    score = chatcore(results)
    if rank == 0:
        from nanochat.report import get_report
        summary = {name: r["accuracy"] for name, r in results.items()}
        summary["ChatCORE"] = score
        get_report().log(section=f"Chat evaluation {args.source}", stage=STAGES[args.source], summary=summary, data=[
            vars(args),
            {name: f"{r['accuracy']:.4f} ({r['correct']}/{r['total']}, chance {r['chance']:.3f})" for name, r in results.items()},
            {"ChatCORE": score},
            "```\n" + table + "\n```",
        ])
    if ddp:
        dist.barrier()  # nobody tears gloo down while another rank still works (it can abort at exit)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
