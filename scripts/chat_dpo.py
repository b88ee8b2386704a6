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
import dataclasses
import hashlib
import json
import os
import time

import torch

from nanochat.common import (all_reduce, autocast, compute_cleanup, compute_init, format_eta, get_base_dir, print0,
                             resolve_dtype, script_argv)
from nanochat.dpo import LOSSES, pair_logprobs, preference_loss, reference_logprobs, render_pair
from nanochat.training import (check_resume, gather_objects, lr_multiplier, restore_training_state,
                               save_training_checkpoint, set_lrs)
from scripts.chat_rl import evaluate_pass_at_k
from scripts.chat_sft import step_examples
from tasks.preference import PROBLEM_SETS, problem_tasks, read_pairs, sample_pairs, write_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="model to start from (and the reference)")
    p.add_argument("--model-tag", default=None, help="tag of the source model (default: the largest); also the output tag")
    p.add_argument("--step", type=int, default=None, help="step of the source model (default: latest)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    # pairs
    p.add_argument("--pairs", default="", help="JSONL of {prompt, chosen, rejected} pairs to train on instead of sampling")
    p.add_argument("--problems", default="gsm8k-synthetic,spellingbee", help=f"problem sets to sample pairs from: {', '.join(PROBLEM_SETS)}")
    p.add_argument("--online", action="store_true", help="sample pairs on the GSM8K train split (hub): same as --problems gsm8k")
    p.add_argument("--num-problems", type=int, default=512, help="problems to sample (all ranks together)")
    p.add_argument("--train-size", type=int, default=100_000, help="size of the generated problem sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-file", default="", help=argparse.SUPPRESS)  # test aid: JSONL problems for sampling AND eval
    p.add_argument("--num-samples", type=int, default=8, help="replies sampled per problem")
    p.add_argument("--pairs-per-problem", type=int, default=2, help="at most this many pairs per problem")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    # optimization
    p.add_argument("--loss", default="sigmoid", choices=LOSSES, help="sigmoid = DPO, ipo = IPO")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    p.add_argument("--pairs-per-step", type=int, default=16, help="pairs per optimizer step, all ranks together")
    p.add_argument("--device-batch-size", type=int, default=4, help="pairs per forward/backward (2x rows)")
    p.add_argument("--max-seq-len", type=int, default=0, help="tokens per prompt + reply (default: the model's context)")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs over the pairs when --num-iterations is -1")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the pairs and --num-epochs)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="all LRs are scaled by this (then decay to 0)")
    # evaluation and checkpoints
    p.add_argument("--val-pairs", type=int, default=32, help="pairs held out for the validation margin (at most a tenth)")
    p.add_argument("--eval-every", type=int, default=-1, help="validation margin and pass@k every N steps; <=0: before/after only")
    p.add_argument("--eval-problems", type=int, default=100, help="GSM8K test problems for pass@k (0: none)")
    p.add_argument("--eval-samples", type=int, default=4, help="k for pass@k")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (and at the end); <=0: end only")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue the last run of --model-tag (pairs are not sampled again)")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save after this many steps and exit as if killed")
    p.add_argument("--loss-file", default="", help="rank 0 appends {step, loss, margin, lrm} JSON lines here")
    return p.parse_args(script_argv(argv))


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def make_pairs(args, model, tokenizer, engine, T, rank, world_size, device, dtype):
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
            from scripts.chat_eval import JSONLTask
            task = JSONLTask(args.task_file)
        else:
            task = problem_tasks(["gsm8k"] if args.online else args.problems.split(","), args.train_size, args.seed)
        n = min(args.num_problems, len(task))
        t0 = time.time()
        model.eval()
        with autocast(dtype, device.type):
            mine, stats = sample_pairs(task, range(rank, n, world_size), engine, tokenizer, args.num_samples,
                                       args.max_new_tokens, args.temperature, args.top_k, 1_000_003 * (args.seed + 1),
                                       args.pairs_per_problem)
        pairs = sorted((p for part in gather_objects(mine, world_size) for p in part), key=lambda p: p["problem"])
        stats = {k: sum(s[k] for s in gather_objects(stats, world_size)) for k in stats}
        stats["mean_reward"] = stats["reward_sum"] / max(1, stats["samples"])
        stats["sampling_s"] = time.time() - t0
        print0(f"pairs: {len(pairs):,} from {n} problems x {args.num_samples} samples | mean reward "
               f"{stats['mean_reward']:.3f} | dropped: {stats['all_correct']} all correct, {stats['none_correct']} "
               f"none correct, {stats['too_long']} too long | {stats['sampling_s']:.0f}s")
        if not pairs:
            raise SystemExit("no pairs: every problem had all or none of its samples correct. Sample more problems "
                             "(--num-problems), more replies (--num-samples), or give --pairs FILE")
    pad_id = tokenizer.get_bos_token_id()
    rendered = [render_pair(tokenizer, pairs[i], T + 1) for i in range(rank, len(pairs), world_size)]
    refs = reference_logprobs(model, rendered, pad_id, device, args.device_batch_size, dtype)
    refs = gather_objects(refs, world_size)
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = refs[i % world_size][i // world_size]
        p["ref_max_tokens"] = T + 1
    return pairs, stats


def save_margin_plot(history, path_fn):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
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
    plt.close(fig)
    return path


def pair_metrics(model, tokenizer, pairs, T, beta, kind, B, device, dtype):
    """Sums over pairs (this rank's share is the caller's business): loss, margin, correct order, chosen and
    rejected rewards, count; grad-free."""
    sums = [0.0] * 6
    with torch.no_grad():
        for b in range(0, len(pairs), B):
            chunk = pairs[b:b + B]
            with autocast(dtype, device.type):
                pc, pr = pair_logprobs(model, [render_pair(tokenizer, p, T + 1) for p in chunk],
                                       tokenizer.get_bos_token_id(), device)
            loss, cr, rr = preference_loss(pc, pr, *refs_of(chunk, device), beta, kind)
            for j, v in enumerate([loss.sum(), (cr - rr).sum(), (cr > rr).sum(), cr.sum(), rr.sum(), len(chunk)]):
                sums[j] += float(v)
    return sums


def refs_of(pairs, device):
    return (torch.tensor([p["ref_chosen"] for p in pairs], dtype=torch.float32, device=device),
            torch.tensor([p["ref_rejected"] for p in pairs], dtype=torch.float32, device=device))


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None, seed=42 + args.seed)
    master = rank == 0
    dtype = resolve_dtype(args.dtype, device.type)
    if args.pairs_per_step % world_size:
        raise SystemExit(f"--pairs-per-step {args.pairs_per_step} must be a multiple of the number of ranks ({world_size})")

    from nanochat.checkpoint_manager import (SOURCES, build_model, complete_steps, find_largest_model, load_checkpoint,
                                             load_model, start_fresh)
    from nanochat.engine import Engine
    tag = args.model_tag
    if tag is None:
        try:
            tag = find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
        except FileNotFoundError as e:
            raise SystemExit(f"{e}. No {args.source} model to start from: run `python -m {SOURCES[args.source][1]}` "
                             "first (or pick another --source)") from None
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["dpo"][0], tag)
    pairs_path = os.path.join(checkpoint_dir, "pairs.jsonl")
    steps_saved = complete_steps(checkpoint_dir)
    start_step, rank_state, resume_meta = 0, None, None
    if args.resume and steps_saved:
        start_step = steps_saved[-1]
        model, tokenizer, resume_meta = build_model(checkpoint_dir, start_step, device, "train")
        _, rank_state, _ = load_checkpoint(checkpoint_dir, start_step, device, load_optimizer=True, rank=rank)
        source_meta = resume_meta["source"]
    else:
        if args.resume and not os.path.exists(pairs_path):
            raise SystemExit(f"--resume: nothing to resume in {checkpoint_dir} (no checkpoint, no pairs); run without --resume")
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=tag, step=args.step)
        source_meta = {"stage": args.source, "tag": tag, "step": meta.get("step")}
        if master and not args.resume:
            prev = start_fresh(checkpoint_dir)
            if prev:
                print0(f"earlier checkpoints of {tag} moved to {prev}")
    config = model.config
    T = args.max_seq_len or config.sequence_len
    engine = Engine(model, tokenizer)
    print0(f"model: {source_meta['stage']}/{tag} step {source_meta['step']} | {config.n_layer} layers | "
           f"{model.num_params():,} parameters | dtype {dtype} | loss {args.loss} beta {args.beta}")

    # --- pairs, scored once by the reference -----------------------------------------------------------
    sample_stats = resume_meta["sample_stats"] if resume_meta else None
    if args.resume and os.path.exists(pairs_path):
        pairs = read_pairs(pairs_path)
        if any(p.get("ref_max_tokens") != T + 1 for p in pairs):
            raise SystemExit(f"{pairs_path} was scored with a different --max-seq-len; resume with the same one")
        print0(f"resumed pairs: {len(pairs):,} from {pairs_path} (reference log-probs cached)")
    else:
        pairs, sample_stats = make_pairs(args, model, tokenizer, engine, T, rank, world_size, device, dtype)
        if master:
            write_pairs(pairs_path, pairs)
        if ddp:
            torch.distributed.barrier()
    pairs_sha = file_sha(pairs_path)
    n_val = min(args.val_pairs, len(pairs) // 10) if args.val_pairs > 0 else 0
    train_pairs, val_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, args.num_epochs * len(train_pairs) // args.pairs_per_step)
    print0(f"train pairs: {len(train_pairs):,} | val pairs: {n_val} | steps: {num_iterations} x {args.pairs_per_step} "
           f"pairs ({num_iterations * args.pairs_per_step / len(train_pairs):.2f} epochs)")

    if args.task_file:
        from scripts.chat_eval import JSONLTask
        eval_task = JSONLTask(args.task_file)
    else:
        from tasks.gsm8k import GSM8K
        eval_task = GSM8K(split="test") if args.eval_problems > 0 else None

    f = args.init_lr_frac
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * f, embedding_lr=args.embedding_lr * f,
                                        matrix_lr=args.matrix_lr * f, weight_decay=args.weight_decay)
    loop = {"history": [], "evals": [], "total_training_time": 0.0}
    if rank_state is not None:
        check_resume(resume_meta, {"world_size": world_size, "pairs_per_step": args.pairs_per_step,
                                   "device_batch_size": args.device_batch_size, "max_seq_len": T,
                                   "pairs_sha": pairs_sha, "loss": args.loss, "beta": args.beta}, num_iterations)
        restore_training_state(optimizers, rank_state)
        loop = resume_meta["loop_state"]
        print0(f"resumed from {checkpoint_dir} at step {start_step}")

    def evaluate(step):
        model.eval()
        s = all_reduce(pair_metrics(model, tokenizer, val_pairs[rank::world_size], T, args.beta, args.loss,
                                    args.device_batch_size, device, dtype), device)
        p1 = pk = None
        if eval_task is not None and args.eval_problems > 0:
            p1, pk = evaluate_pass_at_k(eval_task, args.eval_problems, engine, tokenizer, args.eval_samples,
                                        args.max_new_tokens, 1.0, args.top_k, config.sequence_len, rank, world_size,
                                        device, autocast(dtype, device.type), seed=10_000)
        model.train()
        n = max(1, s[5])
        e = {"step": step, "val_margin": s[1] / n, "val_accuracy": s[2] / n, "pass@1": p1, f"pass@{args.eval_samples}": pk}
        print0(f"step {step:05d} | val margin {e['val_margin']:+.4f} | val accuracy {e['val_accuracy']:.3f}"
               + (f" | pass@1 {p1:.4f} | pass@{args.eval_samples} {pk:.4f}" if p1 is not None else ""))
        return e

    loss_file = open(args.loss_file, "a") if master and args.loss_file else None
    step, run_time, timed_steps = start_step, 0.0, 0
    while True:
        last_step = step == num_iterations
        resumed_here = rank_state is not None and step == start_step
        if not resumed_here and (step == 0 or last_step or (args.eval_every > 0 and step % args.eval_every == 0)):
            loop["evals"].append(evaluate(step))
        stop_here = step == args.stop_after
        if last_step or stop_here or (args.save_every > 0 and step % args.save_every == 0 and step > 0 and not resumed_here):
            meta = {"step": step, "model_config": dataclasses.asdict(config), "user_config": user_config,
                    "source": source_meta, "world_size": world_size, "pairs_per_step": args.pairs_per_step,
                    "device_batch_size": args.device_batch_size, "max_seq_len": T, "num_iterations": num_iterations,
                    "pairs_sha": pairs_sha, "num_pairs": len(pairs), "loss": args.loss, "beta": args.beta,
                    "sample_stats": sample_stats, "loader_states": gather_objects({"step": step}, world_size),
                    "loop_state": loop, "pass@1": loop["evals"][-1]["pass@1"] if loop["evals"] else None}
            save_training_checkpoint(checkpoint_dir, step, model, optimizers, meta, rank, args.keep_last)
        if last_step or stop_here:
            break

        # --- one optimizer step over this rank's share of the step's pairs -----------------------------
        t0 = time.time()
        mine = [train_pairs[i] for i in step_examples(step, args.pairs_per_step, len(train_pairs), rank, world_size)]
        sums = [0.0] * 6
        for b in range(0, len(mine), args.device_batch_size):
            chunk = mine[b:b + args.device_batch_size]
            with autocast(dtype, device.type):
                pc, pr = pair_logprobs(model, [render_pair(tokenizer, p, T + 1) for p in chunk],
                                       tokenizer.get_bos_token_id(), device)
            loss, cr, rr = preference_loss(pc, pr, *refs_of(chunk, device), args.beta, args.loss)
            # mean over this rank's pairs; the optimizers average the gradients over ranks
            (loss.sum() / len(mine)).backward()
            for j, v in enumerate([loss.sum(), (cr - rr).sum(), (cr > rr).sum(), cr.sum(), rr.sum(), len(chunk)]):
                sums[j] += float(v)
        lrm = lr_multiplier(step, num_iterations, 0.0, 1.0, 0.0)
        set_lrs(optimizers, step, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        s = all_reduce(sums, device)
        n = s[5]
        h = {"step": step, "loss": s[0] / n, "margin": s[1] / n, "accuracy": s[2] / n, "chosen": s[3] / n,
             "rejected": s[4] / n, "lrm": lrm}
        loop["history"].append(h)
        dt = time.time() - t0
        if step - start_step >= 1:
            loop["total_training_time"] += dt
            run_time += dt
            timed_steps += 1
        eta = format_eta((run_time / timed_steps if timed_steps else dt) * (num_iterations - step - 1))
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {h['loss']:.5f} "
               f"| margin {h['margin']:+.4f} | acc {h['accuracy']:.3f} | chosen {h['chosen']:+.4f} | rejected "
               f"{h['rejected']:+.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | eta {eta}")
        if loss_file:
            loss_file.write(json.dumps(h) + "\n")
            loss_file.flush()
        step += 1

    if loss_file:
        loss_file.close()
    if master and step == num_iterations:
        from nanochat.report import get_report
        report = get_report()
        plot = save_margin_plot(loop["history"], report.save_plot)
        before, after = loop["evals"][0], loop["evals"][-1]
        k = args.eval_samples
        summary = {"GSM8K pass@1": after["pass@1"]} if after["pass@1"] is not None else {}
        report.log(section="Chat DPO", stage="DPO", summary=summary, data=[
            user_config,
            {
                "Source": f"{source_meta['stage']}/{tag} step {source_meta['step']}",
                "Pairs": f"{len(pairs)} ({args.pairs or 'sampled'}; train {len(train_pairs)}, val {n_val})",
                **({"Sampling": f"{sample_stats['problems']} problems x {args.num_samples}: mean reward "
                                f"{sample_stats['mean_reward']:.3f}, dropped {sample_stats['all_correct']} all correct / "
                                f"{sample_stats['none_correct']} none correct, {sample_stats['sampling_s']:.0f}s"}
                   if sample_stats else {}),
                "Loss": f"{args.loss}, beta {args.beta}", "Steps": num_iterations,
                "Val margin before": before["val_margin"], "Val margin after": after["val_margin"],
                "Val reward accuracy after": after["val_accuracy"],
                "pass@1 before": before["pass@1"], "pass@1 after": after["pass@1"],
                f"pass@{k} before": before[f"pass@{k}"], f"pass@{k} after": after[f"pass@{k}"],
                "Train margin per step": " ".join(f"{h['margin']:.3f}" for h in loop["history"]),
                "Total training time (min)": loop["total_training_time"] / 60,
            },
        ], images=[("Implicit rewards and reward accuracy per step", plot)])
    if ddp:
        torch.distributed.barrier()  # nobody tears gloo down while another rank still works
    compute_cleanup()
    return loop


if __name__ == "__main__":
    main()
