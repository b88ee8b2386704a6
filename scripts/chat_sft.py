"""Supervised finetuning (SFT) on conversations, with the loss only on what the assistant says.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size 4

Starts from the midtrained model (--source mid; `base` also works). Each batch row is one
conversation, truncated to --max-seq-len + 1 tokens and padded to the longest row of the batch;
targets are the next tokens where the tokenizer's mask is 1 (assistant text, tool calls,
<|assistant_end|>) and -1 (ignored) everywhere else, padding included. The loss of a step is the
sum over its supervised tokens divided by their number across all micro-batches and ranks, so
every supervised token weighs the same however the conversations are batched.

Data (--mixture, same syntax as mid_train): default arc,gsm8k,spellingbee,simplespelling,tools,chitchat,
chatterbot (--online: ARC, GSM8K, SmolTalk, tools) (+ --identity-file). A held-out slice (--val-examples)
gives the validation loss.
Multiple-choice accuracy (--eval-mc, default ARC-Easy and MMLU validation slices; custom:PATH for a
JSONL of conversations with "letters") is read off the logits of the answer letters after
<|assistant_start|>.

A step uses --examples-per-step conversations (all ranks); --num-iterations -1 runs --num-epochs
epochs. The order of conversations depends only on the step, so --resume is exact.
"""
import argparse
import dataclasses
import functools
import random

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce, compute_cleanup, dtype_name, print0, script_argv
from nanochat.report import get_report
from nanochat.training import (
    StepLog,
    add_finetune_args,
    add_training_args,
    collate,
    eval_due,
    init_wandb,
    length_bucket,
    load_start_model,
    make_optimizers,
    start_run,
    train_loop,
)
from tasks.arc import ARC
from tasks.customjson import CustomJSON
from tasks.evaluate import letter_token_ids
from tasks.mixtures import build_tasks, describe_tasks, mixture_spec, split_mixture
from tasks.mmlu import MMLU

SFT_DEFAULT = "arc,gsm8k,spellingbee,simplespelling,tools,chitchat,chatterbot"
MC_EVAL_DEFAULT = "arc-easy,mmlu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, sources=["mid", "base"], source="mid")
    add_finetune_args(p)
    p.add_argument("--online", action="store_true",
                   help="train on the online recipe (tasks/mixtures.py ONLINE_MIXTURES; downloads from the hub)")
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step (all ranks)")
    p.add_argument("--num-epochs", type=int, default=1, help="epochs over the mixture when --num-iterations is -1")
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-mc-every", type=int, default=200, help="multiple-choice accuracy every N steps (and at "
                   "the end); <=0: end only")
    p.add_argument("--eval-mc", default=MC_EVAL_DEFAULT, help="comma-separated: arc-easy, arc-challenge, mmlu "
                   "(validation splits), custom:PATH; empty: no multiple-choice eval")
    p.add_argument("--eval-mc-examples", type=int, default=200, help="examples per multiple-choice eval task")
    # a small LR decaying linearly over the whole run
    p.set_defaults(device_batch_size=4, init_lr_frac=0.02, warmdown_ratio=1.0)
    return p.parse_args(script_argv(argv))


# ------------------------------------------------------------------------------------------------
# batches


@functools.lru_cache(maxsize=3)  # deterministic, and reshuffling every step is slow: keep the last few epochs'
def epoch_order(n, epoch, seed=1234):
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return order


def step_examples(step, examples_per_step, n, rank, world_size):
    """Indices into the training set of this rank's conversations at `step`. The run reads the
    conversations in a fresh shuffle every epoch, examples_per_step at a time (a step may span two
    epochs); rank r takes the r-th contiguous share. Depends on nothing but the arguments, which is
    what makes resuming exact."""
    share = examples_per_step // world_size
    first = step * examples_per_step + rank * share
    return [epoch_order(n, g // n)[g % n] for g in range(first, first + share)]


def micro_batches(train_set, tokenizer, step, args, rank, world_size, grad_accum_steps, T, bucketed, device):
    """The step's grad_accum_steps (inputs, targets) batches for this rank, padded to the longest row, or with
    bucketed (for torch.compile's static shapes) to the length bucket that holds it."""
    idx = step_examples(step, args.examples_per_step, len(train_set), rank, world_size)
    pad_id = tokenizer.get_bos_token_id()
    B = args.device_batch_size
    batches = []
    for m in range(grad_accum_steps):
        rendered = [tokenizer.render_conversation(train_set[i], max_tokens=T + 1) for i in idx[m * B:(m + 1) * B]]
        longest = max(min(len(ids), T + 1) - 1 for ids, _ in rendered)
        batches.append(collate(rendered, pad_id, device, T=T, pad_to=length_bucket(longest, T) if bucketed else None))
    return batches


# ------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_loss(model, tokenizer, conversations, B, T, run):
    """Mean loss (nats) per supervised token over the conversations (all ranks together)."""
    pad_id = tokenizer.get_bos_token_id()
    mine = [conversations[i] for i in range(run.rank, len(conversations), run.world_size)]
    total, count = 0.0, 0
    for b in range(0, len(mine), B):
        rendered = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in mine[b:b + B]]
        x, y = collate(rendered, pad_id, run.device, T=T)
        total += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum().item())
    total, count = all_reduce([total, count], run.device)
    return total / count if count else float("nan")


