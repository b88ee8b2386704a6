"""Direct Preference Optimization (DPO) of the chat model against a frozen copy of itself.

    python -m scripts.chat_dpo
    python -m scripts.chat_dpo -- --pairs my_pairs.jsonl --loss ipo
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_dpo

1. Pairs. By default from problems with checkable answers (offline: template GSM8K-style problems and
   SpellingBee; --online: the GSM8K train split): --num-samples replies per problem are sampled with the
   engine (calculator on), chosen = a correct reply, rejected = a wrong one; problems where all or none
   are correct are dropped. The problems are spread over the ranks. --pairs FILE uses your own pairs
   instead (format: tasks/preference.py).
2. Reference. The starting model is the reference: before the first step it scores every pair once, and
   the pairs with those log-probs go to chatdpo_checkpoints/<tag>/pairs.jsonl, so --resume neither
   samples nor scores again (and no second model is held in memory).
3. Training. Each step takes --pairs-per-step pairs (all ranks) in a per-epoch shuffle that depends only
   on the step; the loss is sigmoid DPO or IPO (--loss, --beta) over sequence log-probs of the reply
   tokens (nanochat/dpo.py). The LR decays linearly to 0. --val-pairs held-out pairs give the margin
   on pairs never trained on.
pass@1 on the first --eval-problems GSM8K test problems (the same measure as chat_rl) is taken before
and after. Checkpoints (with optimizer and RNG state, for an exact --resume) go to chatdpo_checkpoints/<tag>/.
"""
import argparse
import hashlib
import os
import time

import torch

from nanochat.common import all_reduce, compute_cleanup, get_base_dir, print0, script_argv
from nanochat.dpo import LOSSES, pair_logprobs, preference_loss, reference_logprobs, render_pair
from nanochat.report import subplots
from nanochat.training import (StepLog, add_training_args, checkpoint_meta, eval_due, gather_objects, init_wandb,
                               load_start_model, make_optimizers, optimizer_step, resume_or_start_fresh, save_due,
                               save_training_checkpoint, start_run)
