"""Midtraining: continue the base model on conversations so it learns the chat format, tool use and
multiple-choice answers.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device-batch-size 32

Conversations are rendered with the tokenizer's chat format (each starts with <|bos|>) and packed
into rows of T+1 tokens exactly like pretraining documents: a row that starts in the middle of a
conversation gets a <|bos|> first. Every token is a target: midtraining teaches the format itself.

Data (--mixture, comma separated; `name*k` repeats an entry k times):
    chitchat, chatterbot   real human chats (offline registry packages)
    mc                     multiple-choice train splits (ARC, BoolQ, CSQA, HellaSwag, OBQA, PIQA,
                           SIQA, Winogrande), each capped at --mc-per-task
    arc                    ARC-Easy + ARC-Challenge train splits
    gsm8k                  synthetic GSM8K-style problems with calculator tool calls
    spellingbee, simplespelling   letter counting / spelling
    tools                  calculator, python REPL and search calls (tasks.tools.ToolUse)
    smoltalk               SmolTalk (needs the network)
    custom:PATH            conversations from a JSONL file (tasks.customjson)
The default is chitchat,chatterbot,mc,gsm8k,spellingbee,simplespelling,tools (--online: SmolTalk, MMLU,
GSM8K, tools),
plus --identity-file when given. A held-out slice of the shuffled mixture (--val-examples
conversations) is never trained on and gives the validation bpb.

--num-iterations -1 trains one epoch of the mixture. --resume continues an interrupted run of
--save-tag (else --model-tag) exactly (model, optimizers, data position, RNG).

Two phases (a copy drill, then midtraining from the drill's weights):
    python -m scripts.mid_train --mixture=copy --num-iterations=300 --save-tag=copydrill
    python -m scripts.mid_train --source=mid --model-tag=copydrill --save-tag=d4
Later stages load the largest d<N> tag, so a drill tag not named d<N> is never picked up by them; its
report section is "Midtraining (<tag>)", next to the real one.
"""
import argparse
import dataclasses
import re
import time

import torch

from nanochat.common import all_reduce, compute_cleanup, dtype_name, print0, script_argv
from nanochat.dataloader import packed_loader, render_stream
from nanochat.hardware import resolve_device_batch
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.reshard import reshard_stream_positions
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (
    Prefetch,
    StepLog,
    accumulation_steps,
    add_finetune_args,
    add_training_args,
    eval_due,
    init_wandb,
    load_start_model,
    make_optimizers,
    start_run,
    train_loop,
)
from tasks.mixtures import build_tasks, describe_tasks, mixture_spec, split_mixture

MID_DEFAULT = "chitchat,chatterbot,mc,gsm8k,spellingbee,simplespelling,tools"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, sources=["base", "mid"], source="base")
    add_finetune_args(p)
    p.add_argument("--save-tag", default="", help="mid_checkpoints/<tag> this run writes and --resume continues "
                   "(default: the loaded tag)")
    p.add_argument("--online", action="store_true",
                   help="train on the online recipe (tasks/mixtures.py ONLINE_MIXTURES; downloads from the hub)")
    p.add_argument("--mc-per-task", type=int, default=3000, help="cap on each multiple-choice train split")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all ranks)")
    p.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation (all ranks, "
                   "at most the held-out slice)")
    return p.parse_args(script_argv(argv))


@dataclasses.dataclass
class Mixture:
    """The rendered conversations of a run: this rank's token streams (train and held-out) and what they hold."""
    spec: str
    tasks: list
    train_set: object
    val_set: object
    train_stream: list
    train_starts: list
    val_stream: list
    val_starts: list
    train_tokens: int  # in the shortest rank's stream, times the ranks
    val_tokens: int  # in the shortest rank's held-out stream


