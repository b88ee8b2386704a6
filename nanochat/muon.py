"""Muon: SGD-momentum whose update is orthogonalised by a Newton-Schulz iteration, for 2-D weights.

Muon is the single-process optimizer; DistMuon splits the Newton-Schulz work across ranks and also
averages the gradients (so the training loop needs no DDP wrapper). The optimizers know nothing of the model.

Three variants from nanochat's 2026 Muon, each an option (off by default; the model's config picks them):
- polar_express: per-iteration coefficients (POLAR_EXPRESS_COEFFS) instead of one triple for every iteration
- normuon_beta2 > 0: NorMuon's per-neuron normalisation of the orthogonalised update (normalize_neurons)
- weight_decay > 0: cautious decoupled weight decay, p -= lr * wd * p only where the update also pulls p to 0
"""
import torch
import torch.distributed as dist
from torch.optim import Optimizer

from nanochat.common import native_bf16_cpu

# Quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X. These widely used coefficients make the
# small singular values grow as fast as possible; the price is that the iteration does not converge to
# exactly 1 but oscillates in roughly [0.7, 1.2], which Muon does not mind.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): a triple per iteration, each the best
# odd quintic for where the singular values are by then, so 5 iterations land closer to 1 than the fixed
# triple does. These are the paper's for 5 iterations (safety factor 2e-2, cushion 2), as nanochat uses them.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def default_ns_dtype(device):
    """The dtype Newton-Schulz runs in: bf16 where matmuls have native bf16 (CUDA; CPUs with AVX512-BF16/AMX,
    where it runs ~2x faster than fp32), fp32 elsewhere. The iteration is robust to bf16: its output moves
    ~2% (relative) from the fp32 one, well inside the [0.7, 1.2] singular-value band it lands in anyway."""
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()):
        return torch.bfloat16
    return torch.float32


@torch.no_grad()
def zeropower_via_newtonschulz5(G, steps=5, dtype=None, polar_express=False):
    """Approximate U V^T for G = U S V^T (the nearest semi-orthogonal matrix), G of shape (..., m, n): a
    leading batch dimension runs every matrix of a stack in one batched matmul per iteration.
    dtype: the iteration's dtype (default: default_ns_dtype(G.device)). polar_express: the per-iteration
    coefficients (past the fifth iteration the last triple repeats). Returns G's dtype."""
    assert G.ndim >= 2
    coeffs = POLAR_EXPRESS_COEFFS if polar_express else (NS_COEFFS,)
    X = G.to(dtype or default_ns_dtype(G.device))
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
        X = X.mT
    # Scale so the spectral norm is <= 1 (the Frobenius norm bounds it), inside the iteration's basin; Polar
    # Express's first triple is steep, so it keeps 1% more room for bf16 rounding of the norm, as upstream does.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1.01 if polar_express else 1.0) + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # one batch dimension, for baddbmm
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.mT
        # b A + c A A, then a X + B X, each one baddbmm: the scaling and the sum happen inside the matmul
        # (fp32 accumulation, one rounding), not as three bf16 elementwise passes — 1.2-2.2x faster on CPU and
        # half the error against fp64 in bf16 (2.4% -> 1.1% after 5 steps)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.view(shape)
    if tall:
        X = X.mT
    return X.to(G.dtype)


