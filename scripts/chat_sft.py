"""Supervised finetuning (SFT) on conversations, with the loss only on what the assistant says.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size 4

Starts from the midtrained model (--source mid; `base` also works). Each batch row is one
conversation, truncated to --max-seq-len + 1 tokens and padded to the longest row of the batch;
targets are the next tokens where the tokenizer's mask is 1 (assistant text, tool calls,
<|assistant_end|>) and -1 (ignored) everywhere else, padding included. The loss of a step is the
sum over its supervised tokens divided by their number across all micro-batches and ranks, so
every supervised token weighs the same however the conversations are batched.

Data (--mixture, same syntax as mid_train): default arc,gsm8k,spellingbee,simplespelling,chitchat,
chatterbot (--online: ARC, GSM8K, SmolTalk) (+ --identity-file). A held-out slice (--val-examples) gives the validation loss.
Multiple-choice accuracy (--eval-mc, default ARC-Easy and MMLU validation slices; custom:PATH for a
JSONL of conversations with "letters") is read off the logits of the answer letters after
<|assistant_start|>.

A step uses --examples-per-step conversations (all ranks); --num-iterations -1 runs --num-epochs
epochs. The order of conversations depends only on the step, so --resume is exact.
"""
import argparse
import dataclasses
import json
import random
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import start_fresh
from nanochat.common import autocast, resolve_dtype, script_argv, compute_cleanup, compute_init, format_eta, print0
from nanochat.training import (check_resume, collate, gather_objects, lr_multiplier, restore_training_state,
                               save_training_checkpoint, set_lrs)
from scripts.mid_train import add_common_args, load_start_model, make_optimizers
from tasks.mixtures import build_tasks, describe_tasks, mixture_spec, split_mixture

SFT_DEFAULT = "arc,gsm8k,spellingbee,simplespelling,chitchat,chatterbot"
MC_EVAL_DEFAULT = "arc-easy,mmlu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--source", default="mid", choices=["mid", "base"], help="which stage's model to finetune")
    p.add_argument("--online", action="store_true", help="train on the online recipe (tasks/mixtures.py ONLINE_MIXTURES; downloads from the hub)")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step (all ranks)")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs over the mixture when --num-iterations is -1")
    p.add_argument("--init-lr-frac", type=float, default=0.02, help="LRs are the base LRs times this")
    p.add_argument("--warmdown-ratio", type=float, default=1.0, help="default: linear decay over the whole run")
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-mc-every", type=int, default=200, help="multiple-choice accuracy every N steps (and at "
                   "the end); <=0: end only")
    p.add_argument("--eval-mc", default=MC_EVAL_DEFAULT, help="comma-separated: arc-easy, arc-challenge, mmlu "
                   "(validation splits), custom:PATH; empty: no multiple-choice eval")
    p.add_argument("--eval-mc-examples", type=int, default=200, help="examples per multiple-choice eval task")
    p.set_defaults(device_batch_size=4)
    return p.parse_args(script_argv(argv))


# ------------------------------------------------------------------------------------------------
# batches


def epoch_order(n, epoch, seed=1234):
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return order


class _OrderCache:
    """epoch_order is deterministic; keep the last few epochs' orders (reshuffling every step is slow)."""

    def __init__(self):
        self.cache = {}

    def __call__(self, n, epoch):
        if (n, epoch) not in self.cache:
            if len(self.cache) > 2:
                self.cache.pop(next(iter(self.cache)))
            self.cache[(n, epoch)] = epoch_order(n, epoch)
        return self.cache[(n, epoch)]


_orders = _OrderCache()


