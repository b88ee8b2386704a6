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
4. advantage = reward - mean reward of the problem's group (a group whose rewards are all equal gets
   advantage 0);
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

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.checkpoint_manager import SOURCES, add_model_args, load_model
from nanochat.common import all_reduce, compute_cleanup, get_base_dir, print0, script_argv
from nanochat.engine import Engine
from nanochat.report import get_report, subplots
from nanochat.tools.registry import ToolRegistry
from nanochat.training import (
    StepLog,
    Training,
    eval_due,
    make_optimizers,
    resume_training,
    source_model,
    start_run,
    train_loop,
)
from tasks.customjson import JSONLTask
from tasks.evaluate import fit_prompt
from tasks.gsm8k import GSM8K
from tasks.mixtures import rl_train_task

# ---------------------------------------------------------------------------------------------
# the pieces of one GRPO step (each testable on its own)

def group_advantages(rewards):
    """Rewards of one group (the samples of one prompt) -> advantages: reward - group mean (zero-mean within
    the group)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return r - r.mean()


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
    inputs = pad_sequence([torch.tensor(i, dtype=torch.long) for i, _ in rows], batch_first=True, padding_value=pad_id)
    targets = pad_sequence([torch.tensor(t, dtype=torch.long) for _, t in rows], batch_first=True, padding_value=-1)
    return inputs, targets


def policy_gradient_loss(model, inputs, targets, advantages, num_tokens):
    """-(sum over trained tokens of advantage x log-prob) / num_tokens. Passing the token count of the
    whole step (not of this chunk) lets chunks be accumulated into one mean."""
    nll = model(inputs, targets, loss_reduction="none")  # (B, T), 0 where targets == -1
    logp = -nll
    return -(logp * advantages[:, None].to(logp.dtype)).sum() / num_tokens


# ---------------------------------------------------------------------------------------------

def rollout(task, indices, engine, tokenizer, num_samples, max_new_tokens, temperature, top_k, seed, context_len):
    """Sample and reward the problems `indices`. -> dict of per-row lists: prompts, completions, masks,
    rewards, advantages (rows grouped per problem)."""
    out = {"prompts": [], "completions": [], "masks": [], "rewards": [], "advantages": []}
    for idx in indices:
        conv = task[idx]
        # a prompt too long for the context keeps its end
        prompt = fit_prompt(tokenizer.render_for_completion(conv), max(context_len // 2, context_len - max_new_tokens))
        budget = min(max_new_tokens, context_len - len(prompt))
        comps, masks = sample_completions(engine, prompt, num_samples, budget, temperature, top_k, seed=seed + idx)
        rewards = [float(task.reward(conv, completion_text(tokenizer, c, engine.stop_tokens))) for c in comps]
        out["prompts"] += [prompt] * num_samples
        out["completions"] += comps
        out["masks"] += masks
        out["rewards"] += rewards
        out["advantages"] += group_advantages(rewards).tolist()
    return out


def train_on_rollout(model, data, device, device_batch_size, pad_id, backward=torch.Tensor.backward):
    """Accumulate the policy-gradient loss of one rollout into the gradients (no optimizer step); backward(loss)
    runs each chunk's backward (a training Run's scales it under fp16). -> the loss value (this rank)."""
    num_tokens = max(1, sum(sum(m) for m in data["masks"]))
    rows = [i for i, a in enumerate(data["advantages"]) if a != 0.0 and sum(data["masks"][i]) > 0]
    total = 0.0
    for b in range(0, len(rows), device_batch_size):
        chunk = rows[b:b + device_batch_size]
        inputs, targets = build_rl_batch([data["prompts"][i] for i in chunk], [data["completions"][i] for i in chunk],
                                         [data["masks"][i] for i in chunk], pad_id)
        adv = torch.tensor([data["advantages"][i] for i in chunk], dtype=torch.float32, device=device)
        loss = policy_gradient_loss(model, inputs.to(device), targets.to(device), adv, num_tokens)
        backward(loss)
        total += loss.item()
    return total


def evaluate_pass_at_k(task, num_problems, engine, tokenizer, k, max_new_tokens, temperature, top_k, context_len,
                       rank=0, world_size=1, device="cpu", seed=10_000):
    """(pass@1, pass@k) on problems 0..num_problems-1 of task (split over ranks, summed)."""
    n = min(num_problems, len(task))
    p1, pk, count = 0.0, 0.0, 0
    for idx in range(rank, n, world_size):
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
    return path_fn(fig, "chat_rl_reward.png")


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, sources=["base", "mid", "sft", "rl"], source="sft")  # the output keeps the source's tag
    # data
    p.add_argument("--online", action="store_true",
                   help="train on the GSM8K train split (hub) instead of GSM8KSynthetic")
    p.add_argument("--train-size", type=int, default=100_000, help="GSM8KSynthetic problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-file", default="", help="JSONL of problems ({messages, answer}, tasks/customjson.py) to "
                   "train on and measure pass@k on, instead of the GSM8K-style sets")
    # rollouts
    p.add_argument("--num-steps", type=int, default=300)
    p.add_argument("--prompts-per-step", type=int, default=16, help="problems per step, all ranks together")
    p.add_argument("--num-samples", type=int, default=16, help="completions per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (embedding and lm_head)")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="all LRs are scaled by this (then decay to 0)")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=60,
                   help="pass@k every N steps (and before/after); <=0: before/after only")
    p.add_argument("--eval-problems", type=int, default=100, help="held-out GSM8K test problems for pass@k")
    p.add_argument("--eval-samples", type=int, default=0, help="k for pass@k (default: --num-samples)")
    p.add_argument("--save-every", type=int, default=60,
                   help="checkpoint every N steps (and at the end); <=0: end only")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this tag's RL run")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save a checkpoint after this many steps and "
                   "exit as if killed (continue with --resume)")
    return p.parse_args(script_argv(argv))


def start_training(args, run, source):
    """The source stage's model, or with --resume the latest checkpoint of chatrl_checkpoints/<source tag>."""
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["rl"][0], source["tag"])
    if args.resume:
        return resume_training(run, args, checkpoint_dir, source["tag"])
    model, tokenizer, _ = load_model(args.source, run.device, "train", model_tag=source["tag"], step=source["step"])
    return Training(run, args, model, tokenizer, source["tag"], checkpoint_dir)


