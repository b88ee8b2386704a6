"""Pretrain the base model.

    python -m scripts.base_train --depth 20
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --run myrun

One dial, --depth: width 64*depth, heads of dim 128, and (unless --num-iterations or --target-flops
say otherwise) 20 training tokens per parameter; without --total-batch-size the batch, learning rates and
weight decay follow from the depth too (nanochat/dial.py has each rule and its source; the run prints them and
records them in the checkpoint meta and the report). A flag given explicitly is kept as given. Distributed runs
need no DDP wrapper: the optimizers from model.setup_optimizers average gradients across ranks themselves.

--resume continues from the latest checkpoint of --model-tag (model, optimizers, data position,
step, RNG) and gives the same losses as a run that was never interrupted.
"""
import argparse
import dataclasses
import os

import torch

from nanochat.accel import enable_fp8, load_fa3, use_fa3
from nanochat.common import all_reduce, compute_cleanup, dtype_name, get_base_dir, print0, script_argv
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dial import LR_FLAGS, apply_dial, derive
from nanochat.gpt import GPT, GPTConfig, config_overrides
from nanochat.hardware import resolve_device_batch
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report, subplots
from nanochat.reshard import reshard_row_group_positions
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (
    Prefetch,
    StepLog,
    Training,
    accumulation_steps,
    add_training_args,
    eval_due,
    init_wandb,
    make_optimizers,
    resume_training,
    start_run,
    train_loop,
)

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p)
    p.add_argument("--depth", type=int, default=20, help="number of layers; width = 64 * depth")
    p.add_argument("--model-options", default="", help="GPTConfig fields to change, name=value,... (e.g. "
                   "value_embeds=1,window_pattern=SSSL; nanochat/gpt.py lists them)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (all ranks); "
                   "-1: from the depth (nanochat/dial.py), which then also scales the default LRs and weight decay")
    # horizon: the first of these that is > 0 decides the number of steps
    p.add_argument("--target-flops", type=float, default=-1, help="training FLOPs to spend (sets the steps)")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens per parameter")
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end); <=0: end only")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation (all ranks)")
    p.add_argument("--sample-every", type=int, default=2000,
                   help="greedy samples every N steps (and at the end); <=0: never")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls through torchao (sm89+ GPUs; elsewhere it says why "
                   "and trains in the compute dtype). Not yet verified on a GPU of ours: dev/gpu_check.sh")
    p.add_argument("--fa3", action="store_true", help="Flash Attention 3 through the `kernels` package (CUDA, bf16; "
                   "elsewhere it says why and uses SDPA). Not yet verified on a GPU of ours: dev/gpu_check.sh")
    # the LR flags' defaults are their values at the dial's reference batch; None = not given, the dial sets it
    lr_defaults = {name: p.get_default(name) for name in LR_FLAGS}
    p.set_defaults(**dict.fromkeys(LR_FLAGS))
    args = p.parse_args(script_argv(argv))
    args.lr_defaults = lr_defaults
    return args


# Upstream's attention and init settings (karpathy/nanochat, 2026): they cost nothing per step, so equal steps
# are equal time, and they lowered val bpb here at d4 (200 steps) and d8 (50 steps): dev/notes_recipe.md.
# GPTConfig's own defaults stay the plain model, so checkpoints saved before these fields existed load as
# they were trained.
RECIPE = {"qk_gain": 1.44, "rope_base": 100000.0, "embed_init_std": 0.8, "fc_init_scale": 0.4}