def step_examples(step, examples_per_step, n, rank, world_size):
    """Indices into the training set of this rank's conversations at `step`. The run reads the
    conversations in a fresh shuffle every epoch, examples_per_step at a time (a step may span two
    epochs); rank r takes the r-th contiguous share. Depends on nothing but the arguments, which is
    what makes resuming exact."""
    share = examples_per_step // world_size
    first = step * examples_per_step + rank * share
    return [_orders(n, g // n)[g % n] for g in range(first, first + share)]


def micro_batches(train_set, tokenizer, step, args, rank, world_size, grad_accum_steps, T, pad_to, device):
    """The step's grad_accum_steps (inputs, targets) batches for this rank."""
    idx = step_examples(step, args.examples_per_step, len(train_set), rank, world_size)
    pad_id = tokenizer.get_bos_token_id()
    B = args.device_batch_size
    batches = []
    for m in range(grad_accum_steps):
        rendered = [tokenizer.render_conversation(train_set[i], max_tokens=T + 1) for i in idx[m * B:(m + 1) * B]]
        batches.append(collate(rendered, pad_id, device, T=T, pad_to=pad_to))
    return batches


# ------------------------------------------------------------------------------------------------
# evaluation


def _all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def evaluate_loss(model, tokenizer, conversations, B, T, device, autocast_ctx, rank=0, world_size=1):
    """Mean loss (nats) per supervised token over the conversations (all ranks together)."""
    pad_id = tokenizer.get_bos_token_id()
    mine = [conversations[i] for i in range(rank, len(conversations), world_size)]
    total, count = 0.0, 0
    for b in range(0, len(mine), B):
        rendered = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in mine[b:b + B]]
        x, y = collate(rendered, pad_id, device, T=T)
        with autocast_ctx:
            total += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum().item())
    total, count = _all_reduce_sum([total, count], device)
    return total / count if count else float("nan")


@torch.no_grad()
def mc_accuracy(model, tokenizer, conversations, B, T, device, autocast_ctx, rank=0, world_size=1):
    """Multiple-choice accuracy from the logits: for each conversation (the last message is the
    assistant's answer letter, conversation["letters"] the valid ones) the prediction is the valid
    letter whose token has the highest logit right after <|assistant_start|>. -> (accuracy, n)."""
    pad_id = tokenizer.get_bos_token_id()
    mine = [conversations[i] for i in range(rank, len(conversations), world_size)]
    correct = 0
    for b in range(0, len(mine), B):
        chunk = mine[b:b + B]
        prompts = [tokenizer.render_for_completion(c)[-T:] for c in chunk]  # keep the end: it holds the question
        L = max(len(p) for p in prompts)
        x = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        with autocast_ctx:
            logits = model(x.to(device))
        for i, (c, p) in enumerate(zip(chunk, prompts)):
            letter_ids = []
            for letter in c["letters"]:
                ids = tokenizer.encode(letter)
                if len(ids) != 1:
                    raise ValueError(f"answer letter {letter!r} is not a single token ({ids})")
                letter_ids.append(ids[0])
            scores = logits[i, len(p) - 1, letter_ids]
            pred = c["letters"][int(scores.argmax().item())]
            correct += int(pred == c["messages"][-1]["content"])
    correct, total = _all_reduce_sum([correct, len(mine)], device)
    return (correct / total if total else float("nan")), int(total)


