"""Plumbing shared by the training stages (base_train, mid_train, chat_sft): LR/momentum schedules,
resume checks, and checkpoints that carry optimizer and RNG state so a resumed run is exact."""
import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import print0


def collate(rows, pad_id, device="cpu", T=None, pad_to=None):
    """rows: (ids, mask) pairs from render_conversation, cut to T+1 tokens when T is given. Inputs are
    ids[:-1], targets ids[1:] where mask[1:] is 1 and -1 elsewhere; rows are right-padded (inputs with
    pad_id, targets with -1) to the longest row, or to pad_to. -> (inputs, targets) (n, L) int64 on device."""
    if T is not None:
        rows = [(ids[:T + 1], mask[:T + 1]) for ids, mask in rows]
    L = pad_to or max(1, max(len(ids) - 1 for ids, _ in rows))
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n <= 0:
            continue
        x[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[i, :n] = torch.where(torch.tensor(mask[1:]) == 1, torch.tensor(ids[1:], dtype=torch.long), -1)
    return x.to(device), y.to(device)


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_lrs(optimizers, step, lrm):
    """Scale every group's initial_lr by lrm; optimizers = [adamw, muon] from setup_optimizers."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in optimizers[1].param_groups:
        group["momentum"] = muon_momentum(step)


def gather_objects(obj, world_size):
    """One picklable object per rank, on every rank (e.g. each rank's data loader position)."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def check_resume(meta, same, num_iterations):
    """Resuming exactly needs the same batch layout as the run that saved the checkpoint; a different
    number of steps is allowed (the LR schedule then changes from here on) but said."""
    diff = {k: (meta.get(k), v) for k, v in same.items() if meta.get(k) != v}
    if diff:
        raise SystemExit(f"cannot resume exactly: the checkpoint was made with different settings {diff} (saved, now)")
    if meta["num_iterations"] != num_iterations:
        print0(f"warning: the checkpoint planned {meta['num_iterations']} steps, this run {num_iterations}: "
               "the LR schedule changes from here on")


def save_training_checkpoint(checkpoint_dir, step, model, optimizers, meta, rank, keep_last=-1):
    """Model + this rank's optimizer states and RNG state + meta. Every rank must call it."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(checkpoint_dir, step, model.state_dict(),
                    {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng}, meta,
                    rank=rank, keep_last=keep_last if keep_last > 0 else None)
    print0(f"saved checkpoint {checkpoint_dir} step {step}")


def restore_training_state(optimizers, rank_state):
    """Undo save_training_checkpoint's per-rank part: optimizer states and RNG."""
    for opt, state in zip(optimizers, rank_state["optimizers"]):
        opt.load_state_dict(state)
    torch.set_rng_state(rank_state["rng"]["cpu"].cpu())
    if "cuda" in rank_state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["rng"]["cuda"].cpu())
