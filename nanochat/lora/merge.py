"""Combining trained LoRA adapters into one new adapter (linear, TIES or DARE); it works on adapters
resident in one LoRA and leaves saving, loading and serving the result to nanochat/lora/adapter.py.

    merged = merge_adapters(lora, ["domain", "facts"], "both", method="ties", density=0.5)
    save_adapter(lora, "both", adapter_path("both"))      # adapter.json keeps the provenance

Every method works on each target layer's weight deltas dW_k = w_k (alpha_k / r_k) B_k A_k:
  linear  sum_k dW_k. Without `rank` the result is exact: the A's are stacked (scaled) and the B's put
          side by side, so the new rank is the sum of the ranks.
  ties    TIES-merging: each dW_k keeps its `density` fraction of largest-magnitude entries (trim),
          every entry takes the sign of the summed mass (elect), and the entries that agree with it
          are averaged (disjoint mean), so opposite updates do not cancel into noise.
  dare    DARE: each dW_k keeps a random `density` fraction of its entries, rescaled by 1 / density
          (the expectation is unchanged), then they are summed.
ties and dare give full matrices; a truncated SVD turns each back into B A of rank `rank` (default: the
sum of the source ranks, capped by the layer's size).
"""
import torch

from nanochat.lora.adapter import _now

METHODS = ("linear", "ties", "dare")


def _trim(delta, density):
    """delta with all but its `density` fraction of largest-magnitude entries set to zero."""
    if density >= 1.0:
        return delta
    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().topk(k).values[-1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas, density):
    """TIES on already weighted deltas: trim, elect the sign by total mass, disjoint mean."""
    t = torch.stack([_trim(d, density) for d in deltas])
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(deltas, density, generator):
    """DARE on already weighted deltas: random drop to `density`, rescale, sum."""
    if density >= 1.0:
        return torch.stack(deltas).sum(0)
    out = torch.zeros_like(deltas[0])
    for d in deltas:
        keep = torch.rand(d.shape, generator=generator) < density
        out += torch.where(keep.to(d.device), d / density, torch.zeros_like(d))
    return out


def low_rank(delta, rank):
    """(B, A) with B @ A the best rank-`rank` approximation of delta (truncated SVD, singular values
    split evenly between the two factors)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def merge_adapters(lora, names, name, method="linear", weights=None, density=1.0, rank=None, seed=0):
    """A new resident adapter `name` in `lora` combining the adapters `names` (module docstring), each
    times its weight (default 1.0). density (0, 1]: what ties and dare keep. rank: of the result (default:
    the sum of the source ranks). Its adapter.json provenance names the method, sources and settings.
    -> the new Adapter (not activated)."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
    stack = lora.make_stack(list(names), weights)
    if not stack:
        raise ValueError("merge_adapters needs at least one adapter")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    sources = [(lora.adapters[n], w) for n, w in stack]
    exact = method == "linear" and rank is None
    new_rank = rank or sum(ad.rank for ad, _ in sources)
    targets = [t for t in lora.targets if any(t in ad.targets for ad, _ in sources)]
    # scale 1 (alpha = rank): the factors below carry every weight and alpha/r of the sources
    ad = lora.add(name, rank=new_rank, alpha=new_rank, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    for key, i in ad.index.items():
        parts = [(src, w, src.index[key]) for src, w in sources if key in src.index]
        A, B = ad.A[i], ad.B[i]
        A.zero_()
        B.zero_()
        if not parts:
            continue
        if exact:  # B_new A_new = sum_k B_k (w_k scale_k A_k), exactly
            col = 0
            for src, w, j in parts:
                r = src.rank
                A[col:col + r] = (src.A[j] * (w * src.scale)).to(A.dtype)
                B[:, col:col + r] = src.B[j].to(B.dtype)
                col += r
            continue
        deltas = [src.weight_delta(j).float() * w for src, w, j in parts]
        if method == "linear":
            delta = torch.stack(deltas).sum(0)
        elif method == "ties":
            delta = ties(deltas, density)
        else:
            delta = dare(deltas, density, gen)
        b, a = low_rank(delta, new_rank)
        A[:a.size(0)] = a.to(A.dtype)
        B[:, :b.size(1)] = b.to(B.dtype)
    ad.info.update(task="merge", provenance={
        "merged_from": [{"name": n, "weight": w, "task": lora.adapters[n].info.get("task"),
                         "rank": lora.adapters[n].rank} for n, w in stack],
        "method": method, "density": density, "rank": new_rank, "seed": seed, "merged": _now()})
    return ad
