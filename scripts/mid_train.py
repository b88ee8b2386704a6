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
    smoltalk               SmolTalk (needs the network)
    custom:PATH            conversations from a JSONL file (tasks.customjson)
The default is chitchat,chatterbot,mc,gsm8k,spellingbee,simplespelling (--online: SmolTalk, MMLU, GSM8K),
plus --identity-file when given. A held-out slice of the shuffled mixture (--val-examples
conversations) is never trained on and gives the validation bpb.

--num-iterations -1 trains one epoch of the mixture. --resume continues an interrupted run of
--model-tag exactly (model, optimizers, data position, RNG).
"""
import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint,
                                         load_model, start_fresh)
from nanochat.common import autocast, resolve_dtype, script_argv, compute_cleanup, compute_init, format_eta, get_base_dir, print0
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.training import (check_resume, gather_objects, lr_multiplier, restore_training_state,
                               save_training_checkpoint, set_lrs)
from tasks.mixtures import build_tasks, describe_tasks, mixture_spec, split_mixture

GPU_PEAK_FLOPS = 989e12
MID_DEFAULT = "chitchat,chatterbot,mc,gsm8k,spellingbee,simplespelling"


# ------------------------------------------------------------------------------------------------
# packing conversations into rows


def render_stream(task, tokenizer, rank=0, world_size=1):
    """Render this rank's conversations (rank, rank+W, ...) into one token stream.
    -> (stream int32 array, starts bool array: True where a conversation begins)."""
    chunks, lengths = [], []
    for i in range(rank, len(task), world_size):
        ids, _ = tokenizer.render_conversation(task[i], max_tokens=10**9)
        chunks.append(np.asarray(ids, dtype=np.int32))
        lengths.append(len(ids))
    if not chunks:
        raise ValueError(f"rank {rank} of {world_size} has no conversations ({len(task)} in all)")
    stream = np.concatenate(chunks)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.cumsum([0] + lengths[:-1])] = True
    return stream, starts


def packed_loader(stream, starts, B, T, bos, device="cpu", resume_state=None):
    """Yield (inputs, targets, state) forever: B rows of T+1 tokens cut from the stream in order
    (wrapping around at the end = a new epoch). A row starting mid-conversation begins with a
    restated <|bos|>. state = {"epoch", "pos"} is the position after the batch (pass it back to resume)."""
    device = torch.device(device)
    n = len(stream)
    state = dict(resume_state) if resume_state else {"epoch": 0, "pos": 0}
    epoch, pos = state["epoch"], state["pos"]
    use_pinned = device.type == "cuda"
    while True:
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            if starts[pos]:
                rows[b] = np.take(stream, np.arange(pos, pos + T + 1), mode="wrap")
                pos += T + 1
            else:
                rows[b, 0] = bos
                rows[b, 1:] = np.take(stream, np.arange(pos, pos + T), mode="wrap")
                pos += T
            epoch, pos = epoch + pos // n, pos % n
        buf = torch.from_numpy(rows)
        if use_pinned:
            buf = buf.pin_memory()
        buf = buf.to(device, non_blocking=use_pinned)
        yield buf[:, :-1], buf[:, 1:], {"epoch": epoch, "pos": pos}


def all_reduce_min(value, device):
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# ------------------------------------------------------------------------------------------------


def add_common_args(p):
    """Flags shared by mid_train and chat_sft."""
    p.add_argument("--run", default="dummy", help="wandb run name; wandb is used only when set and not 'dummy'")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on CUDA with bf16 support, else float32")
    p.add_argument("--model-tag", default="", help="tag of the model to load (default: the largest) and to save under")
    p.add_argument("--step", type=int, default=-1, help="step of the model to load (default: latest)")
    p.add_argument("--mixture", default="", help="comma-separated training tasks (see the module docstring)")
    p.add_argument("--identity-file", default="", help="JSONL of identity conversations added to the mixture")
    p.add_argument("--max-per-task", type=int, default=-1, help="cap examples per task (-1: no cap)")
    p.add_argument("--val-examples", type=int, default=500, help="conversations held out for validation "
                   "(at most a tenth of the mixture)")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward/backward per rank")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the data)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps; -1: only at the end")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --model-tag")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on for CUDA)")
    p.add_argument("--loss-file", default="", help="rank 0 appends {step, loss, lrm} JSON lines here")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save a checkpoint after this many steps and "
                   "exit as if killed (continue with --resume)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--online", action="store_true", help="train on the online recipe (tasks/mixtures.py ONLINE_MIXTURES; downloads from the hub)")
    p.add_argument("--mc-per-task", type=int, default=3000, help="cap on each multiple-choice train split")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all ranks)")
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="LRs are the base LRs times this")
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation (all ranks, "
                   "at most the held-out slice)")
    return p.parse_args(script_argv(argv))


def load_start_model(args, source, out_dirname, device, rank):
    """The model to train: from the source stage, or (--resume) from this stage's latest checkpoint.
    -> (model, tokenizer, tag, checkpoint_dir, start_step, rank_state, meta_or_None)."""
    src_dir = os.path.join(get_base_dir(), {"base": "base_checkpoints", "mid": "mid_checkpoints"}[source])
    tag = args.model_tag
    out_root = os.path.join(get_base_dir(), out_dirname)
    if args.resume:
        tag = tag or find_largest_model(out_root)
        checkpoint_dir = os.path.join(out_root, tag)
        start_step = find_last_step(checkpoint_dir)
        model, tokenizer, meta = build_model(checkpoint_dir, start_step, device, "train")
        _, rank_state, _ = load_checkpoint(checkpoint_dir, start_step, device, load_optimizer=True, rank=rank)
        return model, tokenizer, tag, checkpoint_dir, start_step, rank_state, meta
    if not tag:
        try:
            tag = find_largest_model(src_dir)
        except FileNotFoundError:
            pass  # load_model below gives the helpful error
    model, tokenizer, _ = load_model(source, device, "train", model_tag=tag or None,
                                     step=args.step if args.step >= 0 else None)
    checkpoint_dir = os.path.join(out_root, tag)
    return model, tokenizer, tag, checkpoint_dir, 0, None, None


def make_optimizers(model, args):
    f = args.init_lr_frac
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * f, embedding_lr=args.embedding_lr * f,
                                        matrix_lr=args.matrix_lr * f, weight_decay=args.weight_decay)
    return optimizers  # setup_optimizers records each group's initial_lr


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
        wandb_run = wandb.init(project="nanochat-mid", name=args.run, config=user_config)

    # --- model -------------------------------------------------------------------------------------
    model, tokenizer, model_tag, checkpoint_dir, start_step, rank_state, resume_meta = \
        load_start_model(args, "base", "mid_checkpoints", device, rank)
    config = model.config
    B, T = args.device_batch_size, args.max_seq_len
    if T > model.rotary_len:
        raise SystemExit(f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})")
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    bos = tokenizer.get_bos_token_id()
    token_bytes = get_token_bytes(device)
    print0(f"model: {dataclasses.asdict(config)} | parameters: {num_params:,} | dtype: {dtype}")

    # --- data --------------------------------------------------------------------------------------
    t0 = time.time()
    spec = mixture_spec(args, MID_DEFAULT, "mid")
    tasks = build_tasks(spec, "mid", args.max_per_task, args.mc_per_task)
    train_set, val_set = split_mixture(tasks, args.val_examples)
    for name, n in describe_tasks(tasks).items():
        print0(f"  task {name}: {n:,} conversations")
    train_stream, train_starts = render_stream(train_set, tokenizer, rank, world_size)
    val_stream, val_starts = render_stream(val_set, tokenizer, rank % len(val_set), min(world_size, len(val_set)))
    train_tokens = all_reduce_min(len(train_stream), device) * world_size
    print0(f"mixture: {spec}\n  train: {len(train_set):,} conversations, ~{train_tokens:,} tokens | "
           f"val: {len(val_set):,} conversations | rendered in {time.time() - t0:.1f}s")

    tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size x "
                         f"max_seq_len x world_size = {B} x {T} x {world_size} = {tokens_per_fwdbwd}")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:  # one epoch: each row takes about T+1 tokens of the stream
        num_iterations = max(1, train_tokens // ((T + 1) * B * world_size * grad_accum_steps))
    val_rows = max(1, all_reduce_min(len(val_stream), device) // (T + 1))
    eval_steps = max(1, min(args.eval_tokens // tokens_per_fwdbwd, val_rows // B))
    print0(f"batch: {B} x {T} x {world_size} ranks x {grad_accum_steps} accumulation = {args.total_batch_size:,} "
           f"tokens/step | steps: {num_iterations:,} | eval steps: {eval_steps}")

    optimizers = make_optimizers(model, args)
    loop = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "min_val_bpb": float("inf"), "val_bpb": None}
    loader_state = None
    if args.resume:
        check_resume(resume_meta, {"world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                                   "total_batch_size": args.total_batch_size, "mixture": spec,
                                   "num_train_conversations": len(train_set)}, num_iterations)
        restore_training_state(optimizers, rank_state)
        loader_state = resume_meta["loader_states"][rank]
        loop.update(resume_meta["loop_state"])
        print0(f"resumed from {checkpoint_dir} at step {start_step}")
    elif master:
        prev = start_fresh(checkpoint_dir)
        if prev:
            print0(f"new run of tag {model_tag}: earlier checkpoints moved to {prev}")

    orig_model = model
    if use_compile:
        model = torch.compile(model, dynamic=False)

    train_loader = packed_loader(train_stream, train_starts, B, T, bos, device, resume_state=loader_state)
    loader_pos = loader_state
    x, y, after = next(train_loader)

    loss_file = open(args.loss_file, "a") if master and args.loss_file else None
    ema_beta = 0.9
    step = start_step
    run_time, timed_steps, tok_per_sec = 0.0, 0, 0.0
    while True:
        last_step = step == num_iterations
        resumed_here = args.resume and step == start_step

        if (last_step or (args.eval_every > 0 and step % args.eval_every == 0)) and not (resumed_here and not last_step):
            model.eval()
            val_loader = packed_loader(val_stream, val_starts, B, T, bos, device)
            with autocast_ctx:
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            model.train()
            loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/bpb": val_bpb})

        stop_here = step == args.stop_after
        periodic = args.save_every > 0 and step % args.save_every == 0 and step > 0
        if last_step or stop_here or (periodic and not resumed_here):
            meta = {
                "step": step,
                "model_config": dataclasses.asdict(config),
                "user_config": user_config,
                "val_bpb": loop["val_bpb"],
                "world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                "total_batch_size": args.total_batch_size, "num_iterations": num_iterations,
                "mixture": spec, "num_train_conversations": len(train_set),
                "loader_states": gather_objects(loader_pos, world_size),
                "loop_state": loop,
            }
            save_training_checkpoint(checkpoint_dir, step, orig_model, optimizers, meta, rank, args.keep_last)
        if last_step or stop_here:
            break

        t0 = time.time()
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss += loss.detach()
            (loss / grad_accum_steps).backward()
            loader_pos = after
            x, y, after = next(train_loader)
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizers, step, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss /= grad_accum_steps
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            train_loss /= world_size
        loss_value = train_loss.item()
        dt = time.time() - t0

        loop["smooth_train_loss"] = ema_beta * loop["smooth_train_loss"] + (1 - ema_beta) * loss_value
        smooth = loop["smooth_train_loss"] / (1 - ema_beta ** (step + 1))
        if step - start_step >= 3:
            loop["total_training_time"] += dt
            run_time += dt
            timed_steps += 1
        tok_per_sec = args.total_batch_size / dt
        mfu = f" | mfu {100 * flops_per_token * tok_per_sec / (GPU_PEAK_FLOPS * world_size):.2f}%" if device_type == "cuda" else ""
        eta = format_eta((run_time / timed_steps if timed_steps else dt) * (num_iterations - step - 1))
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {smooth:.6f} "
               f"| lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f}{mfu} | eta {eta}")
        if loss_file:
            loss_file.write(json.dumps({"step": step, "loss": loss_value, "lrm": lrm}) + "\n")
            loss_file.flush()
        if wandb_run:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec})
        step += 1

    if loss_file:
        loss_file.close()
    finished = step == num_iterations
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val bpb: {loop['min_val_bpb']:.4f}")
    if master and finished:
        from nanochat.report import get_report
        # no summary metric: val bpb on chat data is not comparable with the base row; chat_eval fills MID
        get_report().log(section="Midtraining", stage="MID", data=[
            user_config,
            {
                "Mixture": spec,
                "Tasks": ", ".join(f"{k}: {v}" for k, v in describe_tasks(tasks).items()),
                "Training conversations": len(train_set),
                "Validation conversations": len(val_set),
                "Number of parameters": num_params,
                "Number of training steps": num_iterations,
                "Number of training tokens": args.total_batch_size * num_iterations,
                "Minimum validation bpb": loop["min_val_bpb"],
                "Final validation bpb": loop["val_bpb"],
                "Last step tok/s": tok_per_sec,
                "Total training time (min)": loop["total_training_time"] / 60,
            },
        ])
    if wandb_run:
        wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
