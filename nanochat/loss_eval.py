"""Bits per byte: a loss that does not depend on the tokenizer.

Mean loss per token rewards tokenizers with small vocabularies; dividing the summed loss by the number
of UTF-8 bytes the target tokens stand for makes models with different tokenizers comparable.
"""
import math

import torch
import torch.distributed as dist

from nanochat.common import sum_dtype


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of per-token losses (nats) over targets that stand for text (token_bytes > 0: special tokens
    and ignore_index=-1 targets are skipped) divided by ln(2) * their total bytes. `batches` yields
    (inputs, targets) or (inputs, targets, state). Summed across ranks when distributed."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=sum_dtype(device), device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        losses = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0)
        total_nats += (losses.to(total_nats.dtype) * (nbytes > 0)).sum()
        total_bytes += nbytes.sum().to(torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nbytes = total_bytes.item()
    if nbytes == 0:
        return float("inf")  # nothing to score (e.g. steps=0)
    return total_nats.item() / (math.log(2) * nbytes)


@torch.no_grad()
def rag_bpb(model, tokenizer, docs, retrieve, token_bytes, prefix_tokens=64, target_tokens=128):
    """Bits per byte of held-out documents with and without retrieved passages in the context.

    Each document is cut into a prefix (the first prefix_tokens tokens) and a target (the next
    target_tokens). The prefix's text is the query: `retrieve(query)` -> a string of passages (or "").
    The target is scored twice, after <|bos|> + prefix and after <|bos|> + passages + "\\n\\n" + prefix
    (passages cut from their end to fit the model's context). Documents shorter than prefix + 16
    tokens are skipped. -> {"bpb_without", "bpb_with", "documents"}."""
    device = token_bytes.device
    bos, ctx = tokenizer.get_bos_token_id(), model.config.sequence_len
    target_tokens = min(target_tokens, ctx - prefix_tokens - 2)
    nats = {"with": 0.0, "without": 0.0}
    nbytes, n = 0, 0
    for text in docs:
        ids = tokenizer.encode(text)
        if len(ids) < prefix_tokens + 16:
            continue
        prefix, target = ids[:prefix_tokens], ids[prefix_tokens:prefix_tokens + target_tokens]
        passages = tokenizer.encode(retrieve(tokenizer.decode(prefix)) + "\n\n")
        room = ctx - 1 - len(prefix) - len(target)
        for name, context in (("without", [bos] + prefix), ("with", [bos] + passages[:max(0, room)] + prefix)):
            seq = context + target
            x = torch.tensor([seq[:-1]], dtype=torch.long, device=device)
            y = torch.tensor([[-1] * (len(context) - 1) + target], dtype=torch.long, device=device)
            nats[name] += model(x, y, loss_reduction="none").sum(dtype=sum_dtype(device)).item()
        nbytes += int(token_bytes[torch.tensor(target, device=device)].sum().item())
        n += 1
    if n == 0:
        raise ValueError(f"no document has the {prefix_tokens + 16} tokens rag_bpb needs")
    return {"bpb_without": nats["without"] / (math.log(2) * nbytes), "bpb_with": nats["with"] / (math.log(2) * nbytes),
            "documents": n}
