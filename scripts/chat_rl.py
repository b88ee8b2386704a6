"""Reinforcement learning on GSM8K-style word problems (GRPO-style, on-policy REINFORCE with group baselines).

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --num-steps 300

Each step:
1. take --prompts-per-step problems (all ranks together; each rank its own share) from the training set:
   GSM8KSynthetic (offline, template-generated, never the GSM8K test problems) or, with --online, the
   GSM8K train split;
2. sample --num-samples completions per problem with the Engine at temperature 1.0 (calculator tool
   included: tool outputs are forced tokens);
3. reward each completion by task.reward (1 if its final number is the reference answer, else 0);
4. advantage = reward - mean reward of the problem's group (with --adv-std also divided by the group's
   standard deviation; a group whose rewards are all equal gets advantage 0 either way);
5. loss = -mean over the sampled tokens of (advantage x log-prob of the token), with log-probs from a
   fresh forward pass over prompt + completion (padded batch). Prompt tokens, padding and tokens forced
   by the tool carry no loss: only what the model itself sampled (including the <|assistant_end|> that
   ended a reply) is credited. Rows with advantage 0 contribute nothing and are not run at all.
   The optimizers average gradients across ranks; the LR decays linearly to 0 over --num-steps.

pass@1 (mean success over samples) and pass@k (any of k samples succeeds) are measured on the first
--eval-problems problems of the GSM8K test split before training, every --eval-every steps and at the end.
Checkpoints go to chatrl_checkpoints/<tag>/ (tag of the source model).
"""
import argparse
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.common import all_reduce, compute_cleanup, get_base_dir, print0, script_argv
from nanochat.report import subplots
from nanochat.training import (StepLog, checkpoint_meta, load_training_state, make_optimizers, resume_or_start_fresh,
                               save_training_checkpoint, start_run)


# ---------------------------------------------------------------------------------------------
# the pieces of one GRPO step (each testable on its own)

