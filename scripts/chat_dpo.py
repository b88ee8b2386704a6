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

from nanochat.checkpoint_manager import SOURCES, complete_steps, load_model
from nanochat.common import all_reduce, compute_cleanup, dtype_name, get_base_dir, print0, script_argv
from nanochat.dpo import LOSSES, pair_logprobs, preference_loss, reference_logprobs, render_pair
from nanochat.engine import Engine
from nanochat.report import get_report, subplots
from nanochat.tools.registry import ToolRegistry
from nanochat.training import (
    StepLog,
    Training,
    add_training_args,
    eval_due,
    gather_objects,
    init_wandb,
    make_optimizers,
    resume_training,
    source_model,
    start_run,
    train_loop,
)
from scripts.chat_rl import evaluate_pass_at_k
from scripts.chat_sft import step_examples
from tasks.customjson import JSONLTask
from tasks.gsm8k import GSM8K
from tasks.preference import PROBLEM_SETS, problem_tasks, read_pairs, sample_pairs, write_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, sources=["base", "mid", "sft", "rl"], source="sft")  # the source is also the reference
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
    p.add_argument("--task-file", default="", help="JSONL of problems ({messages, answer}, tasks/customjson.py) to "
                   "sample pairs on and measure pass@k on, instead of --problems and GSM8K")
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
    # --device-batch-size counts pairs (2 rows each); --max-seq-len 0 = the model's context; LR decays linearly to 0;
    # no compile by default: pair lengths vary from batch to batch
    p.set_defaults(device_batch_size=4, max_seq_len=0, warmdown_ratio=1.0, compile="off")
    return p.parse_args(script_argv(argv))


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def start_training(args, run):
    """The source stage's model, or with --resume the latest checkpoint of chatdpo_checkpoints/<tag>; a run killed
    before its first checkpoint starts from the source again, with the pairs it had scored.
    -> (Training, the source's {"stage", "tag", "step"})."""
    source = source_model(args.source, args.model_tag, args.step)  # the output keeps the source's tag
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["dpo"][0], source["tag"])
    if args.resume and complete_steps(checkpoint_dir):
        training = resume_training(run, args, checkpoint_dir, source["tag"])
        return training, training.meta["source"]
    if args.resume and not os.path.exists(os.path.join(checkpoint_dir, "pairs.jsonl")):
        raise SystemExit(f"--resume: nothing to resume in {checkpoint_dir} (no checkpoint, no pairs); run without "
                         "--resume")
    model, tokenizer, _ = load_model(args.source, run.device, "train", model_tag=source["tag"], step=source["step"])
    return Training(run, args, model, tokenizer, source["tag"], checkpoint_dir), source


