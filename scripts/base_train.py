"""Pretrain the base model.

    python -m scripts.base_train --depth 20
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --run myrun

One dial, --depth: width 64*depth, heads of dim 128, and (unless --num-iterations or --target-flops
say otherwise) 20 training tokens per parameter. Distributed runs need no DDP wrapper: the
optimizers from model.setup_optimizers average gradients across ranks themselves.

--resume continues from the latest checkpoint of --model-tag (model, optimizers, data position,
step, RNG) and gives the same losses as a run that was never interrupted.
"""
import argparse
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_last_step, load_checkpoint, remove_stale_temp, start_fresh
from nanochat.common import autocast, resolve_dtype, script_argv, compute_cleanup, compute_init, format_eta, get_base_dir, print0
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.training import (check_resume, gather_objects, lr_multiplier, restore_training_state,
                               save_training_checkpoint, set_lrs)
from nanochat.tokenizer import get_token_bytes, get_tokenizer

GPU_PEAK_FLOPS = 989e12  # bf16 dense, per H100-class GPU: the reference for MFU on CUDA
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name; wandb is used only when set and not 'dummy'")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers; width = 64 * depth")
    p.add_argument("--max-seq-len", type=int, default=2048)
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward/backward per rank")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all ranks)")
    # horizon: the first of these that is > 0 decides the number of steps
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--target-flops", type=float, default=-1)
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens per parameter")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    # evaluation, sampling, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation (all ranks)")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (and at the end); <=0: never")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps; -1: only at the end")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --model-tag")
    p.add_argument("--model-tag", default="", help="checkpoint directory name (default d<depth>)")
    # numerics and speed
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on CUDA with bf16 support, else float32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on for CUDA)")
    p.add_argument("--peak-flops", type=float, default=-1, help="per-device peak FLOP/s for MFU (default: "
                   "989e12 on CUDA, measured with a matmul on CPU)")
    # testing aids
    p.add_argument("--loss-file", default="", help="rank 0 appends {step, loss, lrm} JSON lines here (full precision)")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save a checkpoint after this many steps and "
                   "exit as if killed (continue with --resume)")
    return p.parse_args(script_argv(argv))