def rl_tasks(args):
    """(the problems trained on, the problems pass@k is measured on)."""
    if args.task_file:
        return JSONLTask(args.task_file), JSONLTask(args.task_file)
    return rl_train_task(args.online, args.train_size, args.seed), GSM8K(split="test")  # test: never trained on


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args, seed=42 + args.seed)
    if args.prompts_per_step % run.world_size:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of ranks "
                         f"({run.world_size})")
    k_eval = args.eval_samples or args.num_samples
    source = source_model(args.source, args.model_tag, args.step)
    training = start_training(args, run, source)
    model, tokenizer = training.model, training.tokenizer
    engine = Engine(model, tokenizer, tools=ToolRegistry())
    context_len, pad_id = model.config.sequence_len, tokenizer.encode_special("<|assistant_end|>")
    train_task, eval_task = rl_tasks(args)
    print0(f"source: {args.source}/{source['tag']} | train problems: {len(train_task):,} | eval problems: "
           f"{min(args.eval_problems, len(eval_task))} | pass@{k_eval}")
    loop = {"eval_history": [], "reward_history": []}
    same = {"world_size": run.world_size, "prompts_per_step": args.prompts_per_step, "num_samples": args.num_samples,
            "source": source}
    # the problems and sampling seeds depend only on the step, so a resume continues exactly, on any number of ranks
    training.begin(make_optimizers(model, args, args.init_lr_frac), loop, args.num_steps, same,
                   lambda positions, world: positions[:1] * world)
    log = StepLog(run, args.num_steps, training.step, loop)

    def train_step(step):
        """One step: sample and reward this rank's problems, forward and backward over the rollout, the update."""
        indices = [(step * args.prompts_per_step + j) % len(train_task)
                   for j in range(run.rank, args.prompts_per_step, run.world_size)]
        model.eval()
        data = rollout(train_task, indices, engine, tokenizer, args.num_samples, args.max_new_tokens,
                       args.temperature, args.top_k, seed=1_000_003 * (step + 1), context_len=context_len)
        model.train()
        loss = train_on_rollout(model, data, run.device, args.device_batch_size, pad_id, run.backward)
        lrm = 1.0 - step / args.num_steps  # linear decay to 0
        training.update(lrm)
        rewards, rows, sampled = all_reduce([sum(data["rewards"]), len(data["rewards"]),
                                             sum(len(c) for c in data["completions"])], run.device)
        loop["reward_history"].append([step, rewards / rows])
        # tok/s counts the sampled tokens: generation, not the training pass, sets an RL step's pace
        return (all_reduce(loss, run.device) / run.world_size, lrm, sampled,
                {"mean reward": rewards / rows, "mean length": sampled / rows})

    def evaluate(step, last_step, resumed_here):
        # before the first step of a fresh run, every --eval-every steps and at the end
        if (step == 0 and not resumed_here) or eval_due(step, args.eval_every, last_step, resumed_here):
            model.eval()
            p1, pk = evaluate_pass_at_k(eval_task, args.eval_problems, engine, tokenizer, k_eval, args.max_new_tokens,
                                        1.0, args.top_k, context_len, run.rank, run.world_size, run.device)
            model.train()
            log.eval(step, {"pass@1": p1, f"pass@{k_eval}": pk})
            loop["eval_history"].append([step, p1, pk])

    step = train_loop(training, log, train_step, evaluate, lambda step: training.checkpoint_meta(
        step, {"step": step}, **same, **{"pass@1": loop["eval_history"][-1][1]}))
    log.close()
    if run.master and step == args.num_steps:
        write_report(args, source, loop, k_eval, min(args.eval_problems, len(eval_task)))
    compute_cleanup()
    return loop["eval_history"], loop["reward_history"]


def write_report(args, source, loop, k_eval, eval_problems):
    report = get_report()
    plot = save_reward_plot(loop["reward_history"], report.save_plot)
    (_, p1_before, pk_before), (_, p1_after, pk_after) = loop["eval_history"][0], loop["eval_history"][-1]
    report.log(section="Chat RL", stage="RL", summary={"GSM8K pass@1": p1_after}, data=[
        vars(args),
        {
            "Source": f"{args.source}/{source['tag']} step {source['step']}",
            "Eval problems": eval_problems,
            "pass@1 before": p1_before, f"pass@{k_eval} before": pk_before,
            "pass@1 after": p1_after, f"pass@{k_eval} after": pk_after,
            "Mean reward per step": " ".join(f"{r:.3f}" for _, r in loop["reward_history"]),
            "Evaluations (step, pass@1, pass@k)": "; ".join(f"{s}: {a:.3f}, {b:.3f}"
                                                            for s, a, b in loop["eval_history"]),
        },
    ], images=[("Mean reward per step", plot)])


if __name__ == "__main__":
    main()