def model_config(depth, seq_len, vocab_size):
    """The --depth dial: width 64*depth; about n_embd/128 heads (head dim ~128; one head below 128 wide),
    reduced until it divides the width into an even head dim (odd depths); RECIPE's settings."""
    n_embd = 64 * depth
    n_head = max(1, n_embd // 128)
    while n_head > 1 and (n_embd % n_head or (n_embd // n_head) % 2):
        n_head -= 1
    return GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, **RECIPE)


def depth_config(args, vocab_size, depth=None):
    """The GPTConfig of --depth (or `depth`) with --model-options applied."""
    config = model_config(depth or args.depth, args.max_seq_len, vocab_size)
    try:
        return dataclasses.replace(config, **config_overrides(args.model_options))
    except ValueError as e:
        raise SystemExit(f"--model-options: {e}")


def start_dial(args, vocab_size):
    """The --depth dial for these flags (nanochat/dial.py): sets the batch, the unset LRs and the weight decay."""
    dial = derive(args.depth, lambda d: depth_config(args, vocab_size, d), args.target_param_data_ratio,
                  args.total_batch_size)
    apply_dial(dial, args, args.lr_defaults)
    for line in dial.lines():
        print0(line)
    return dial


def start_training(args, run, dial):
    """A fresh model from the --depth dial, or with --resume the latest checkpoint of base_checkpoints/<tag>."""
    tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", tag)
    if args.resume:
        return resume_training(run, args, checkpoint_dir, tag)
    tokenizer = get_tokenizer()
    config = depth_config(args, tokenizer.get_vocab_size())
    config.muon_weight_decay *= dial.weight_decay_scale
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=run.device)
    model.init_weights()
    return Training(run, args, model, tokenizer, tag, checkpoint_dir)


def horizon(args, num_params, flops_per_token):
    """The number of optimizer steps: --num-iterations, else --target-flops, else --target-param-data-ratio
    (tokens per parameter of the dial's N, which leaves value-embedding tables out)."""
    if args.num_iterations > 0:
        steps = args.num_iterations
    elif args.target_flops > 0:
        steps = round(args.target_flops / (flops_per_token * args.total_batch_size))
    elif args.target_param_data_ratio > 0:
        steps = int(args.target_param_data_ratio * num_params) // args.total_batch_size
    else:
        raise SystemExit("set one of --num-iterations, --target-flops, --target-param-data-ratio")
    return max(1, steps)


@torch.no_grad()
def sample_greedy(model, tokenizer, prompts, max_tokens):
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        out.append(prompt + tokenizer.decode(list(model.generate(ids, max_tokens, temperature=0))))
    return out


def save_loss_plot(history, val_history, path_fn):
    fig, ax = subplots(figsize=(7, 4))
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
    return path_fn(fig, "base_loss_curve.png")


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args)
    dial = start_dial(args, get_tokenizer().get_vocab_size())
    wandb_run = init_wandb(run, args.run, "nanochat", vars(args).copy())
    training = start_training(args, run, dial)
    model, tokenizer, T = training.model, training.tokenizer, args.max_seq_len  # model: uncompiled
    if args.fp8:  # before the optimizers are built (the swap keeps the Parameters, but not the modules)
        print0(enable_fp8(model, run.device))
    if args.fa3:
        fa3, message = load_fa3(run.device, run.dtype)
        print0(message)
        use_fa3(model, fa3)
    B = resolve_device_batch(args, model, T, run)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    print0(f"model: {dataclasses.asdict(model.config)}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e} | dtype: {dtype_name(run.dtype)} "
           f"| compile: {run.compile}")
    grad_accum_steps = accumulation_steps(args.total_batch_size, B, T, run.world_size)
    num_iterations = horizon(args, dial.params, flops_per_token)
    total_tokens = args.total_batch_size * num_iterations
    print0(f"batch: {B} x {T} x {run.world_size} ranks x {grad_accum_steps} accumulation "
           f"= {args.total_batch_size:,} tokens/step")
    print0(f"steps: {num_iterations:,} | training tokens: {total_tokens:,} "
           f"| tokens:params = {total_tokens / dial.params:.2f} (the dial's N) "
           f"| total FLOPs: {flops_per_token * total_tokens:e}")

    loop = {"min_val_bpb": float("inf"), "val_bpb": None, "val_history": []}
    same = {"world_size": run.world_size, "device_batch_size": B, "max_seq_len": T,
            "total_batch_size": args.total_batch_size}
    position = training.begin(make_optimizers(model, args), loop, num_iterations, same, reshard_row_group_positions)
    train_model = run.compiled(model)
    data = Prefetch(tokenizing_distributed_data_loader(B, T, "train", tokenizer, run.device, resume_state=position),
                    position)
    token_bytes = get_token_bytes(run.device)
    eval_steps = max(1, args.eval_tokens // (B * T * run.world_size))
    log = StepLog(run, num_iterations, training.step, loop, args.loss_file, wandb_run, flops_per_token,
                  args.peak_flops, curve=True)

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
            val_loader = tokenizing_distributed_data_loader(B, T, "val", tokenizer, run.device)
            val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            train_model.train()
            loop["val_bpb"], loop["min_val_bpb"] = val_bpb, min(loop["min_val_bpb"], val_bpb)
            loop["val_history"].append([step, val_bpb])
            log.eval(step, {"val bpb": val_bpb})
        if run.master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            model.eval()
            for text in sample_greedy(model, tokenizer, SAMPLE_PROMPTS, 16):
                print0(f"  sample: {text!r}")
            model.train()

    step = train_loop(training, log, train_step, evaluate, lambda step: training.checkpoint_meta(
        step, data.position, val_bpb=loop["val_bpb"], device_batch_size=B, max_seq_len=T,
        total_batch_size=args.total_batch_size, dial=dial.as_dict()))
    log.close()
    print0(f"training time: {loop['total_training_time'] / 60:.2f} min | min val bpb: {loop['min_val_bpb']:.4f}")
    if run.device.type == "cuda":  # (dev/gpu_check.sh compares runs by it)
        print0(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if run.master and step == num_iterations:
        write_report(args, run, model, loop, log, grad_accum_steps, dial)
    compute_cleanup()


def write_report(args, run, model, loop, log, grad_accum_steps, dial):
    report = get_report()
    plot = save_loss_plot(loop["history"], loop["val_history"], report.save_plot)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    total_tokens = args.total_batch_size * log.num_iterations
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if run.device.type == "cuda" else None
    report.log(section="Base model training", stage="BASE", summary={"val bpb": loop["val_bpb"]},
               facts={"training_minutes": loop["total_training_time"] / 60}, data=[
        vars(args),
        {f"dial: {k}": v for k, v in dial.as_dict().items()},
        {
            "Number of parameters": num_params,
            "Number of FLOPs per token": f"{flops_per_token:e}",
            "Number of training steps": log.num_iterations,
            "Number of training tokens": total_tokens,
            "Tokens : Params ratio": total_tokens / dial.params,
            "World size": run.world_size,
            "Gradient accumulation steps": grad_accum_steps,
            "Minimum validation bpb": loop["min_val_bpb"],
            "Final validation bpb": loop["val_bpb"],
            "Last step MFU %": log.mfu,
            "Last step tok/s": log.tok_per_sec,
            "Total training FLOPs": f"{flops_per_token * total_tokens:e}",
            "Total training time (min)": loop["total_training_time"] / 60,
            "Peak memory (MiB)": peak_mem if peak_mem is not None else "n/a",
        },
    ], images=[("Training loss and validation bpb", plot)])


if __name__ == "__main__":
    main()
