"""Learn a sequence of tasks with each continual-learning strategy and save the R matrices, one JSON file per
strategy; turning them into the report section is scripts/continual_eval.py's job.

    python -m scripts.continual_train                                # sft model, lm-domains, all strategies
    python -m scripts.continual_train -i base --strategies naive,lora --steps 20
    python -m scripts.continual_train --sequence chat-tasks
    python -m scripts.continual_train --sequence path/to/my_sequence.json

Every strategy starts from the same model (-i: base, mid, sft or rl checkpoint) and learns the tasks
of --sequence (tasks/sequences/*.json or a path; see tasks/continual.py) in order; after each task
every task is evaluated (nanochat/continual/loop.py explains the strategies, metrics and signs).
Results go to $NANOCHAT_BASE_DIR/continual/<sequence>/<strategy>.json (written atomically, one file
per strategy as soon as it finishes); --resume skips strategies whose file exists with the same
settings. lora's adapters are saved under .../<sequence>/adapters/ with --save-adapters.
scripts/continual_eval.py turns the results into the report section.
"""
import argparse
import json
import os
import time

from nanochat.checkpoint_manager import add_model_args, load_model
from nanochat.common import atomic_write, compute_init, get_base_dir, print0, script_argv
from nanochat.continual.loop import STRATEGIES, ContinualConfig, evaluate_tasks, run_strategy


def parse_args(argv=None):
    d = ContinualConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, sources=["base", "mid", "sft", "rl", "dpo"], source="sft")
    p.add_argument("--sequence", default="lm-domains", help="a name in tasks/sequences/ or a path to a JSON file")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {','.join(STRATEGIES)}")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training/eval row (<= the model's context)")
    p.add_argument("--train-rows", type=int, default=-1, help="training rows (lm) / conversations (chat) per task; "
                   "-1: steps x batch size (one pass)")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows per lm task")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out items per chat task")
    p.add_argument("--max-new-tokens", type=int, default=64, help="chat: reply length cap for generative tasks")
    for name, val in vars(d).items():  # every ContinualConfig field is a flag: --steps, --ewc-lambda, ...
        if name == "router":
            continue
        # bool("0") is True, so booleans get their own parser
        kind = type(val) if not isinstance(val, bool) else (lambda s: s.lower() in ("1", "true", "yes"))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=val)
    p.add_argument("--no-router", action="store_true", help="lora: skip the task-agnostic (router) evaluation")
    p.add_argument("--out", default="", help="results directory (default <base>/continual/<sequence>)")
    p.add_argument("--save-adapters", action="store_true", help="lora: save each task's adapter")
    p.add_argument("--resume", action="store_true", help="skip strategies already done with the same settings")
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type or None, seed=args.seed)
    from tasks.continual import ROUTE_PREFIX, build_sequence, load_sequence_spec

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    cfg_fields = {k: getattr(args, k) for k in vars(ContinualConfig()) if k != "router"}
    cfg = ContinualConfig(**cfg_fields, router=not args.no_router)

    spec = load_sequence_spec(args.sequence)
    out_dir = args.out or os.path.join(get_base_dir(), "continual", spec["name"])
    os.makedirs(out_dir, exist_ok=True)

    model, tokenizer, meta = load_model(args.source, device, "train", model_tag=args.model_tag, step=args.step,
                                        dtype=args.dtype)
    if args.seq_len + 1 > model.config.sequence_len:
        raise SystemExit(f"--seq-len {args.seq_len} + 1 exceeds the model's context ({model.config.sequence_len})")
    n_train = args.train_rows if args.train_rows > 0 else cfg.steps * cfg.batch_size
    t0 = time.time()
    tasks = build_sequence(spec, tokenizer, args.seq_len, n_train, n_eval_rows=args.eval_rows,
                           n_eval_examples=args.eval_examples, max_new_tokens=args.max_new_tokens)
    print0(f"sequence {spec['name']}: " + ", ".join(f"{t.name} ({len(t.train_rows)} train / {len(t.eval_items)} eval)"
                                                   for t in tasks) + f" | built in {time.time() - t0:.1f}s")
    settings = {"source": args.source, "model_tag": args.model_tag, "step": meta.get("step"), "sequence": spec["name"],
                "seq_len": args.seq_len, "train_rows": n_train, "eval_rows": args.eval_rows,
                "eval_examples": args.eval_examples, "max_new_tokens": args.max_new_tokens,
                "route_prefix": ROUTE_PREFIX, "device": device.type}

    # the starting model's scores are shared by every strategy (and computed once)
    base_path = os.path.join(out_dir, "base.json")
    base = None
    if args.resume and os.path.exists(base_path):
        with open(base_path) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            base = saved["base"]
    if base is None:
        t0 = time.time()
        base = evaluate_tasks(model, tasks)
        print0(f"starting model ({args.source}): " + " | ".join(f"{t.name} {v:.4f}" for t, v in zip(tasks, base))
               + f" ({tasks[0].metric}, {time.time() - t0:.1f}s)")
        with atomic_write(base_path, "w") as f:
            json.dump({"settings": settings, "base": base, "tasks": [t.name for t in tasks]}, f, indent=1)

    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for strategy in strategies:
        path = os.path.join(out_dir, f"{strategy}.json")
        if args.resume and os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if done.get("settings") == settings and done.get("config") == json.loads(json.dumps(vars(cfg))):
                print0(f"{strategy}: done already ({path}), skipping")
                continue
        model.load_state_dict(initial)
        print0(f"=== {strategy} ===")
        adapter_dir = os.path.join(out_dir, "adapters") if args.save_adapters else None
        result = run_strategy(model, tokenizer, tasks, strategy, cfg, base=base, adapter_dir=adapter_dir)
        result.update(settings=settings, sequence=spec["name"], description=spec.get("description", ""))
        with atomic_write(path, "w") as f:
            json.dump(result, f, indent=1)
        for name, m in result["matrices"].items():
            print0(f"{name}: ACC {m['ACC']:.4f} | LA {m['LA']:.4f} | BWT {m['BWT']:+.4f} | FWT {m['FWT']:+.4f} | "
                   f"forgetting {m['forgetting']:+.4f} | added {result['added_params']:,} params, "
                   f"{result['added_bytes']:,} bytes | {result['wall_seconds']:.0f}s")
    model.load_state_dict(initial)
    print0(f"results in {out_dir}; next: python -m scripts.continual_eval --sequences {spec['name']}")


if __name__ == "__main__":
    main()