def load_mc_eval(spec, n):
    """{name: list of conversations} for --eval-mc: the first n of each (validation splits)."""
    out = {}
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        if entry in ("arc-easy", "arc-challenge"):
            from tasks.arc import ARC
            name = "ARC-Easy" if entry == "arc-easy" else "ARC-Challenge"
            task = ARC(name, "validation")
        elif entry == "mmlu":
            from tasks.mmlu import MMLU
            name, task = "MMLU", MMLU("all", "validation")
        elif entry.startswith("custom:"):
            from tasks.customjson import CustomJSON
            name, task = entry, CustomJSON(entry[len("custom:"):])
        else:
            raise ValueError(f"unknown --eval-mc entry {entry!r}; expected arc-easy, arc-challenge, mmlu or custom:PATH")
        stride = max(1, len(task) // n)  # spread the slice over the whole set (MMLU is sorted by subject)
        convs = [task[i] for i in range(0, len(task), stride)][:n]
        bad = [i for i, c in enumerate(convs) if "letters" not in c]
        if bad:
            raise ValueError(f"--eval-mc {entry}: conversation {bad[0]} has no 'letters' (not multiple choice)")
        out[name] = convs
    return out


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None)
    master = rank == 0
    device_type = device.type
    dtype = resolve_dtype(args.dtype, device_type)
    autocast_ctx = autocast(dtype, device_type)
    use_compile = args.compile == "on" or (args.compile == "auto" and device_type == "cuda")

    wandb_run = None
    if master and args.run and args.run != "dummy":
        import wandb
        wandb_run = wandb.init(project="nanochat-sft", name=args.run, config=user_config)

    model, tokenizer, model_tag, checkpoint_dir, start_step, rank_state, resume_meta = \
        load_start_model(args, args.source, "chatsft_checkpoints", device, rank)
    config = model.config
    B, T = args.device_batch_size, args.max_seq_len
    if T + 1 > model.rotary_len:
        raise SystemExit(f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})")
    num_params = model.num_params()
    print0(f"model ({args.source} {model_tag}): {dataclasses.asdict(config)} | parameters: {num_params:,} | dtype: {dtype}")

    # --- data --------------------------------------------------------------------------------------
    spec = mixture_spec(args, SFT_DEFAULT, "sft")
    tasks = build_tasks(spec, "sft", args.max_per_task)
    train_set, val_set = split_mixture(tasks, args.val_examples)
    val_convs = list(val_set)
    for name, n in describe_tasks(tasks).items():
        print0(f"  task {name}: {n:,} conversations")
    mc_sets = load_mc_eval(args.eval_mc, args.eval_mc_examples) if args.eval_mc else {}
    print0(f"mixture: {spec} | train: {len(train_set):,} conversations | val: {len(val_convs):,} | "
           f"mc eval: {', '.join(f'{k} ({len(v)})' for k, v in mc_sets.items()) or 'none'}")

    per_fwdbwd = B * world_size
    if args.examples_per_step % per_fwdbwd:
        raise SystemExit(f"--examples-per-step {args.examples_per_step} must be a multiple of device_batch_size x "
                         f"world_size = {B} x {world_size} = {per_fwdbwd}")
    grad_accum_steps = args.examples_per_step // per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = max(1, args.num_epochs * len(train_set) // args.examples_per_step)
    print0(f"batch: {B} conversations x {world_size} ranks x {grad_accum_steps} accumulation = "
           f"{args.examples_per_step} per step | steps: {num_iterations:,} "
           f"({num_iterations * args.examples_per_step / len(train_set):.2f} epochs)")
    pad_to = T if use_compile else None  # static shapes for torch.compile

    optimizers = make_optimizers(model, args)
    loop = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "val_loss": None, "min_val_loss": float("inf"),
            "mc_acc": {}}
    if args.resume:
        check_resume(resume_meta, {"world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                                   "examples_per_step": args.examples_per_step, "mixture": spec,
                                   "num_train_conversations": len(train_set)}, num_iterations)
        restore_training_state(optimizers, rank_state)
        loop.update(resume_meta["loop_state"])
        print0(f"resumed from {checkpoint_dir} at step {start_step}")
    elif master:
        prev = start_fresh(checkpoint_dir)
        if prev:
            print0(f"new run of tag {model_tag}: earlier checkpoints moved to {prev}")

    orig_model = model
    if use_compile:
        model = torch.compile(model, dynamic=False)

    loss_file = open(args.loss_file, "a") if master and args.loss_file else None
    ema_beta = 0.9
    step = start_step
    run_time, timed_steps = 0.0, 0
    while True:
        last_step = step == num_iterations
        resumed_here = args.resume and step == start_step
        evaluate_now = not (resumed_here and not last_step)

        if evaluate_now and (last_step or (args.eval_every > 0 and step % args.eval_every == 0)):
            model.eval()
            val_loss = evaluate_loss(orig_model, tokenizer, val_convs, B, T, device, autocast_ctx, rank, world_size)
            model.train()
            loop["val_loss"], loop["min_val_loss"] = val_loss, min(loop["min_val_loss"], val_loss)
            print0(f"step {step:05d} | val loss: {val_loss:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/loss": val_loss})
        if mc_sets and evaluate_now and (last_step or (args.eval_mc_every > 0 and step % args.eval_mc_every == 0)):
            orig_model.eval()
            accs = {name: mc_accuracy(orig_model, tokenizer, convs, B, T, device, autocast_ctx, rank, world_size)[0]
                    for name, convs in mc_sets.items()}
            orig_model.train()
            loop["mc_acc"] = accs
            print0(f"step {step:05d} | " + " | ".join(f"{k} acc: {v:.4f}" for k, v in accs.items()))
            if wandb_run:
                wandb_run.log({"step": step, **{f"mc/{k}": v for k, v in accs.items()}})

        stop_here = step == args.stop_after
        periodic = args.save_every > 0 and step % args.save_every == 0 and step > 0
        if last_step or stop_here or (periodic and not resumed_here):
            meta = {
                "step": step,
                "model_config": dataclasses.asdict(config),
                "user_config": user_config,
                "source": args.source,
                "val_loss": loop["val_loss"], "mc_acc": loop["mc_acc"],
                "world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                "examples_per_step": args.examples_per_step, "num_iterations": num_iterations,
                "mixture": spec, "num_train_conversations": len(train_set),
                "loader_states": gather_objects({"step": step}, world_size),  # the data order depends only on the step
                "loop_state": loop,
            }
            save_training_checkpoint(checkpoint_dir, step, orig_model, optimizers, meta, rank, args.keep_last)
        if last_step or stop_here:
            break

        # --- one optimizer step ------------------------------------------------------------------
        t0 = time.time()
        batches = micro_batches(train_set, tokenizer, step, args, rank, world_size, grad_accum_steps, T, pad_to, device)
        # every supervised token of the step (all micro-batches, all ranks) weighs the same
        n_local = sum(int((y >= 0).sum().item()) for _, y in batches)
        n_global = n_local
        if ddp:
            t = torch.tensor(n_local, dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            n_global = int(t.item())
        # the optimizers average gradients over ranks, hence the world_size factor
        scale = world_size / max(1, n_global)
        train_loss = torch.zeros((), device=device, dtype=torch.float32)
        for x, y in batches:
            with autocast_ctx:
                loss = model(x, y, loss_reduction="sum")
            train_loss += loss.detach().float()
            (loss * scale).backward()
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizers, step, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
        loss_value = train_loss.item() / max(1, n_global)
        dt = time.time() - t0

        loop["smooth_train_loss"] = ema_beta * loop["smooth_train_loss"] + (1 - ema_beta) * loss_value
        smooth = loop["smooth_train_loss"] / (1 - ema_beta ** (step + 1))
        if step - start_step >= 3:
            loop["total_training_time"] += dt
            run_time += dt
            timed_steps += 1
        tok_per_sec = n_global / dt  # supervised tokens
        eta = format_eta((run_time / timed_steps if timed_steps else dt) * (num_iterations - step - 1))
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {smooth:.6f} "
               f"| lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | supervised tok/s {tok_per_sec:,.0f} | eta {eta}")
        if loss_file:
            loss_file.write(json.dumps({"step": step, "loss": loss_value, "lrm": lrm, "tokens": n_global}) + "\n")
            loss_file.flush()
        if wandb_run:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/tokens": n_global})
        step += 1

    if loss_file:
        loss_file.close()
    finished = step == num_iterations
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val loss: {loop['min_val_loss']:.4f}")
    if master and finished:
        from nanochat.report import get_report
        # the summary column comes from chat_eval, which scores these tasks on more examples
        get_report().log(section="Chat SFT", stage="SFT", data=[
            user_config,
            {
                "Source": f"{args.source} {model_tag}",
                "Mixture": spec,
                "Tasks": ", ".join(f"{k}: {v}" for k, v in describe_tasks(tasks).items()),
                "Training conversations": len(train_set),
                "Validation conversations": len(val_convs),
                "Number of parameters": num_params,
                "Number of training steps": num_iterations,
                "Epochs": num_iterations * args.examples_per_step / len(train_set),
                "Minimum validation loss": loop["min_val_loss"],
                "Final validation loss": loop["val_loss"],
                **{f"{k} accuracy ({len(mc_sets.get(k, []))} examples)": v for k, v in loop["mc_acc"].items()},
                "Total training time (min)": loop["total_training_time"] / 60,
            },
        ])
    if wandb_run:
        wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
