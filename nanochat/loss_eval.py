"""Bits per byte: a loss that does not depend on the tokenizer.

Mean loss per token rewards tokenizers with small vocabularies; dividing the summed loss by the number
of UTF-8 bytes the target tokens stand for makes models with different tokenizers comparable.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of per-token losses (nats) over targets that stand for text (token_bytes > 0: special tokens
    and ignore_index=-1 targets are skipped) divided by ln(2) * their total bytes. `batches` yields
    (inputs, targets) or (inputs, targets, state). Summed across ranks when distributed."""
    device = token_bytes.device
    acc = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    total_nats = torch.zeros((), dtype=acc, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        losses = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0)
        total_nats += (losses.to(acc) * (nbytes > 0)).sum()
        total_bytes += nbytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nbytes = total_bytes.item()
    if nbytes == 0:
        return float("inf")  # nothing to score (e.g. steps=0)
    return total_nats.item() / (math.log(2) * nbytes)