from scripts.chat_rl import evaluate_pass_at_k
from scripts.chat_sft import step_examples
from tasks.preference import PROBLEM_SETS, problem_tasks, read_pairs, sample_pairs, write_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help="model to start from (and the reference)")
    p.add_argument("--step", type=int, default=-1, help="step of the source model (default: latest)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="all LRs are scaled by this (then decay to 0)")
    # pairs
    p.add_argument("--pairs", default="", help="JSONL of {prompt, chosen, rejected} pairs to train on instead of "
                   "sampling")
    p.add_argument("--problems", default="gsm8k-synthetic,spellingbee",
                   help=f"problem sets to sample pairs from: {', '.join(PROBLEM_SETS)}")
    p.add_argument("--online", action="store_true", help="sample pairs on the GSM8K train split (hub): same as "
                   "--problems gsm8k")
    p.add_argument("--num-problems", type=int, default=512, help="problems to sample (all ranks together)")
    p.add_argument("--train-size", type=int, default=100_000, help="size of the generated problem sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-file", default="", help=argparse.SUPPRESS)  # test aid: JSONL problems for sampling AND eval
    p.add_argument("--num-samples", type=int, default=8, help="replies sampled per problem")
    p.add_argument("--pairs-per-problem", type=int, default=2, help="at most this many pairs per problem")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    # the loss and the batch
    p.add_argument("--loss", default="sigmoid", choices=LOSSES, help="sigmoid = DPO, ipo = IPO")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    p.add_argument("--pairs-per-step", type=int, default=16, help="pairs per optimizer step, all ranks together")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs over the pairs when --num-iterations is -1")
    # evaluation
    p.add_argument("--val-pairs", type=int, default=32, help="pairs held out for the validation margin (at most a "
                   "tenth)")
    p.add_argument("--eval-every", type=int, default=-1, help="validation margin and pass@k every N steps; <=0: "
                   "before/after only")
    p.add_argument("--eval-problems", type=int, default=100, help="GSM8K test problems for pass@k (0: none)")
    p.add_argument("--eval-samples", type=int, default=4, help="k for pass@k")
    # --device-batch-size counts pairs (2 rows each); --max-seq-len 0 = the model's context; LR decays linearly to 0
    p.set_defaults(device_batch_size=4, max_seq_len=0, warmdown_ratio=1.0)
    return p.parse_args(script_argv(argv))


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def make_pairs(args, model, tokenizer, engine, T, run):
    """Sample (or read) the pairs and score them with the reference (the model as loaded). Every rank
    returns all pairs, in an order that does not depend on the number of ranks."""
    stats = None
    if args.pairs:
        try:
            pairs = read_pairs(args.pairs)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--pairs: {e}") from None
        print0(f"pairs: {len(pairs):,} from {args.pairs}")
    else:
        if args.task_file:
            from tasks.customjson import JSONLTask
            task = JSONLTask(args.task_file)
        else:
            task = problem_tasks(["gsm8k"] if args.online else args.problems.split(","), args.train_size, args.seed)
        n = min(args.num_problems, len(task))
        t0 = time.time()
        model.eval()
        with run.autocast():
            mine, stats = sample_pairs(task, range(run.rank, n, run.world_size), engine, tokenizer, args.num_samples,
                                       args.max_new_tokens, args.temperature, args.top_k, 1_000_003 * (args.seed + 1),
                                       args.pairs_per_problem)
        pairs = sorted((p for part in gather_objects(mine, run.world_size) for p in part), key=lambda p: p["problem"])
        stats = {k: sum(s[k] for s in gather_objects(stats, run.world_size)) for k in stats}
        stats["mean_reward"] = stats["reward_sum"] / max(1, stats["samples"])
        stats["sampling_s"] = time.time() - t0
        print0(f"pairs: {len(pairs):,} from {n} problems x {args.num_samples} samples | mean reward "
               f"{stats['mean_reward']:.3f} | dropped: {stats['all_correct']} all correct, {stats['none_correct']} "
               f"none correct, {stats['too_long']} too long | {stats['sampling_s']:.0f}s")
        if not pairs:
            raise SystemExit("no pairs: every problem had all or none of its samples correct. Sample more problems "
                             "(--num-problems), more replies (--num-samples), or give --pairs FILE")
    pad_id = tokenizer.get_bos_token_id()
    rendered = []
    for i in range(run.rank, len(pairs), run.world_size):
        try:
            rendered.append(render_pair(tokenizer, pairs[i], T + 1))
        except ValueError as e:
            raise SystemExit(f"pair {i + 1}: {e} (--max-seq-len {T}); shorten it or drop it") from None
    refs = reference_logprobs(model, rendered, pad_id, run.device, args.device_batch_size, run.dtype)
    refs = gather_objects(refs, run.world_size)
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = refs[i % run.world_size][i // run.world_size]
        p["ref_max_tokens"] = T + 1
    return pairs, stats


def save_margin_plot(history, path_fn):
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 4))
    if history:
        steps = [h["step"] for h in history]
        ax1.plot(steps, [h["margin"] for h in history], label="margin (chosen - rejected reward)")
        ax1.plot(steps, [h["chosen"] for h in history], label="chosen reward")
        ax1.plot(steps, [h["rejected"] for h in history], label="rejected reward")
        ax1.legend(fontsize=8)
        ax2.plot(steps, [h["accuracy"] for h in history])
    ax1.set_xlabel("step")
    ax1.set_title("implicit rewards (train pairs)")
    ax2.set_xlabel("step")
    ax2.set_title("reward accuracy (chosen > rejected)")
    path = path_fn(fig, "chat_dpo_margin.png")
    return path


