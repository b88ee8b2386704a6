"""DistAdamW: AdamW with ZeRO-2 style sharding of gradients and optimizer state.

Single-process training uses torch.optim.AdamW; this class gives the same update on the
rank-averaged gradient while each rank stores the moments of only 1/world_size of each parameter.
"""
import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

# the single-tensor collectives: torch 2.13 names them *_single; our floor (2.4) has the older names
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def adamw_update(p, grad, state, lr, beta1, beta2, eps, weight_decay):
    """The torch.optim.AdamW update (decoupled weight decay, bias-corrected moments), in place."""
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


class DistAdamW(Optimizer):
    """Per parameter: if dim 0 divides by world_size, the gradient is reduce-scattered (averaged)
    along dim 0, each rank updates its slice with its own optimizer state, and the slices are
    all-gathered back. Otherwise (small or oddly shaped tensors) the gradient is all-reduced and every
    rank does the full, identical update: simpler, and those tensors are too small to matter.
    Every rank must pass the same parameters in the same order."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        # 1) launch all gradient reductions
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if p.ndim > 0 and p.size(0) % world == 0:
                    # the tensor forms: dim-0 chunks of a contiguous tensor are exactly the flat layout they
                    # expect, so no per-chunk copies of the big embedding and head each step (the list forms do)
                    g = torch.empty_like(grad.chunk(world)[rank])
                    work = reduce_scatter_single(g, grad.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
                    pending.append((group, p, g, True, work))
                else:
                    g = grad.clone()
                    work = dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True)
                    pending.append((group, p, g, False, work))
        # 2) update (a slice of) each parameter, then gather the slices
        gathers = []
        for group, p, g, sharded, work in pending:
            work.wait()
            g.div_(world)
            beta1, beta2 = group["betas"]
            target = p.chunk(world)[rank] if sharded else p  # a view: updates land in p
            adamw_update(target, g, self.state[p], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if sharded:
                gathers.append(all_gather_single(p, target, async_op=True))  # in place: target is p's slice
        for work in gathers:
            work.wait()