def load_mixture(args, tokenizer, run):
    t0 = time.time()
    spec = mixture_spec(args, MID_DEFAULT, "mid")
    tasks = build_tasks(spec, "mid", args.max_per_task, args.mc_per_task)
    train_set, val_set = split_mixture(tasks, args.val_examples)
    for name, n in describe_tasks(tasks).items():
        print0(f"  task {name}: {n:,} conversations")
    train_stream, train_starts = render_stream(train_set, tokenizer, run.rank, run.world_size)
    val_stream, val_starts = render_stream(val_set, tokenizer, run.rank % len(val_set),
                                           min(run.world_size, len(val_set)))
    shortest_train, shortest_val = all_reduce([len(train_stream), len(val_stream)], run.device, op="min")
    mix = Mixture(spec, tasks, train_set, val_set, train_stream, train_starts, val_stream, val_starts,
                  int(shortest_train) * run.world_size, int(shortest_val))
    print0(f"mixture: {spec}\n  train: {len(train_set):,} conversations, ~{mix.train_tokens:,} tokens | "
           f"val: {len(val_set):,} conversations | rendered in {time.time() - t0:.1f}s")
    return mix


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args)
    wandb_run = init_wandb(run, args.run, "nanochat-mid", vars(args).copy())
    training = load_start_model(args, args.source, "mid_checkpoints", run, args.save_tag)
    model, tokenizer, T = training.model, training.tokenizer, args.max_seq_len  # model: uncompiled
    if T > model.rotary_len:
        raise SystemExit(f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})")
    B = resolve_device_batch(args, model, T, run)
    print0(f"model: {dataclasses.asdict(model.config)} | parameters: {model.num_params():,} "
           f"| dtype: {dtype_name(run.dtype)}")
    mix = load_mixture(args, tokenizer, run)
    grad_accum_steps = accumulation_steps(args.total_batch_size, B, T, run.world_size)
    # --num-iterations -1: one epoch; each row takes about T+1 tokens of the stream
    num_iterations = args.num_iterations if args.num_iterations > 0 else \
        max(1, mix.train_tokens // ((T + 1) * B * run.world_size * grad_accum_steps))
    eval_steps = max(1, min(args.eval_tokens // (B * T * run.world_size), max(1, mix.val_tokens // (T + 1)) // B))
    print0(f"batch: {B} x {T} x {run.world_size} ranks x {grad_accum_steps} accumulation = {args.total_batch_size:,} "
           f"tokens/step | steps: {num_iterations:,} | eval steps: {eval_steps}")

    loop = {"min_val_bpb": float("inf"), "val_bpb": None}
    same = {"world_size": run.world_size, "device_batch_size": B, "max_seq_len": T,
            "total_batch_size": args.total_batch_size, "mixture": mix.spec,
            "num_train_conversations": len(mix.train_set)}
    position = training.begin(make_optimizers(model, args, args.init_lr_frac), loop, num_iterations, same,
                              reshard_stream_positions)
    train_model = run.compiled(model)
    bos, token_bytes = tokenizer.get_bos_token_id(), get_token_bytes(run.device)
    data = Prefetch(packed_loader(mix.train_stream, mix.train_starts, B, T, bos, run.device, resume_state=position),
                    position)
    log = StepLog(run, num_iterations, training.step, loop, args.loss_file, wandb_run, model.estimate_flops(),
                  args.peak_flops)

    def train_step(step):
        """One optimizer step: forward and backward over the micro-batches, then the update."""
        loss = torch.zeros((), device=run.device)
        for _ in range(grad_accum_steps):
            micro = train_model(data.x, data.y)
            run.backward(micro / grad_accum_steps)  # each rank averages its micro-batches, the optimizers the ranks
            loss += micro.detach()
            data.advance()  # the next batch is read while the device works
        loss = all_reduce(loss.item() / grad_accum_steps, run.device) / run.world_size
        return loss, training.scheduled_update(step), args.total_batch_size, None

    def evaluate(step, last_step, resumed_here):
        if eval_due(step, args.eval_every, last_step, resumed_here):
            train_model.eval()
            val_loader = packed_loader(mix.val_stream, mix.val_starts, B, T, bos, run.device)
            val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            train_model.train()
            loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
            log.eval(step, {"val bpb": val_bpb})

    step = train_loop(training, log, train_step, evaluate, lambda step: training.checkpoint_meta(
        step, data.position, val_bpb=loop["val_bpb"], **same))
    log.close()
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val bpb: {loop['min_val_bpb']:.4f}")
    if run.master and step == num_iterations:
        write_report(args, training, mix, loop, log)
    compute_cleanup()


def write_report(args, training, mix, loop, log):
    # no summary metric: val bpb on chat data is not comparable with the base row; chat_eval fills MID
    # a run under a tag later stages do not pick (a drill) gets its own section, not the one they read
    section = "Midtraining" if re.fullmatch(r"d\d+", training.tag) else f"Midtraining ({training.tag})"
    get_report().log(section=section, stage="MID", data=[
        vars(args),
        {
            "Start": f"{args.source} {args.model_tag or '(largest)'}" if not args.resume else "resumed",
            "Saved as": f"mid_checkpoints/{training.tag}",
            "Mixture": mix.spec,
            "Tasks": ", ".join(f"{k}: {v}" for k, v in describe_tasks(mix.tasks).items()),
            "Training conversations": len(mix.train_set),
            "Validation conversations": len(mix.val_set),
            "Number of parameters": training.model.num_params(),
            "Number of training steps": log.num_iterations,
            "Number of training tokens": args.total_batch_size * log.num_iterations,
            "Minimum validation bpb": loop["min_val_bpb"],
            "Final validation bpb": loop["val_bpb"],
            "Last step tok/s": log.tok_per_sec,
            "Total training time (min)": loop["total_training_time"] / 60,
        },
    ])


if __name__ == "__main__":
    main()
