"""LoRA adapters on the GPT's block matrices: creating, stacking and merging them into the weights, and
applying them in the forward (a stack, or a different adapter per batch row); saving and loading is
nanochat/lora_io.py's job, routing nanochat/lora_router.py's, training nanochat/lora_train.py's,
combining nanochat/lora_merge.py's.

    lora = LoRA(model)                          # hooks every target Linear, freezes the base
    lora.add("facts", rank=8, alpha=16)         # A random, B zero: the model is unchanged
    lora.activate("facts")                      # O(1): the hooks read `lora.stack`
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])   # a stack: both apply, in order
    ... train lora.adapters["facts"].parameters() ...
    lora.activate(None)                         # back to the base model, bit for bit

How it works. An adapter holds, for each target Linear W (out x in) of each block, a pair
A (r x in), B (out x r); the layer then computes W x + (alpha / r) * B A x. Targets are the six
matrices of a block: attn.c_q, attn.c_k, attn.c_v, attn.c_proj, mlp.c_fc, mlp.c_proj.
The extra term is added by a forward hook on each target module, so the GPT module tree and its
state_dict are untouched: checkpoints, the Engine and the KV cache work as before, and several
adapters can stay resident with one active (switching is a pointer swap).

Stacking. The active set is a stack: an ordered list of (adapter, weight) pairs, and each target
layer computes W x + sum_k w_k (alpha_k / r_k) B_k A_k x - the same as merging the adapters into W one
after the other. A nested adapter is trained with a stack beneath it (frozen) and is only meaningful
on top of that stack; its adapter.json records it ("provenance": {"stacked_on": [...]}).

merge() folds the active stack into the weights (no extra matmuls at inference); it keeps a copy
of the original weights, and unmerge() copies them back, so the base is restored bit for bit
(subtracting B A again would leave rounding errors).

An adapter only makes sense on the weights it was trained on: LoRA records a hash of the base
model's state when it attaches (model_state_hash), saved adapters carry it in adapter.json, and
load_adapter raises AdapterBaseMismatch for a different base.
"""
import datetime
import hashlib
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


DEFAULT_TARGETS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterBaseMismatch(ValueError):
    """An adapter was trained on different base weights than the model it is being loaded onto."""


def validate_name(name):
    """Adapter names become directory names (and URL parts in chat_web): letters, digits, . _ -"""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def model_state_hash(model):
    """A stable hash of the model's weights: every state_dict tensor as fp32 bytes, by sorted name.
    fp32 so the same checkpoint hashes the same whether it was loaded as bf16 on a GPU or upcast on CPU."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


class Adapter(nn.Module):
    """The A/B pairs of one adapter, one per target module, in `modules` order."""

    def __init__(self, name, modules, shapes, rank, alpha, targets, device=None, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.name, self.rank, self.alpha = name, int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.targets = tuple(targets)
        self.modules_ = list(modules)  # module keys like "h.0.attn.c_q"
        self.index = {k: i for i, k in enumerate(self.modules_)}
        self.A = nn.ParameterList([nn.Parameter(torch.empty(rank, fin, device=device, dtype=dtype)) for fout, fin in shapes])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(fout, rank, device=device, dtype=dtype)) for fout, fin in shapes])
        self.centroid = None  # router: mean base hidden state of the adapter's training data
        self.info = {}  # task, metrics, created: what goes into adapter.json
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        # A ~ U(-1/sqrt(in), 1/sqrt(in)) (the usual kaiming_uniform(a=sqrt(5)) bound), B = 0: the
        # adapter starts as an exact no-op and B gets a useful gradient from the first step
        for a, b in zip(self.A, self.B):
            bound = a.size(1) ** -0.5
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32).to(a) * 2 * bound - bound)
            b.zero_()

    def delta(self, i, x):
        """(alpha / r) * B_i A_i x for the i-th module, in the dtype of A."""
        return F.linear(F.linear(x.to(self.A[i].dtype), self.A[i]), self.B[i]) * self.scale

    def weight_delta(self, i):
        return (self.B[i] @ self.A[i]) * self.scale

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self):
        """Bytes of the adapter's weights (what adapter.safetensors holds, less the header)."""
        n = sum(p.numel() * p.element_size() for p in self.parameters())
        if self.centroid is not None:
            n += self.centroid.numel() * self.centroid.element_size()
        return n