@torch.no_grad()
def mc_accuracy(model, tokenizer, conversations, B, T, run):
    """Multiple-choice accuracy from the logits: for each conversation (the last message is the
    assistant's answer letter, conversation["letters"] the valid ones) the prediction is the valid
    letter whose token has the highest logit right after <|assistant_start|>. -> (accuracy, n)."""
    pad_id = tokenizer.get_bos_token_id()
    mine = [conversations[i] for i in range(run.rank, len(conversations), run.world_size)]
    correct = 0
    for b in range(0, len(mine), B):
        chunk = mine[b:b + B]
        prompts = [tokenizer.render_for_completion(c)[-T:] for c in chunk]  # keep the end: it holds the question
        x = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True, padding_value=pad_id)
        logits = model(x.to(run.device))
        for i, (c, p) in enumerate(zip(chunk, prompts)):
            scores = logits[i, len(p) - 1, letter_token_ids(tokenizer, c["letters"])]
            pred = c["letters"][int(scores.argmax().item())]
            correct += int(pred == c["messages"][-1]["content"])
    correct, total = all_reduce([correct, len(mine)], run.device)
    return (correct / total if total else float("nan")), int(total)


def load_mc_eval(spec, n):
    """{name: list of conversations} for --eval-mc: the first n of each (validation splits)."""
    out = {}
    for entry in [e.strip() for e in spec.split(",") if e.strip()]:
        if entry in ("arc-easy", "arc-challenge"):
            name = "ARC-Easy" if entry == "arc-easy" else "ARC-Challenge"
            task = ARC(name, "validation")
        elif entry == "mmlu":
            name, task = "MMLU", MMLU("all", "validation")
        elif entry.startswith("custom:"):
            name, task = entry, CustomJSON(entry[len("custom:"):])
        else:
            raise ValueError(f"unknown --eval-mc entry {entry!r}; "
                             "expected arc-easy, arc-challenge, mmlu or custom:PATH")
        stride = max(1, len(task) // n)  # spread the slice over the whole set (MMLU is sorted by subject)
        convs = [task[i] for i in range(0, len(task), stride)][:n]
        bad = [i for i, c in enumerate(convs) if "letters" not in c]
        if bad:
            raise ValueError(f"--eval-mc {entry}: conversation {bad[0]} has no 'letters' (not multiple choice)")
        out[name] = convs
    return out


# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTData:
    """The conversations of a run: the mixture, split into train and held-out, and the multiple-choice eval sets."""
    spec: str
    tasks: list
    train_set: object
    val_convs: list
    mc_sets: dict  # {name: conversations}


def sft_data(args):
    spec = mixture_spec(args, SFT_DEFAULT, "sft")
    tasks = build_tasks(spec, "sft", args.max_per_task)
    train_set, val_set = split_mixture(tasks, args.val_examples)
    for name, n in describe_tasks(tasks).items():
        print0(f"  task {name}: {n:,} conversations")
    mc_sets = load_mc_eval(args.eval_mc, args.eval_mc_examples) if args.eval_mc else {}
    print0(f"mixture: {spec} | train: {len(train_set):,} conversations | val: {len(val_set):,} | "
           f"mc eval: {', '.join(f'{k} ({len(v)})' for k, v in mc_sets.items()) or 'none'}")
    return SFTData(spec, tasks, train_set, list(val_set), mc_sets)


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args)
    wandb_run = init_wandb(run, args.run, "nanochat-sft", vars(args).copy())
    training = load_start_model(args, args.source, "chatsft_checkpoints", run)
    model, tokenizer = training.model, training.tokenizer  # model: uncompiled
    B, T = args.device_batch_size, args.max_seq_len
    if B == "auto":
        raise SystemExit("chat_sft takes a number for --device-batch-size (auto is for the packed stages)")
    if T + 1 > model.rotary_len:
        raise SystemExit(f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})")
    print0(f"model ({args.source} {training.tag}): {dataclasses.asdict(model.config)} | parameters: "
           f"{model.num_params():,} | dtype: {dtype_name(run.dtype)}")
    data = sft_data(args)
    train_set, val_convs, mc_sets = data.train_set, data.val_convs, data.mc_sets
    if args.examples_per_step % (B * run.world_size):
        raise SystemExit(f"--examples-per-step {args.examples_per_step} must be a multiple of device_batch_size x "
                         f"world_size = {B} x {run.world_size} = {B * run.world_size}")
    grad_accum_steps = args.examples_per_step // (B * run.world_size)
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, args.num_epochs * len(train_set) // args.examples_per_step)
    print0(f"batch: {B} conversations x {run.world_size} ranks x {grad_accum_steps} accumulation = "
           f"{args.examples_per_step} per step | steps: {num_iterations:,} "
           f"({num_iterations * args.examples_per_step / len(train_set):.2f} epochs)")

    loop = {"val_loss": None, "min_val_loss": float("inf"), "mc_acc": {}}
    same = {"world_size": run.world_size, "device_batch_size": B, "max_seq_len": T,
            "examples_per_step": args.examples_per_step, "mixture": data.spec,
            "num_train_conversations": len(train_set)}
    # the data order depends only on the step (no loader state), so any number of ranks continues it exactly
    training.begin(make_optimizers(model, args, args.init_lr_frac), loop, num_iterations, same,
                   lambda positions, world: positions[:1] * world)
    train_model = run.compiled(model)
    log = StepLog(run, num_iterations, training.step, loop, args.loss_file, wandb_run, model.estimate_flops(),
                  args.peak_flops)

    def train_step(step):
        """One optimizer step: forward and backward over the step's conversations, then the update."""
        batches = micro_batches(train_set, tokenizer, step, args, run.rank, run.world_size, grad_accum_steps, T,
                                run.compile, run.device)
        # every supervised token of the step (all micro-batches, all ranks) weighs the same
        supervised, processed = (int(n) for n in all_reduce([sum(int((y >= 0).sum().item()) for _, y in batches),
                                                             sum(x.numel() for x, _ in batches)], run.device))
        scale = run.world_size / max(1, supervised)  # the optimizers average gradients over ranks
        loss = torch.zeros((), device=run.device, dtype=torch.float32)
        for x, y in batches:
            micro = train_model(x, y, loss_reduction="sum")
            run.backward(micro * scale)
            loss += micro.detach().float()
        loss = all_reduce(loss.item(), run.device) / max(1, supervised)
        return loss, training.scheduled_update(step), processed, {"tokens": supervised}

    def evaluate(step, last_step, resumed_here):
        if eval_due(step, args.eval_every, last_step, resumed_here):
            model.eval()
            loop["val_loss"] = evaluate_loss(model, tokenizer, val_convs, B, T, run)
            model.train()
            loop["min_val_loss"] = min(loop["min_val_loss"], loop["val_loss"])
            log.eval(step, {"val loss": loop["val_loss"]})
        if mc_sets and eval_due(step, args.eval_mc_every, last_step, resumed_here):
            model.eval()
            loop["mc_acc"] = {name: mc_accuracy(model, tokenizer, convs, B, T, run)[0]
                              for name, convs in mc_sets.items()}
            model.train()
            log.eval(step, {f"{k} acc": v for k, v in loop["mc_acc"].items()})

    step = train_loop(training, log, train_step, evaluate, lambda step: training.checkpoint_meta(
        step, {"step": step}, source=args.source, val_loss=loop["val_loss"], mc_acc=loop["mc_acc"], **same))
    log.close()
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val loss: {loop['min_val_loss']:.4f}")
    if run.master and step == num_iterations:
        write_report(args, training, data, loop)
    compute_cleanup()


def write_report(args, training, data, loop):
    num_iterations = training.num_iterations
    # the summary column comes from chat_eval, which scores these tasks on more examples
    get_report().log(section="Chat SFT", stage="SFT", data=[vars(args), {
        "Source": f"{args.source} {training.tag}",
        "Mixture": data.spec,
        "Tasks": ", ".join(f"{k}: {v}" for k, v in describe_tasks(data.tasks).items()),
        "Training conversations": len(data.train_set),
        "Validation conversations": len(data.val_convs),
        "Number of parameters": training.model.num_params(),
        "Number of training steps": num_iterations,
        "Epochs": num_iterations * args.examples_per_step / len(data.train_set),
        "Minimum validation loss": loop["min_val_loss"],
        "Final validation loss": loop["val_loss"],
        **{f"{k} accuracy ({len(data.mc_sets.get(k, []))} examples)": v for k, v in loop["mc_acc"].items()},
        "Total training time (min)": loop["total_training_time"] / 60,
    }])


if __name__ == "__main__":
    main()
