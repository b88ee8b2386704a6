"""Evaluate the base model: train and val bits per byte, plus a few greedy completions.

    python -m scripts.base_loss
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --split-tokens 10485760
"""
import argparse

from nanochat.checkpoint_manager import add_model_args, load_model
from nanochat.common import compute_cleanup, compute_init, print0, script_argv
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from scripts.base_train import SAMPLE_PROMPTS, sample_greedy

PROMPTS = SAMPLE_PROMPTS + ["My favorite color is", "If 5*x + 3 = 13, then x is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split (all ranks)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per greedy sample")
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or None)
    model, tokenizer, meta = load_model("base", device, "eval", model_tag=args.model_tag, step=args.step,
                                        dtype=args.dtype)
    B, T = args.device_batch_size, model.config.sequence_len
    tokens_per_step = B * T * world_size
    steps = max(1, args.split_tokens // tokens_per_step)
    print0(f"base model step {meta['step']} | {steps} steps x {tokens_per_step:,} tokens per split")
    token_bytes = get_token_bytes(device)

    bpb = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader(B, T, split, tokenizer, device)
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.4f}")

    if rank == 0:
        samples = sample_greedy(model, tokenizer, PROMPTS, args.max_new_tokens)
        for text in samples:
            print0(f"  sample: {text!r}")
        get_report().log(section="Base model loss", stage="BASE",
                         summary={"train bpb": bpb["train"], "val bpb": bpb["val"]}, data=[
                             {"model step": meta["step"], "tokens per split": steps * tokens_per_step,
                              "train bpb": bpb["train"], "val bpb": bpb["val"]},
                             "Samples (greedy):\n\n" + "\n".join(f"- `{s!r}`" for s in samples),
                         ])
    compute_cleanup()


if __name__ == "__main__":
    main()