def pairs_pass(model, tokenizer, pairs, T, args, run, train):
    """Loss and implicit rewards over `pairs` (this rank's share), --device-batch-size pairs per forward; with
    train=True the loss, averaged over the pairs, is backpropagated. -> sums over the pairs of [loss, margin,
    chosen ranked first, chosen reward, rejected reward, count, tokens processed]."""
    sums = [0.0] * 7
    for b in range(0, len(pairs), args.device_batch_size):
        chunk = pairs[b:b + args.device_batch_size]
        rendered = [render_pair(tokenizer, p, T + 1) for p in chunk]
        with torch.set_grad_enabled(train), run.autocast():
            pc, pr = pair_logprobs(model, rendered, tokenizer.get_bos_token_id(), run.device)
        ref_c = torch.tensor([p["ref_chosen"] for p in chunk], dtype=torch.float32, device=run.device)
        ref_r = torch.tensor([p["ref_rejected"] for p in chunk], dtype=torch.float32, device=run.device)
        loss, cr, rr = preference_loss(pc, pr, ref_c, ref_r, args.beta, args.loss)
        if train:
            (loss.sum() / len(pairs)).backward()  # the mean over this rank's pairs; the optimizers average over ranks
        tokens = 2 * len(chunk) * max(len(ids) - 1 for side in rendered for ids, _ in side)
        for j, v in enumerate([loss.sum(), (cr - rr).sum(), (cr > rr).sum(), cr.sum(), rr.sum(), len(chunk), tokens]):
            sums[j] += float(v)
    return sums


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    run = start_run(args.device_type, args.dtype, "off", seed=42 + args.seed)  # pair lengths vary: no compile
    if args.pairs_per_step % run.world_size:
        raise SystemExit(f"--pairs-per-step {args.pairs_per_step} must be a multiple of the number of ranks "
                         f"({run.world_size})")
    wandb_run = init_wandb(run, args.run, "nanochat-dpo", user_config)

    # --- the model: the source stage's, or this stage's latest checkpoint --------------------------------
    from nanochat.checkpoint_manager import SOURCES, complete_steps, find_largest_model
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    src_dir = os.path.join(get_base_dir(), SOURCES[args.source][0])
    tag = args.model_tag
    if not tag:
        try:
            tag = find_largest_model(src_dir)  # the output keeps the source's tag
        except FileNotFoundError as e:
            raise SystemExit(f"{e}. No {args.source} model to start from: run `python -m {SOURCES[args.source][1]}` "
                             "first (or pick another --source)") from None
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["dpo"][0], tag)
    pairs_path = os.path.join(checkpoint_dir, "pairs.jsonl")
    # --resume continues the last checkpoint; killed before the first one, it still reuses the scored pairs
    resume = args.resume and bool(complete_steps(checkpoint_dir))
    if args.resume and not resume and not os.path.exists(pairs_path):
        raise SystemExit(f"--resume: nothing to resume in {checkpoint_dir} (no checkpoint, no pairs); run without "
                         "--resume")
    model, tokenizer, tag, checkpoint_dir, start_step, rank_state, resume_meta = load_start_model(
        argparse.Namespace(**{**vars(args), "resume": resume, "model_tag": tag}), args.source, SOURCES["dpo"][0], run)
    if resume:
        source_meta = resume_meta["source"]
    else:
        source_meta = {"stage": args.source, "tag": tag,
                       "step": args.step if args.step >= 0 else complete_steps(os.path.join(src_dir, tag))[-1]}
    config = model.config
    T = args.max_seq_len or config.sequence_len
    engine = Engine(model, tokenizer, tools=ToolRegistry())
    optimizers = make_optimizers(model, args, args.init_lr_frac)
    print0(f"model: {source_meta['stage']}/{tag} step {source_meta['step']} | {config.n_layer} layers | "
           f"{model.num_params():,} parameters | dtype {run.dtype} | loss {args.loss} beta {args.beta}")
    if not args.resume:
        resume_or_start_fresh(False, checkpoint_dir, model, optimizers, {}, run)  # earlier checkpoints (and pairs) aside

    # --- pairs, scored once by the reference (the model as loaded, before any step) ---------------------
    sample_stats = resume_meta["sample_stats"] if resume else None
    if args.resume:
        pairs = read_pairs(pairs_path)
        if any(p.get("ref_max_tokens") != T + 1 for p in pairs):
            raise SystemExit(f"{pairs_path} was scored with a different --max-seq-len; resume with the same one")
        print0(f"pairs: {len(pairs):,} from {pairs_path} (reference log-probs cached)")
    else:
        pairs, sample_stats = make_pairs(args, model, tokenizer, engine, T, run)
        if run.master:
            write_pairs(pairs_path, pairs)
        if run.ddp:
            torch.distributed.barrier()
    pairs_sha = file_sha(pairs_path)
    n_val = min(args.val_pairs, len(pairs) // 10) if args.val_pairs > 0 else 0
    train_pairs, val_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, args.num_epochs * len(train_pairs) // args.pairs_per_step)
    print0(f"train pairs: {len(train_pairs):,} | val pairs: {n_val} | steps: {num_iterations} x {args.pairs_per_step} "
           f"pairs ({num_iterations * args.pairs_per_step / len(train_pairs):.2f} epochs)")
    if args.task_file:
        from tasks.customjson import JSONLTask
        eval_task = JSONLTask(args.task_file)
    else:
        from tasks.gsm8k import GSM8K
        eval_task = GSM8K(split="test") if args.eval_problems > 0 else None

    loop = {"history": [], "evals": []}
    if resume:
        resume_or_start_fresh(True, checkpoint_dir, model, optimizers, loop, run, rank_state, resume_meta,
                              {"world_size": run.world_size, "pairs_per_step": args.pairs_per_step,
                               "device_batch_size": args.device_batch_size, "max_seq_len": T, "pairs_sha": pairs_sha,
                               "loss": args.loss, "beta": args.beta}, num_iterations)
    log = StepLog(run, num_iterations, start_step, loop, args.loss_file, wandb_run, model.estimate_flops(),
                  args.peak_flops)
    k = args.eval_samples

    def evaluate(step):
        model.eval()
        s = all_reduce(pairs_pass(model, tokenizer, val_pairs[run.rank::run.world_size], T, args, run, False),
                       run.device)
        e = {"step": step, "val margin": s[1] / max(1, s[5]), "val accuracy": s[2] / max(1, s[5])}
        if eval_task is not None and args.eval_problems > 0:
            e["pass@1"], e[f"pass@{k}"] = evaluate_pass_at_k(
                eval_task, args.eval_problems, engine, tokenizer, k, args.max_new_tokens, 1.0, args.top_k,
                config.sequence_len, run.rank, run.world_size, run.device, run.autocast(), seed=10_000)
        model.train()
        log.eval(step, {name: v for name, v in e.items() if name != "step"})
        return e

    step = start_step
    while True:
        last_step = step == num_iterations
        resumed_here = resume and step == start_step
        if (step == 0 and not resumed_here) or eval_due(step, args.eval_every, last_step, resumed_here):
            loop["evals"].append(evaluate(step))
        if save_due(step, args.save_every, last_step, args.stop_after, resumed_here):
            meta = checkpoint_meta(step, model, user_config, run, num_iterations, {"step": step}, loop,
                                   source=source_meta, pairs_per_step=args.pairs_per_step,
                                   device_batch_size=args.device_batch_size, max_seq_len=T, pairs_sha=pairs_sha,
                                   num_pairs=len(pairs), loss=args.loss, beta=args.beta, sample_stats=sample_stats,
                                   **{"pass@1": loop["evals"][-1].get("pass@1")})
            save_training_checkpoint(checkpoint_dir, step, model, optimizers, meta, run.rank, args.keep_last)
        if last_step or step == args.stop_after:
            break

        # --- one optimizer step over this rank's share of the step's pairs (the order depends only on the step)
        t0 = time.time()
        mine = [train_pairs[i] for i in step_examples(step, args.pairs_per_step, len(train_pairs), run.rank,
                                                      run.world_size)]
        s = all_reduce(pairs_pass(model, tokenizer, mine, T, args, run, True), run.device)
        lrm = optimizer_step(model, optimizers, step, num_iterations, args)
        n = s[5]
        h = {"margin": s[1] / n, "accuracy": s[2] / n, "chosen": s[3] / n, "rejected": s[4] / n}
        loop["history"].append({"step": step, **h})
        log.step(step, s[0] / n, lrm, time.time() - t0, int(s[6]), h)
        step += 1
    log.close()

    if run.master and step == num_iterations:
        from nanochat.report import get_report
        report = get_report()
        plot = save_margin_plot(loop["history"], report.save_plot)
        before, after = loop["evals"][0], loop["evals"][-1]
        summary = {"GSM8K pass@1": after["pass@1"]} if "pass@1" in after else {}
        report.log(section="Chat DPO", stage="DPO", summary=summary, data=[user_config, {
                       "Source": f"{source_meta['stage']}/{tag} step {source_meta['step']}",
                       "Pairs": f"{len(pairs)} (train {len(train_pairs)}, val {n_val})",
                       **({"Sampling": f"{sample_stats['problems']} problems x {args.num_samples}: mean reward "
                                       f"{sample_stats['mean_reward']:.3f}, dropped {sample_stats['all_correct']} all "
                                       f"correct / {sample_stats['none_correct']} none correct, "
                                       f"{sample_stats['sampling_s']:.0f}s"} if sample_stats else {}),
                       "Loss": f"{args.loss}, beta {args.beta}", "Steps": num_iterations,
                       **{f"{name} before": v for name, v in before.items() if name != "step"},
                       **{f"{name} after": v for name, v in after.items() if name != "step"},
                       "Train margin per step": " ".join(f"{h['margin']:.3f}" for h in loop["history"]),
                       "Total training time (min)": loop["total_training_time"] / 60,
                   }], images=[("Implicit rewards and reward accuracy per step", plot)])
    if run.ddp:
        torch.distributed.barrier()  # nobody tears gloo down while another rank still works
    compute_cleanup()
    return loop


if __name__ == "__main__":
    main()