def normalize_neurons(update, states, beta2):
    """NorMuon (Li et al. 2025, arXiv:2510.05491): the orthogonalised update's rows (its columns, for a wide
    matrix) do not come out with equal scales; divide each by the root of an EMA of its mean square, then
    rescale the whole to the Frobenius norm it had. update: (k, m, n), one matrix per parameter; the EMA is
    kept per parameter in states[i]["neuron_sq"]."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    sq = update.float().square().mean(dim=dim, keepdim=True)
    for state, s in zip(states, sq):
        if "neuron_sq" not in state:
            state["neuron_sq"] = torch.zeros_like(s)
    ema = [state["neuron_sq"] for state in states]
    torch._foreach_lerp_(ema, list(sq.unbind(0)), 1 - beta2)
    scaled = update.float() * torch.stack(ema).clamp_min(1e-10).rsqrt()
    norm = update.float().norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (scaled * norm).to(update.dtype)


def muon_update(params, grads, states, lr, momentum, nesterov, ns_steps, ns_dtype=None, polar_express=False,
                normuon_beta2=0.0, weight_decay=0.0):
    """One Muon step (in place) for parameters of one shape: their Newton-Schulz runs as one batched call.
    Momentum is an EMA of the gradients, kept per parameter in states[i]["momentum_buffer"]. The variants'
    options: the module docstring."""
    for state, grad in zip(states, grads):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
    bufs = [state["momentum_buffer"] for state in states]
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    g = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    update = zeropower_via_newtonschulz5(torch.stack(g), steps=ns_steps, dtype=ns_dtype, polar_express=polar_express)
    if normuon_beta2 > 0:
        update = normalize_neurons(update, states, normuon_beta2)
    # Orthogonal updates have unit singular values whatever the shape; for tall matrices (more outputs
    # than inputs) scale up by sqrt(rows/cols) so the per-element RMS of the update matches wide ones.
    p = params[0]
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    if weight_decay > 0:  # cautious: decay only the entries the update is already moving towards zero
        stacked = torch.stack(params)
        decay = stacked * ((update * stacked) >= 0)
        torch._foreach_add_(params, decay.unbind(0), alpha=-lr * scale * weight_decay)
    torch._foreach_add_(params, update.unbind(0), alpha=-lr * scale)


def variant_options(group):
    """A param group's keyword options for muon_update (groups saved before the variants existed lack them)."""
    return dict(ns_dtype=group.get("ns_dtype"), polar_express=group.get("polar_express", False),
                normuon_beta2=group.get("normuon_beta2", 0.0), weight_decay=group.get("weight_decay", 0.0))


class Muon(Optimizer):
    """ns_dtype: Newton-Schulz's dtype (None: default_ns_dtype of the parameters' device). polar_express,
    normuon_beta2, weight_decay: the variants (module docstring)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None, polar_express=False,
                 normuon_beta2=0.0, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        polar_express=polar_express, normuon_beta2=normuon_beta2, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            assert all(p.ndim >= 2 for p in group["params"]), "Muon is for matrices"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}  # same-shape matrices share one batched Newton-Schulz call
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for ps in by_shape.values():
                muon_update(ps, [p.grad for p in ps], [self.state[p] for p in ps], group["lr"], group["momentum"],
                            group["nesterov"], group["ns_steps"], **variant_options(group))


class DistMuon(Muon):
    """Muon across ranks. Parameters are grouped by shape; within a group, consecutive runs of
    world_size parameters are handled together: one reduce-scatter averages their gradients and hands
    parameter i of the run to rank i, which alone keeps its momentum and runs Newton-Schulz; one
    all-gather then gives every rank all updated parameters. The result equals single-process Muon on
    the rank-averaged gradient. Every rank must pass the same parameters in the same order. Options: Muon's."""

    def __init__(self, params, **options):
        super().__init__([dict(params=ps) for ps in self.group_by_shape(list(params))], **options)

    @staticmethod
    def group_by_shape(params):
        """The parameters in groups of one shape, shapes sorted: the same order on every rank."""
        shapes = sorted({tuple(p.shape) for p in params})
        return [[p for p in params if tuple(p.shape) == s] for s in shapes]

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        # 1) launch every reduce-scatter first so communication overlaps the Newton-Schulz work below
        runs = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world):
                run = params[base:base + world]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run]
                grads += [torch.zeros_like(run[0])] * (world - len(run))  # pad the last run
                mine = torch.empty_like(run[0])
                work = dist.reduce_scatter(mine, grads, op=dist.ReduceOp.SUM, async_op=True)
                runs.append((group, run, mine, work))
        # 2) update the parameter this rank owns in each run, then share it
        gathers = []
        for group, run, grad, work in runs:
            work.wait()
            if rank < len(run):
                p = run[rank]
                grad.div_(world)
                muon_update([p], [grad], [self.state[p]], group["lr"], group["momentum"], group["nesterov"],
                            group["ns_steps"], **variant_options(group))
                src = p
            else:
                src = torch.zeros_like(run[0])  # padding slot: nobody reads it
            outputs = list(run) + [torch.empty_like(run[0]) for _ in range(world - len(run))]
            gathers.append(dist.all_gather(outputs, src, async_op=True))
        for work in gathers:
            work.wait()