def group_advantages(rewards, normalize_std=False, eps=1e-6):
    """Rewards of one group (the samples of one prompt) -> advantages: reward - group mean, optionally
    divided by the group's (population) standard deviation. Always zero-mean within the group."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    adv = r - r.mean()
    if normalize_std:
        adv = adv / (r.std(unbiased=False) + eps)
    return adv


def sample_completions(engine, prompt, num_samples, max_new_tokens, temperature=1.0, top_k=None, seed=0):
    """Sample num_samples replies. -> (tokens, masks): per sample the generated tokens up to and including
    the stop token if one came (rows cut off by max_new_tokens have none), and their masks from the
    engine (1 = sampled by the model, 0 = forced by the tool)."""
    tokens = [[] for _ in range(num_samples)]
    masks = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for column, column_masks in engine.generate(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed):
        for i, (tok, m) in enumerate(zip(column, column_masks)):
            if done[i]:
                continue
            tokens[i].append(tok)
            masks[i].append(m)
            done[i] = tok in engine.stop_tokens
    return tokens, masks


def completion_text(tokenizer, tokens, stop_tokens):
    if tokens and tokens[-1] in stop_tokens:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def build_rl_batch(prompts, completions, completion_masks, pad_id):
    """Padded next-token batch over prompt + completion.
    -> inputs (B, T) long, targets (B, T) long: targets[b, j] is the token after inputs[b, j] where that
    token was sampled by the model (completion token with mask 1), and -1 everywhere else (prompt,
    tool-forced tokens, padding), so the model's per-token loss is 0 there."""
    rows = []
    for prompt, comp, mask in zip(prompts, completions, completion_masks):
        assert len(comp) == len(mask)
        seq = list(prompt) + list(comp)
        trained = [0] * len(prompt) + list(mask)
        inp = seq[:-1]
        tgt = [t if trained[j + 1] else -1 for j, t in enumerate(seq[1:])]
        rows.append((inp, tgt))
    T = max(len(inp) for inp, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (inp, tgt) in enumerate(rows):
        inputs[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        targets[b, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return inputs, targets


def policy_gradient_loss(model, inputs, targets, advantages, num_tokens):
    """-(sum over trained tokens of advantage x log-prob) / num_tokens. Passing the token count of the
    whole step (not of this chunk) lets chunks be accumulated into one mean."""
    nll = model(inputs, targets, loss_reduction="none")  # (B, T), 0 where targets == -1
    logp = -nll
    return -(logp * advantages[:, None].to(logp.dtype)).sum() / num_tokens


# ---------------------------------------------------------------------------------------------

def rollout(task, indices, engine, tokenizer, num_samples, max_new_tokens, temperature, top_k, seed, context_len,
            normalize_std=False):
    """Sample and reward the problems `indices`. -> dict of per-row lists: prompts, completions, masks,
    rewards, advantages (rows grouped per problem)."""
    out = {"prompts": [], "completions": [], "masks": [], "rewards": [], "advantages": []}
    for idx in indices:
        conv = task[idx]
        prompt = tokenizer.render_for_completion(conv)
        limit = max(context_len // 2, context_len - max_new_tokens)  # a prompt too long for the context keeps its end
        if len(prompt) > limit:
            prompt = prompt[-limit:]
        budget = min(max_new_tokens, context_len - len(prompt))
        comps, masks = sample_completions(engine, prompt, num_samples, budget, temperature, top_k, seed=seed + idx)
        rewards = [float(task.reward(conv, completion_text(tokenizer, c, engine.stop_tokens))) for c in comps]
        out["prompts"] += [prompt] * num_samples
        out["completions"] += comps
        out["masks"] += masks
        out["rewards"] += rewards
        out["advantages"] += group_advantages(rewards, normalize_std).tolist()
    return out


def train_on_rollout(model, data, device, device_batch_size, pad_id, autocast_ctx=None):
    """Accumulate the policy-gradient loss of one rollout into the gradients (no optimizer step).
    -> the loss value (this rank)."""
    autocast_ctx = autocast_ctx or nullcontext()
    num_tokens = max(1, sum(sum(m) for m in data["masks"]))
    rows = [i for i, a in enumerate(data["advantages"]) if a != 0.0 and sum(data["masks"][i]) > 0]
    total = 0.0
    for b in range(0, len(rows), device_batch_size):
        chunk = rows[b:b + device_batch_size]
        inputs, targets = build_rl_batch([data["prompts"][i] for i in chunk], [data["completions"][i] for i in chunk],
                                         [data["masks"][i] for i in chunk], pad_id)
        adv = torch.tensor([data["advantages"][i] for i in chunk], dtype=torch.float32, device=device)
        with autocast_ctx:
            loss = policy_gradient_loss(model, inputs.to(device), targets.to(device), adv, num_tokens)
        loss.backward()
        total += loss.item()
    return total


def evaluate_pass_at_k(task, num_problems, engine, tokenizer, k, max_new_tokens, temperature, top_k, context_len,
                       rank=0, world_size=1, device="cpu", autocast_ctx=None, seed=10_000):
    """(pass@1, pass@k) on problems 0..num_problems-1 of task (split over ranks, summed)."""
    autocast_ctx = autocast_ctx or nullcontext()
    n = min(num_problems, len(task))
    p1, pk, count = 0.0, 0.0, 0
    for idx in range(rank, n, world_size):
        with autocast_ctx:
            data_ = rollout(task, [idx], engine, tokenizer, k, max_new_tokens, temperature, top_k, seed, context_len)
        r = data_["rewards"]
        p1 += sum(r) / len(r)
        pk += float(max(r) > 0)
        count += 1
    p1, pk, count = all_reduce([p1, pk, count], torch.device(device))
    return (p1 / count, pk / count) if count else (0.0, 0.0)


def save_reward_plot(history, path_fn):
    fig, ax = subplots(figsize=(7, 4))
    if history:
        steps, rewards = zip(*history)
        ax.plot(steps, rewards, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("Chat RL: mean reward per step")
    path = path_fn(fig, "chat_rl_reward.png")
    return path


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="model to start from")
    p.add_argument("--model-tag", default=None, help="tag of the source model (default: the largest); also the output tag")
    p.add_argument("--step", type=int, default=None, help="step of the source model (default: latest)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    # data
    p.add_argument("--online", action="store_true", help="train on the GSM8K train split (hub) instead of GSM8KSynthetic")
    p.add_argument("--train-size", type=int, default=100_000, help="GSM8KSynthetic problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-file", default="", help=argparse.SUPPRESS)  # test aid: JSONL problems used for training AND eval
    # rollouts
    p.add_argument("--num-steps", type=int, default=300)
    p.add_argument("--prompts-per-step", type=int, default=16, help="problems per step, all ranks together")
    p.add_argument("--num-samples", type=int, default=16, help="completions per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--adv-std", action="store_true", help="divide advantages by the group's standard deviation")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="all LRs are scaled by this (then decay to 0)")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps (and before/after); <=0: before/after only")
    p.add_argument("--eval-problems", type=int, default=100, help="held-out GSM8K test problems for pass@k")
    p.add_argument("--eval-samples", type=int, default=0, help="k for pass@k (default: --num-samples)")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (and at the end); <=0: end only")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this tag's RL run")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save a checkpoint after this many steps and "
                   "exit as if killed (continue with --resume)")
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    run = start_run(args.device_type, args.dtype, seed=42 + args.seed)
    rank, world_size, device = run.rank, run.world_size, run.device
    if args.prompts_per_step % world_size:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of ranks ({world_size})")
    k_eval = args.eval_samples or args.num_samples

    from nanochat.checkpoint_manager import SOURCES, find_largest_model, find_last_step, load_checkpoint, load_model
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    tag = args.model_tag
    if tag is None:
        try:
            tag = find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
        except FileNotFoundError as e:
            raise SystemExit(f"{e}. No {args.source} model to start from: run `python -m {SOURCES[args.source][1]}` "
                             "first (or pick another --source)") from None
    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=tag, step=args.step)
    engine = Engine(model, tokenizer, tools=ToolRegistry())
    context_len = model.config.sequence_len
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    if args.task_file:
        from tasks.customjson import JSONLTask
        train_task = eval_task = JSONLTask(args.task_file)
    else:
        from tasks.gsm8k import GSM8K
        from tasks.mixtures import rl_train_task
        train_task = rl_train_task(args.online, args.train_size, args.seed)
        eval_task = GSM8K(split="test")  # evaluation only: never trained on
    print0(f"source: {args.source}/{tag} | train problems: {len(train_task):,} | eval problems: "
           f"{min(args.eval_problems, len(eval_task))} | pass@{k_eval}")

    optimizers = make_optimizers(model, args, args.init_lr_frac)
    checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", tag)
    start_step, rank_state, resume_meta = 0, None, None
    if args.resume:
        start_step = find_last_step(checkpoint_dir)
        model_state, _, resume_meta = load_checkpoint(checkpoint_dir, start_step, device)
        rank_state = load_training_state(checkpoint_dir, start_step, resume_meta, run)
        model.load_state_dict(model_state)
        del model_state
    loop = {"eval_history": [], "reward_history": []}
    same = {"world_size": world_size, "prompts_per_step": args.prompts_per_step, "num_samples": args.num_samples,
            "source": {"stage": args.source, "tag": tag, "step": meta.get("step")}}
    # the problems and sampling seeds depend only on the step, so a resume continues exactly, on any number of ranks
    resume_or_start_fresh(args.resume, checkpoint_dir, model, optimizers, loop, run, rank_state, resume_meta, same,
                          args.num_steps, lambda positions, world: positions[:1] * world)
    eval_history, reward_history = loop["eval_history"], loop["reward_history"]

    def run_eval(step):
        model.eval()
        p1, pk = evaluate_pass_at_k(eval_task, args.eval_problems, engine, tokenizer, k_eval, args.max_new_tokens,
                                    1.0, args.top_k, context_len, rank, world_size, device, run.autocast())
        model.train()
        log.eval(step, {"pass@1": p1, f"pass@{k_eval}": pk})
        return p1, pk

    def save(step):
        m = checkpoint_meta(step, model, user_config, run, args.num_steps, {"step": step}, loop,
                            source=same["source"], prompts_per_step=args.prompts_per_step,
                            num_samples=args.num_samples, **{"pass@1": eval_history[-1][1]})
        save_training_checkpoint(checkpoint_dir, step, model, optimizers, m, rank, args.keep_last)

    log = StepLog(run, args.num_steps, start_step, loop)
    if not args.resume:
        eval_history.append([0, *run_eval(0)])
    per_rank = args.prompts_per_step // world_size
    for step in range(start_step, args.num_steps):
        t0 = time.time()
        base = step * args.prompts_per_step
        indices = [(base + j) % len(train_task) for j in range(rank, args.prompts_per_step, world_size)]
        assert len(indices) == per_rank
        model.eval()
        with run.autocast():
            data = rollout(train_task, indices, engine, tokenizer, args.num_samples, args.max_new_tokens,
                           args.temperature, args.top_k, seed=1_000_003 * (step + 1), context_len=context_len,
                           normalize_std=args.adv_std)
        model.train()
        loss = train_on_rollout(model, data, device, args.device_batch_size, pad_id, run.autocast())
        lrm = 1.0 - step / args.num_steps
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

        rewards, rows, sampled = all_reduce([sum(data["rewards"]), len(data["rewards"]),
                                             sum(len(c) for c in data["completions"])], device)
        reward_history.append([step, rewards / rows])
        # tok/s counts the sampled tokens: generation, not the training pass, sets an RL step's pace
        log.step(step, all_reduce(loss, device) / world_size, lrm, time.time() - t0, sampled,
                 {"mean reward": rewards / rows, "mean length": sampled / rows})

        done = step + 1
        if args.eval_every > 0 and done % args.eval_every == 0 and done != args.num_steps:
            eval_history.append([done, *run_eval(done)])
        if done == args.stop_after or (args.save_every > 0 and done % args.save_every == 0 and done != args.num_steps):
            save(done)
        if done == args.stop_after:
            break
    else:  # not stopped early: the final evaluation and checkpoint
        if eval_history[-1][0] != args.num_steps:
            eval_history.append([args.num_steps, *run_eval(args.num_steps)])
        save(args.num_steps)
    finished = eval_history[-1][0] == args.num_steps

    log.close()
    if run.master and finished:
        from nanochat.report import get_report
        report = get_report()
        plot = save_reward_plot(reward_history, report.save_plot)
        (_, p1_before, pk_before), (_, p1_after, pk_after) = eval_history[0], eval_history[-1]
        report.log(section="Chat RL", stage="RL", summary={"GSM8K pass@1": p1_after}, data=[
            user_config,
            {
                "Source": f"{args.source}/{tag} step {meta.get('step')}",
                "Eval problems": min(args.eval_problems, len(eval_task)),
                "pass@1 before": p1_before, f"pass@{k_eval} before": pk_before,
                "pass@1 after": p1_after, f"pass@{k_eval} after": pk_after,
                "Mean reward per step": " ".join(f"{r:.3f}" for _, r in reward_history),
                "Evaluations (step, pass@1, pass@k)": "; ".join(f"{s}: {a:.3f}, {b:.3f}" for s, a, b in eval_history),
            },
        ], images=[("Mean reward per step", plot)])
    if run.ddp:
        dist.barrier()  # nobody tears gloo down while another rank still works (it can abort at exit)
    compute_cleanup()
    return eval_history, reward_history


if __name__ == "__main__":
    main()