def model_config(depth, seq_len, vocab_size):
    """The --depth dial: width 64*depth; about n_embd/128 heads (head dim ~128; one head below 128 wide),
    reduced until it divides the width into an even head dim (odd depths)."""
    n_embd = 64 * depth
    n_head = max(1, n_embd // 128)
    while n_head > 1 and (n_embd % n_head or (n_embd // n_head) % 2):
        n_head -= 1
    return GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd)


def measure_peak_flops(device, dtype, sizes=(1024, 2048), seconds=0.5):
    """A per-device peak for MFU on CPU: the fastest single square matmul seen in ~`seconds` of trials
    at each size. Taking the best of many trials keeps a moment of contention from lowering the peak
    (which would inflate MFU)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def sample_greedy(model, tokenizer, prompts, max_tokens, autocast_ctx):
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        with autocast_ctx:
            new = list(model.generate(ids, max_tokens, temperature=0))
        out.append(prompt + tokenizer.decode(new))
    return out


def save_loss_plot(history, val_history, path_fn):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, label="train loss (nats, smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = ax.get_lines()
    if val_history:
        ax2 = ax.twinx()
        steps, bpbs = zip(*val_history)
        handles += ax2.plot(steps, bpbs, "o-", color="tab:orange", label="val bpb")
        ax2.set_ylabel("val bits per byte")
    ax.legend(handles=handles, loc="upper right")
    ax.set_title("Base model training")
    path = path_fn(fig, "base_loss_curve.png")
    plt.close(fig)
    return path


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
        wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()

    # --- model ---------------------------------------------------------------------------
    B, T = args.device_batch_size, args.max_seq_len
    config = model_config(args.depth, T, vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    orig_model = model  # uncompiled: for checkpoints, sampling and counting
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"model: {dataclasses.asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e} | dtype: {dtype} | compile: {use_compile}")

    # --- batch and horizon -----------------------------------------------------------------
    tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size x "
                         f"max_seq_len x world_size = {B} x {T} x {world_size} = {tokens_per_fwdbwd}")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
    elif args.target_param_data_ratio > 0:
        num_iterations = int(args.target_param_data_ratio * num_params) // args.total_batch_size
    else:
        raise SystemExit("set one of --num-iterations, --target-flops, --target-param-data-ratio")
    num_iterations = max(1, num_iterations)
    total_tokens = args.total_batch_size * num_iterations
    print0(f"batch: {B} x {T} x {world_size} ranks x {grad_accum_steps} accumulation = {args.total_batch_size:,} tokens/step")
    print0(f"steps: {num_iterations:,} | training tokens: {total_tokens:,} | tokens:params = {total_tokens / num_params:.2f} "
           f"| total FLOPs: {flops_per_token * total_tokens:e}")

    optimizers = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)

    # --- resume ------------------------------------------------------------------------------
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    start_step, loader_state = 0, None
    loop = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "min_val_bpb": float("inf"), "val_bpb": None,
            "history": [], "val_history": []}
    if args.resume:
        start_step = find_last_step(checkpoint_dir)
        model_state, rank_state, meta = load_checkpoint(checkpoint_dir, start_step, device, load_optimizer=True, rank=rank)
        check_resume(meta, {"world_size": world_size, "device_batch_size": B, "max_seq_len": T,
                            "total_batch_size": args.total_batch_size}, num_iterations)
        orig_model.load_state_dict(model_state)
        restore_training_state(optimizers, rank_state)
        loader_state = meta["loader_states"][rank]
        loop.update(meta["loop_state"])
        del model_state, rank_state
        print0(f"resumed from {checkpoint_dir} at step {start_step}")
        if rank == 0 and remove_stale_temp(checkpoint_dir):  # before this run's first save
            print0("removed temp files a killed save had left in the checkpoint directory")
    elif rank == 0:
        prev = start_fresh(checkpoint_dir)
        if prev:
            print0(f"new run of tag {model_tag}: earlier checkpoints moved to {prev} (use --resume to continue them)")

    if use_compile:
        model = torch.compile(model, dynamic=False)

    # --- data ----------------------------------------------------------------------------------
    train_loader = tokenizing_distributed_data_loader(B, T, "train", tokenizer, device, resume_state=loader_state)
    loader_pos = loader_state  # where the batch in hand starts: what a checkpoint must resume from
    x, y, after = next(train_loader)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)

    if args.peak_flops > 0:
        peak_flops = args.peak_flops
    elif device_type == "cuda":
        peak_flops = GPU_PEAK_FLOPS
    else:
        peak_flops = measure_peak_flops(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    print0(f"peak FLOP/s per device for MFU: {peak_flops:.3e}")

    loss_file = open(args.loss_file, "a") if master and args.loss_file else None
    ema_beta = 0.9
    step = start_step
    mfu = tok_per_sec = 0.0
    run_time, timed_steps = 0.0, 0  # this process only, for the ETA
    while True:
        last_step = step == num_iterations
        resumed_here = args.resume and step == start_step  # already evaluated/saved before the interruption

        if (last_step or (args.eval_every > 0 and step % args.eval_every == 0)) and not (resumed_here and not last_step):
            model.eval()
            val_loader = tokenizing_distributed_data_loader(B, T, "val", tokenizer, device)
            with autocast_ctx:
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            model.train()
            loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
            loop["val_history"].append([step, val_bpb])
            print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
            if wandb_run:
                wandb_run.log({"step": step, "val/bpb": val_bpb})

        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()
            for text in sample_greedy(orig_model, tokenizer, SAMPLE_PROMPTS, 16, autocast_ctx):
                print0(f"  sample: {text!r}")
            orig_model.train()

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
                "loader_states": gather_objects(loader_pos, world_size),  # one per rank
                "loop_state": loop,
            }
            save_training_checkpoint(checkpoint_dir, step, orig_model, optimizers, meta, rank, args.keep_last)
        if last_step or stop_here:
            break

        # --- one optimizer step ---------------------------------------------------------------
        t0 = time.time()
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss += loss.detach()
            # each rank averages over its micro-batches; the optimizers average over ranks
            (loss / grad_accum_steps).backward()
            loader_pos = after
            x, y, after = next(train_loader)  # prefetch while the device works
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizers, step, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss /= grad_accum_steps
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)  # gloo has no AVG
            train_loss /= world_size
        loss_value = train_loss.item()  # also waits for the device
        dt = time.time() - t0

        # --- logging ------------------------------------------------------------------------
        loop["smooth_train_loss"] = ema_beta * loop["smooth_train_loss"] + (1 - ema_beta) * loss_value
        smooth = loop["smooth_train_loss"] / (1 - ema_beta ** (step + 1))
        loop["history"].append([step, round(smooth, 5)])
        if step - start_step >= 3:  # the first steps include warm-up/compilation: keep them out of timing
            loop["total_training_time"] += dt
            run_time += dt
            timed_steps += 1
        tok_per_sec = args.total_batch_size / dt
        mfu = 100 * flops_per_token * args.total_batch_size / dt / (peak_flops * world_size)
        avg_dt = run_time / timed_steps if timed_steps else dt
        eta = format_eta(avg_dt * (num_iterations - step - 1))
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {smooth:.6f} "
               f"| lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu:.2f}% | eta {eta}")
        if loss_file:
            loss_file.write(json.dumps({"step": step, "loss": loss_value, "lrm": lrm}) + "\n")
            loss_file.flush()
        if wandb_run:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt,
                           "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        step += 1

    # --- wrap up ----------------------------------------------------------------------------------
    if loss_file:
        loss_file.close()
    finished = step == num_iterations
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val bpb: {loop['min_val_bpb']:.4f}")
    if master and finished:
        from nanochat.report import get_report
        report = get_report()
        plot = save_loss_plot(loop["history"], loop["val_history"], report.save_plot)
        peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None
        report.log(section="Base model training", stage="BASE", summary={"val bpb": loop["val_bpb"]}, data=[
            user_config,
            {
                "Number of parameters": num_params,
                "Number of FLOPs per token": f"{flops_per_token:e}",
                "Number of training steps": num_iterations,
                "Number of training tokens": total_tokens,
                "Tokens : Params ratio": total_tokens / num_params,
                "World size": world_size,
                "Gradient accumulation steps": grad_accum_steps,
                "Minimum validation bpb": loop["min_val_bpb"],
                "Final validation bpb": loop["val_bpb"],
                "Last step MFU %": mfu,
                "Last step tok/s": tok_per_sec,
                "Total training FLOPs": f"{flops_per_token * total_tokens:e}",
                "Total training time (min)": loop["total_training_time"] / 60,
                "Peak memory (MiB)": peak_mem if peak_mem is not None else "n/a",
            },
        ], images=[("Training loss and validation bpb", plot)])
    if wandb_run:
        wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