class LoRA:
    """Adapters for one GPT: hooks on its target Linears, a dict of resident adapters, one active.

    Creating it freezes every base parameter (requires_grad False); close() undoes that and removes
    the hooks. The base hash is taken here, before any merge."""

    def __init__(self, model, targets=DEFAULT_TARGETS):
        bad = [t for t in targets if t not in DEFAULT_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {DEFAULT_TARGETS}")
        if getattr(model, "_lora", None) is not None:
            raise RuntimeError("this model already has a LoRA attached; reuse it (model._lora) or close() it first")
        self.model = model
        self.targets = tuple(targets)
        self.modules = {}  # "h.<layer>.<target>" -> nn.Linear, in block order
        for i, block in enumerate(model.transformer.h):
            for t in self.targets:
                self.modules[f"h.{i}.{t}"] = block.get_submodule(t)
        self.base_hash = model_state_hash(model)
        self.adapters = {}
        self.stack = ()  # ((name, weight), ...) the hooks apply, in order; () is the base model
        self._merged_stack = None  # the stack folded into the weights, or None
        self._saved_weights = None
        self._enabled = True
        self._row_groups = None  # per-row mode (per_row): [(adapter, row index tensor)], else None
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]
        model._lora = self  # a plain attribute: not a submodule, so the state_dict is unchanged

    def _hook(self, key):
        def hook(module, inputs, output):
            if self._row_groups is not None and self._enabled:
                return self._per_row_delta(key, inputs[0], output)
            if not self._enabled or not self.stack or self._merged_stack is not None:
                return None
            return self.add_deltas(key, inputs[0], output, self.stack)
        return hook

    def add_deltas(self, key, x, output, stack):
        """output + the stack's terms for target module `key`: for each (name, weight) in order,
        weight * (alpha / r) * B A x (an adapter that does not target this module adds nothing). The
        hook calls it for the whole batch; applying a different stack to some rows is a call per group."""
        for name, weight in stack:
            ad = self.adapters[name]
            i = ad.index.get(key)
            if i is not None:
                d = ad.delta(i, x)
                output = output + (d if weight == 1.0 else d * weight).to(output.dtype)
        return output

    @staticmethod
    def _names(stack):
        """How `active` / `merged` report a stack: None, one name, or a list of names."""
        if not stack:
            return None
        if len(stack) == 1 and stack[0][1] == 1.0:
            return stack[0][0]
        return [n for n, _ in stack]

    @property
    def active(self):
        """None (the base model), the active adapter's name, or the list of names of a stack."""
        return self._names(self.stack)

    @property
    def merged(self):
        """What is folded into the weights, reported like `active` (None: nothing)."""
        return self._names(self._merged_stack) if self._merged_stack is not None else None

    def _per_row_delta(self, key, x, output):
        groups = [(ad, rows) for ad, rows in self._row_groups if key in ad.index]
        if not groups:
            return None
        if len(groups) == 1 and groups[0][1] is None:  # one adapter for the whole batch: as activate() does
            ad = groups[0][0]
            return output + ad.delta(ad.index[key], x).to(output.dtype)
        out = output.clone()
        for ad, rows in groups:
            out.index_add_(0, rows, ad.delta(ad.index[key], x.index_select(0, rows)).to(out.dtype))
        return out

    @contextmanager
    def per_row(self, adapters):
        """Inside the block, row r of each forward's batch gets the update of adapters[r] (an Adapter
        object, e.g. lora.adapters[name], or None for the base weights), whatever is active: requests
        for different adapters share one batch. Rows are grouped by adapter, one low-rank product per
        group; the base weights are untouched. Adapter objects, not names, so one that is replaced or
        removed meanwhile keeps serving the rows that hold it."""
        if self._merged_stack is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the weights; unmerge() before per-row use")
        by_id = {}
        for r, ad in enumerate(adapters):
            if ad is not None:
                by_id.setdefault(id(ad), (ad, []))[1].append(r)
        device = self.model.get_device()
        groups = [(ad, None if len(rows) == len(adapters) else torch.tensor(rows, device=device))
                  for ad, rows in by_id.values()]
        self._row_groups = groups
        try:
            yield
        finally:
            self._row_groups = None

    def close(self):
        """Remove the hooks, restore the base weights and the parameters' requires_grad flags."""
        if self._merged_stack is not None:
            self.unmerge()
        for h in self._handles:
            h.remove()
        self._handles = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self.model._lora = None

    # --- adapters ---------------------------------------------------------------------------
    def add(self, name, rank=8, alpha=16.0, targets=None, seed=None, info=None):
        """Create an adapter (A random, B zero) on the model's device. Not activated."""
        validate_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists; remove it first")
        targets = tuple(targets or self.targets)
        bad = [t for t in targets if t not in self.targets]
        if bad:
            raise ValueError(f"targets {bad} are not hooked by this LoRA (hooked: {self.targets})")
        keys = [k for k in self.modules if k.split(".", 2)[2] in targets]
        shapes = [tuple(self.modules[k].weight.shape) for k in keys]
        device = self.model.get_device()
        ad = Adapter(name, keys, shapes, rank, alpha, targets, device=device)
        if seed is not None:
            ad.reset_parameters(torch.Generator().manual_seed(seed))
        ad.info = {"task": None, "metrics": {}, "created": _now(), **(info or {})}
        self.adapters[name] = ad
        return ad

    def remove(self, name):
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} (resident: {sorted(self.adapters)})")
        if self._merged_stack is not None and any(n == name for n, _ in self._merged_stack):
            self.unmerge()
        self.stack = tuple((n, w) for n, w in self.stack if n != name)  # the rest of a stack stays
        del self.adapters[name]

    def make_stack(self, names, weights=None):
        """names (None, a name, or a list of names) and weights (default 1.0 each) -> ((name, weight), ...),
        checked: every adapter resident, no name twice, one finite weight per name."""
        if names is None:
            if weights:
                raise ValueError("weights given but no adapters")
            return ()
        names = [names] if isinstance(names, str) else list(names)
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights; give one weight per adapter")
        if len(set(names)) != len(names):
            raise ValueError(f"an adapter appears twice in the stack {names}")
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise KeyError(f"no adapter {missing[0]!r} (resident: {sorted(self.adapters)})")
        if not all(w == w and abs(w) != float("inf") for w in weights):
            raise ValueError(f"stack weights must be finite numbers, got {weights}")
        return tuple(zip(names, weights))

    def activate(self, names, weights=None, merge=False):
        """Make `names` active: None (the base model), one adapter name, or a list of names applied
        together in that order, each times its weight (default 1.0). O(1) unless merging; merge=True
        folds the stack into the weights (an unmerged one is unmerged first: the base comes back exactly)."""
        stack = self.make_stack(names, weights)
        if self._merged_stack is not None and self._merged_stack != stack:
            self.unmerge()
        self.stack = stack
        if merge and stack and self._merged_stack != stack:
            self.merge()

    def freeze(self, name, frozen=True):
        """Stop (or restart) gradients into adapter `name`: what sits beneath a nested adapter is frozen."""
        self.adapters[name].requires_grad_(not frozen)

    def deactivate(self):
        self.activate(None)

    @contextmanager
    def base_only(self):
        """Run the base model inside the block, whatever is active or merged."""
        merged = self._merged_stack
        if merged is not None:
            self.unmerge()
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True
            if merged is not None:
                self.merge()

    @torch.no_grad()
    def merge(self):
        """Fold the active stack into the weights, one adapter after the other (keeping the originals
        for unmerge)."""
        if not self.stack:
            raise RuntimeError("no active adapter to merge")
        if self._merged_stack is not None:
            raise RuntimeError(f"{self.merged!r} is already merged")
        keys = {k for n, _ in self.stack for k in self.adapters[n].modules_}
        if any(self.modules[k].weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) for k in keys):
            raise RuntimeError("cannot merge into quantized base weights; serve the adapters unmerged (hooks)")
        self._saved_weights = {k: self.modules[k].weight.detach().clone() for k in keys}
        for name, weight in self.stack:
            ad = self.adapters[name]
            for k, i in ad.index.items():
                w = self.modules[k].weight
                w.add_((ad.weight_delta(i) * weight).to(w.dtype))
        self._merged_stack = self.stack

    @torch.no_grad()
    def unmerge(self):
        """Copy the saved original weights back: the base is restored exactly."""
        if self._merged_stack is None:
            return
        for k, w in self._saved_weights.items():
            self.modules[k].weight.copy_(w)
        self._saved_weights = None
        self._merged_stack = None

    def trainable_parameters(self, name):
        return list(self.adapters[name].parameters())

    def summary(self, name):
        ad = self.adapters[name]
        return {"name": name, "rank": ad.rank, "alpha": ad.alpha, "targets": list(ad.targets),
                "modules": len(ad.modules_), "trainable_params": ad.num_params(), "bytes": ad.num_bytes()}


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")