def sample_problems(args, model, tokenizer, engine, run):
    """Pairs sampled on the problems (all ranks' together, in an order that does not depend on the number of
    ranks), and the sampling's statistics."""
    if args.task_file:
        task = JSONLTask(args.task_file)
    else:
        task = problem_tasks(["gsm8k"] if args.online else args.problems.split(","), args.train_size, args.seed)
    n = min(args.num_problems, len(task))
    t0 = time.time()
    model.eval()
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
    return pairs, stats


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
        pairs, stats = sample_problems(args, model, tokenizer, engine, run)
    pad_id = tokenizer.get_bos_token_id()
    rendered = []
    for i in range(run.rank, len(pairs), run.world_size):
        try:
            rendered.append(render_pair(tokenizer, pairs[i], T + 1))
        except ValueError as e:
            raise SystemExit(f"pair {i + 1}: {e} (--max-seq-len {T}); shorten it or drop it") from None
    refs = gather_objects(reference_logprobs(model, rendered, pad_id, run.device, args.device_batch_size),
                          run.world_size)
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = refs[i % run.world_size][i // run.world_size]
        p["ref_max_tokens"] = T + 1
    return pairs, stats


def load_pairs(args, training, engine, T):
    """With --resume the run's scored pairs (from pairs.jsonl); else new ones, sampled (or read from --pairs),
    scored by the reference and written to pairs.jsonl. -> (pairs, the sampling's statistics or None)."""
    path = os.path.join(training.checkpoint_dir, "pairs.jsonl")
    if args.resume:
        pairs = read_pairs(path)
        if any(p.get("ref_max_tokens") != T + 1 for p in pairs):
            raise SystemExit(f"{path} was scored with a different --max-seq-len; resume with the same one")
        print0(f"pairs: {len(pairs):,} from {path} (reference log-probs cached)")
        return pairs, training.meta["sample_stats"] if training.resumed else None
    pairs, stats = make_pairs(args, training.model, training.tokenizer, engine, T, training.run)
    if training.run.master:
        write_pairs(path, pairs)
    if training.run.ddp:
        torch.distributed.barrier()
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
    return path_fn(fig, "chat_dpo_margin.png")


def pairs_pass(model, tokenizer, pairs, T, args, run, train):
    """Loss and implicit rewards over `pairs` (this rank's share), --device-batch-size pairs per forward; with
    train=True the loss, averaged over the pairs, is backpropagated. -> sums over the pairs of [loss, margin,
    chosen ranked first, chosen reward, rejected reward, count, tokens processed]."""
    sums = [0.0] * 7
    for b in range(0, len(pairs), args.device_batch_size):
        chunk = pairs[b:b + args.device_batch_size]
        rendered = [render_pair(tokenizer, p, T + 1) for p in chunk]
        with torch.set_grad_enabled(train):
            pc, pr = pair_logprobs(model, rendered, tokenizer.get_bos_token_id(), run.device)
        ref_c = torch.tensor([p["ref_chosen"] for p in chunk], dtype=torch.float32, device=run.device)
        ref_r = torch.tensor([p["ref_rejected"] for p in chunk], dtype=torch.float32, device=run.device)
        loss, cr, rr = preference_loss(pc, pr, ref_c, ref_r, args.beta, args.loss)
        if train:
            run.backward(loss.sum() / len(pairs))  # the mean over this rank's pairs; the optimizers average over ranks
        tokens = 2 * len(chunk) * max(len(ids) - 1 for side in rendered for ids, _ in side)
        for j, v in enumerate([loss.sum(), (cr - rr).sum(), (cr > rr).sum(), cr.sum(), rr.sum(), len(chunk), tokens]):
            sums[j] += float(v)
    return sums


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args, seed=42 + args.seed)
    if args.pairs_per_step % run.world_size:
        raise SystemExit(f"--pairs-per-step {args.pairs_per_step} must be a multiple of the number of ranks "
                         f"({run.world_size})")
    wandb_run = init_wandb(run, args.run, "nanochat-dpo", vars(args).copy())
    training, source = start_training(args, run)
    model, tokenizer = training.model, training.tokenizer
    T = args.max_seq_len or model.config.sequence_len
    engine = Engine(model, tokenizer, tools=ToolRegistry())
    print0(f"model: {source['stage']}/{training.tag} step {source['step']} | {model.config.n_layer} layers | "
           f"{model.num_params():,} parameters | dtype {dtype_name(run.dtype)} | loss {args.loss} beta {args.beta}")
    if not args.resume:
        training.start_fresh()  # earlier checkpoints and pairs aside before this run writes its pairs

    # --- pairs, scored once by the reference (the model as loaded, before any step) ---------------------
    pairs, sample_stats = load_pairs(args, training, engine, T)
    pairs_sha = file_sha(os.path.join(training.checkpoint_dir, "pairs.jsonl"))
    n_val = min(args.val_pairs, len(pairs) // 10) if args.val_pairs > 0 else 0
    train_pairs, val_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, args.num_epochs * len(train_pairs) // args.pairs_per_step)
    print0(f"train pairs: {len(train_pairs):,} | val pairs: {n_val} | steps: {num_iterations} x {args.pairs_per_step} "
           f"pairs ({num_iterations * args.pairs_per_step / len(train_pairs):.2f} epochs)")
    eval_task = dpo_eval_task(args)
    loop = {"history": [], "evals": []}
    same = {"world_size": run.world_size, "pairs_per_step": args.pairs_per_step,
            "device_batch_size": args.device_batch_size, "max_seq_len": T, "pairs_sha": pairs_sha,
            "loss": args.loss, "beta": args.beta}
    training.begin(make_optimizers(model, args, args.init_lr_frac), loop, num_iterations, same)
    log = StepLog(run, num_iterations, training.step, loop, args.loss_file, wandb_run, model.estimate_flops(),
                  args.peak_flops)

    def train_step(step):
        """One optimizer step over this rank's share of the step's pairs (the order depends only on the step)."""
        mine = [train_pairs[i] for i in step_examples(step, args.pairs_per_step, len(train_pairs), run.rank,
                                                      run.world_size)]
        s = all_reduce(pairs_pass(model, tokenizer, mine, T, args, run, True), run.device)  # forward and backward
        lrm = training.scheduled_update(step)
        n = s[5]
        h = {"margin": s[1] / n, "accuracy": s[2] / n, "chosen": s[3] / n, "rejected": s[4] / n}
        loop["history"].append({"step": step, **h})
        return s[0] / n, lrm, int(s[6]), h

    def evaluate(step, last_step, resumed_here):
        # before the first step of a fresh run, every --eval-every steps and at the end
        if not ((step == 0 and not resumed_here) or eval_due(step, args.eval_every, last_step, resumed_here)):
            return
        model.eval()
        s = all_reduce(pairs_pass(model, tokenizer, val_pairs[run.rank::run.world_size], T, args, run, False),
                       run.device)
        e = {"step": step, "val margin": s[1] / max(1, s[5]), "val accuracy": s[2] / max(1, s[5])}
        if eval_task is not None:
            e["pass@1"], e[f"pass@{args.eval_samples}"] = evaluate_pass_at_k(
                eval_task, args.eval_problems, engine, tokenizer, args.eval_samples, args.max_new_tokens, 1.0,
                args.top_k, model.config.sequence_len, run.rank, run.world_size, run.device, seed=10_000)
        model.train()
        log.eval(step, {name: v for name, v in e.items() if name != "step"})
        loop["evals"].append(e)

    step = train_loop(training, log, train_step, evaluate, lambda step: training.checkpoint_meta(
        step, {"step": step}, source=source, num_pairs=len(pairs), sample_stats=sample_stats, **same,
        **{"pass@1": loop["evals"][-1].get("pass@1")}))
    log.close()
    if run.master and step == num_iterations:
        write_report(args, training, source, loop, sample_stats,
                     f"{len(pairs)} (train {len(train_pairs)}, val {n_val})")
    compute_cleanup()
    return loop


def dpo_eval_task(args):
    """The problems pass@k is measured on, or None (--eval-problems 0)."""
    if args.eval_problems <= 0:
        return None
    return JSONLTask(args.task_file) if args.task_file else GSM8K(split="test")


def write_report(args, training, source, loop, sample_stats, pairs_line):
    report = get_report()
    plot = save_margin_plot(loop["history"], report.save_plot)
    before, after = loop["evals"][0], loop["evals"][-1]
    summary = {"GSM8K pass@1": after["pass@1"]} if "pass@1" in after else {}
    sampling = {"Sampling": f"{sample_stats['problems']} problems x {args.num_samples}: mean reward "
                            f"{sample_stats['mean_reward']:.3f}, dropped {sample_stats['all_correct']} all correct / "
                            f"{sample_stats['none_correct']} none correct, {sample_stats['sampling_s']:.0f}s"
                } if sample_stats else {}
    report.log(section="Chat DPO", stage="DPO", summary=summary, data=[vars(args), {
        "Source": f"{source['stage']}/{training.tag} step {source['step']}",
        "Pairs": pairs_line,
        **sampling,
        "Loss": f"{args.loss}, beta {args.beta}", "Steps": training.num_iterations,
        **{f"{name} before": v for name, v in before.items() if name != "step"},
        **{f"{name} after": v for name, v in after.items() if name != "step"},
        "Train margin per step": " ".join(f"{h['margin']:.3f}" for h in loop["history"]),
        "Total training time (min)": loop["total_training_time"] / 60,
    }], images=[("Implicit rewards and reward accuracy per step", plot)])


if __name__ == "__main__":
    main()
